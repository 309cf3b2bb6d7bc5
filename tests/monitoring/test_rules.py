"""The rendered monitoring files: promtool accepts the rules, and they say what they promise."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from extproc.diagnosis import HINTS
from extproc.render import RenderOptions, render
from extproc.render import monitoring as mon

from .prometheus import binary

ROOT = Path(__file__).resolve().parents[2]
FILES = render("monitoring", RenderOptions())


def documents(path: str) -> dict:
    text = FILES[f"monitoring/{path}"]
    return yaml.safe_load(text)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary("promtool"), *args], capture_output=True, text=True, timeout=60, check=False
    )


def site_anchor(heading: str) -> str:
    """The anchor the docs site gives a heading: Python-Markdown's toc slugify, which mkdocs
    uses (GitHub's rendering of docs/monitoring.md gives the same for these headings)."""
    from markdown.extensions.toc import slugify

    return str(slugify(heading, "-"))


MONITORING_PAGE = (ROOT / "docs" / "monitoring.md").read_text(encoding="utf-8")
HEADINGS = re.findall(r"^#+ (.+)$", MONITORING_PAGE, re.MULTILINE)


class TestPromtool:
    def test_rule_file_passes_promtool(self, tmp_path):
        """`promtool check rules` accepts the plain rule file."""
        path = tmp_path / "rules.yaml"
        path.write_text(FILES["monitoring/rules.yaml"])
        result = promtool("check", "rules", str(path))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout

    def test_prometheusrule_groups_pass_promtool(self, tmp_path):
        """The PrometheusRule's spec.groups is a rule file promtool accepts too."""
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(documents("prometheusrule.yaml")["spec"]))
        result = promtool("check", "rules", str(path))
        assert result.returncode == 0, result.stdout + result.stderr

    def test_broken_rule_is_refused(self, tmp_path):
        """The check has teeth: promtool refuses a rule whose expression does not parse."""
        path = tmp_path / "broken.yaml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
            {"alert": "Broken", "expr": "sum by (reason (x)"}]}]}))  # fmt: skip
        assert promtool("check", "rules", str(path)).returncode != 0

    def test_surge_fires_on_a_jump_not_on_a_steady_rate(self, tmp_path):
        """promtool's rule tests: a reason that jumps from a trickle surges, a steady one does not."""
        rules = tmp_path / "rules.yaml"
        rules.write_text(FILES["monitoring/rules.yaml"])
        series = 'extproc_diagnoses_total{{job="doctor",namespace="mesh",reason="{}"}}'
        # 90 minutes: no_route 1/s all along; upstream_reset 1/min, then 3/s for 15 minutes.
        tests = {
            "rule_files": [str(rules)],
            "evaluation_interval": "1m",
            "tests": [
                {
                    "interval": "1m",
                    "input_series": [
                        {"series": series.format("no_route"), "values": "0+60x90"},
                        {"series": series.format("upstream_reset"), "values": "0+1x75 75+180x15"},
                    ],
                    "alert_rule_test": [
                        {"eval_time": "70m", "alertname": "ExtprocDiagnosisSurge", "exp_alerts": []},
                        {
                            "eval_time": "88m",
                            "alertname": "ExtprocDiagnosisSurge",
                            "exp_alerts": [_surge_alert("upstream_reset")],
                        },
                    ],
                }
            ],
        }  # fmt: skip
        path = tmp_path / "tests.yaml"
        path.write_text(yaml.safe_dump(tests))
        result = promtool("test", "rules", str(path))
        assert result.returncode == 0, result.stdout + result.stderr


def _surge_alert(reason: str) -> dict:
    """The labels and annotations promtool must see on the surge alert for `reason`."""
    rule = next(
        r
        for r in documents("rules.yaml")["groups"][1]["rules"]
        if r["alert"] == "ExtprocDiagnosisSurge" and r["labels"]["reason"] == reason
    )
    return {
        "exp_labels": {
            "severity": "warning",
            "reason": reason,
            "job": "doctor",
            "namespace": "mesh",
        },
        "exp_annotations": {
            # promtool renders the templates; the value is the 5-minute rate, 3/s.
            "summary": rule["annotations"]["summary"],
            "description": rule["annotations"]["description"]
            .replace("{{ $value | humanize }}", "3")
            .replace("{{ $labels.job }}", "doctor")
            .replace("{{ $labels.namespace }}", "mesh"),
            **{k: v for k, v in rule["annotations"].items() if k.startswith("runbook")},
        },
    }


class TestAlerts:
    def test_every_alert_has_summary_description_and_runbook(self):
        """Each alerting rule carries a summary, a description and its runbook: as rendered
        in deploy/ (no documentation URL known) a `runbook` naming the page, never a link."""
        for group in documents("rules.yaml")["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    assert set(rule["annotations"]) == {"summary", "description", "runbook"}

    def test_runbook_names_a_heading_of_the_monitoring_page(self):
        """Without a URL, each alert's runbook names docs/monitoring.md and a heading it has."""
        rules = [r for g in documents("rules.yaml")["groups"] for r in g["rules"] if "alert" in r]
        for rule in rules:
            text = rule["annotations"]["runbook"]
            assert "docs/monitoring.md" in text and "--runbook-url" in text
            assert f"'Alert: {rule['alert']}'" in text
            assert f"Alert: {rule['alert']}" in HEADINGS

    def test_runbook_links_land_on_monitoring_headings(self):
        """With a URL, every runbook_url's fragment is the anchor of one of docs/monitoring.md's
        headings on the site."""
        anchors = {site_anchor(h) for h in HEADINGS}
        options = RenderOptions(runbook_url="https://docs.example/extproc/monitoring/")
        rules = yaml.safe_load(render("monitoring", options)["monitoring/rules.yaml"])
        alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
        assert alerts
        for rule in alerts:
            anchor = rule["annotations"]["runbook_url"].split("#")[1]
            assert anchor in anchors, f"docs/monitoring.md has no heading 'Alert: {rule['alert']}'"

    def test_reason_alerts_quote_the_catalogue_hint(self):
        """A reason's alerts name it in their labels and quote its hint from the catalogue."""
        for alert in mon.alerts():
            reason = dict(alert.labels).get("reason")
            if reason is not None:
                assert HINTS[reason] in alert.description

    def test_misconfiguration_reasons_are_catalogue_codes(self):
        """The misconfiguration alert covers the issue's six reasons, all from the catalogue."""
        issue = {
            "upstream_requires_mtls",
            "sni_rejected",
            "alpn_mismatch",
            "upstream_san_mismatch",
            "client_cert_rejected",
            "upstream_cert_expired",
        }
        assert issue <= set(mon.MISCONFIGURATION) <= set(HINTS)

    def test_app_errors_never_page_the_mesh(self):
        """upstream_app_error has no surge or misconfiguration alert."""
        assert all(dict(a.labels).get("reason") != "upstream_app_error" for a in mon.alerts())

    def test_short_for_is_a_render_parameter(self):
        """rule_groups(alert_for=...) sets every alert's for:, the recording rules untouched."""
        groups = mon.rule_groups(alert_for="1s")
        assert {r["for"] for r in groups[1]["rules"]} == {"1s"}
        assert groups[0] == mon.rule_groups()[0]


class TestDashboard:
    def test_configmap_for_the_grafana_sidecar(self):
        """The dashboard ships as a ConfigMap labelled grafana_dashboard: "1", holding valid JSON."""
        cm = documents("dashboard.yaml")
        assert cm["kind"] == "ConfigMap"
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        (text,) = cm["data"].values()
        board = json.loads(text)
        assert board["uid"] == "extproc-doctor"
        assert {v["name"] for v in board["templating"]["list"]} >= {"namespace", "job"}

    def test_reason_panel_describes_every_reason(self):
        """The diagnoses panel's description lists every reason with its hint."""
        panel = mon.panels()[0]
        for reason, hint in HINTS.items():
            assert f"`{reason}`: {hint}" in panel.description

    @pytest.mark.parametrize(
        "title",
        [
            "Diagnoses per second by reason",
            "Request changes per second by rule",
            "Processing time per message",
            "Active streams",
            "Fail-open rate, from the proxies",
            "Policy reloads",
        ],
    )
    def test_issue_panels_exist(self, title):
        """The panels the issue asks for are on the dashboard."""
        assert title in [p["title"] for p in json.loads(
            next(iter(documents("dashboard.yaml")["data"].values())))["panels"]]  # fmt: skip


def test_runbook_url_points_every_alert_at_the_operators_copy():
    """render --runbook-url: every alert links into the given document's Alert headings."""
    from extproc.render import RenderOptions, render

    files = render("monitoring", RenderOptions(runbook_url="https://wiki.example/extproc"))
    rules = yaml.safe_load(files["monitoring/rules.yaml"].split("\n", 2)[2])
    links = [
        r["annotations"]["runbook_url"] for g in rules["groups"] for r in g["rules"] if "alert" in r
    ]
    assert links and all(link.startswith("https://wiki.example/extproc#alert-") for link in links)


class TestRunbookAddress:
    """The runbook links come from the package's metadata, never from a guessed address."""

    def test_documentation_url_from_project_urls(self):
        """The Documentation Project-URL (or its alias Docs, any case and punctuation) is the
        address; other labels are not."""
        from extproc.published import documentation_url

        assert documentation_url(["Source, https://src.example/x"]) is None
        assert documentation_url(["Docs, https://d.example/x"]) == "https://d.example/x"
        assert documentation_url(["Home, https://h", "Documentation , https://d.example/"]) == (
            "https://d.example/"
        )

    def test_metadata_without_a_url_renders_no_link(self):
        """The installed metadata names no documentation URL today, so RenderOptions has none."""
        from importlib.metadata import metadata

        urls = metadata("extproc-doctor").get_all("Project-URL") or []
        assert not [u for u in urls if u.lower().startswith(("documentation", "docs"))]
        assert RenderOptions().runbook_url is None

    def test_metadata_url_becomes_the_monitoring_page(self, monkeypatch):
        """A Documentation Project-URL in the metadata points every alert at its monitoring page."""
        from extproc import published

        class Meta:
            def get_all(self, name):
                return (
                    ["Documentation, https://docs.example/extproc/"]
                    if name == "Project-URL"
                    else []
                )

        monkeypatch.setattr(published, "metadata", lambda name: Meta())
        rules = yaml.safe_load(render("monitoring", RenderOptions())["monitoring/rules.yaml"])
        links = [r["annotations"]["runbook_url"] for r in rules["groups"][1]["rules"]]
        assert links[0].startswith("https://docs.example/extproc/monitoring/#alert-")
