"""`extproc render monitoring`: Prometheus rules and a Grafana dashboard for the operator.

Strategy: recording rules compute what alerts and panels share (rates by reason, by
action, the processing-time histogram) once per evaluation, so a dashboard over a whole
mesh reads a few pre-aggregated series. Alerts and panels are tables of data below; the
reasons and their hints come from `extproc.diagnosis` at render time, so a reason added
to the catalogue gets its surge alert and its line in the panel description without an
edit here. Envoy's own ext_proc counters are named as a real Envoy 1.40 exposes them on
`/stats/prometheus` (`tests/monitoring/` scrapes them from one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from extproc.diagnosis import HINTS
from extproc.render.k8s import LABELS
from extproc.render.options import NAME, RUNBOOK_PAGE, RenderError, RenderOptions

# The alerts' runbooks are docs/monitoring.md's "Alert: NAME" headings. Linked only where
# an address is known: the documentation URL in the package's metadata, or `render
# --runbook-url` (an operator's own copy: a wiki, an internal mirror). Without one, an alert
# says where its runbook is in a `runbook` annotation instead of linking a guessed page.

# Envoy's HTTP ext_proc filter counters as `/stats/prometheus` names them: the stat
# `http.<hcm stat_prefix>.ext_proc.<counter>` becomes `envoy_http_ext_proc_<counter>` with
# the HCM prefix in the label `envoy_http_conn_manager_prefix` (observed on Envoy 1.40.0).
# `failure_mode_allowed` counts a failed stream and a message timeout alike (Envoy's
# ext_proc.cc, Filter::onGrpcError and Filter::onMessageTimeout).
ENVOY_FAILED_OPEN = "envoy_http_ext_proc_failure_mode_allowed"
ENVOY_STREAMS_STARTED = "envoy_http_ext_proc_streams_started"
ENVOY_STREAMS_FAILED = "envoy_http_ext_proc_streams_failed"
ENVOY_MESSAGE_TIMEOUTS = "envoy_http_ext_proc_message_timeouts"

# Reasons that say the mesh's configuration is wrong (TLS, identity, routing of the Host):
# they do not heal by themselves, so any of them for some minutes is worth an alert.
MISCONFIGURATION = (
    "upstream_requires_mtls",
    "upstream_not_tls",
    "upstream_cert_untrusted",
    "upstream_san_mismatch",
    "upstream_cert_expired",
    "client_cert_rejected",
    "sni_rejected",
    "tls_handshake_rejected",
    "alpn_mismatch",
    "tls_version_mismatch",
    "tls_peer_alert",
    "tls_config_error",
    "sds_secret_missing",
    "protocol_mismatch",
    "host_not_in_mesh",
)
# The application's own errors are its owners' alerts, never the mesh's.
NOT_THE_MESH = ("upstream_app_error",)
# A reason surges when its 5-minute rate is this many times its 1-hour rate (which
# includes those 5 minutes, so a reason that was silent for the hour reaches 12) ...
SURGE_FACTOR = 4
# ... and it happens at least this often (per second: 6 a minute), so one stray failure
# after a quiet hour is no surge.
SURGE_MIN_RATE = 0.1
# The share of ext_proc streams a proxy may fail open before the alert.
FAIL_OPEN_RATIO = 0.01

# Recording rules: `level:metric:operation`, the level being the labels kept.
DIAGNOSES = "namespace_job_reason_cluster:extproc_diagnoses:rate5m"
DIAGNOSES_1H = "namespace_job_reason:extproc_diagnoses:rate1h"
ACTIONS = "namespace_job_action_report:extproc_actions:rate5m"
SECONDS_BUCKETS = "namespace_job_kind_le:extproc_processing_seconds_bucket:rate5m"
SECONDS_P99 = "namespace_job_kind:extproc_processing_seconds:p99_5m"
ERRORS = "namespace_job_error:extproc_errors:rate5m"
FAILED_OPEN = "namespace_job:envoy_ext_proc_failure_mode_allowed:rate5m"
STREAMS_STARTED = "namespace_job:envoy_ext_proc_streams_started:rate5m"

RECORDING_RULES: tuple[tuple[str, str], ...] = (
    (DIAGNOSES, "sum by (namespace, job, reason, cluster) (rate(extproc_diagnoses_total[5m]))"),
    (DIAGNOSES_1H, "sum by (namespace, job, reason) (rate(extproc_diagnoses_total[1h]))"),
    (ACTIONS, "sum by (namespace, job, action, report) (rate(extproc_actions_total[5m]))"),
    (
        SECONDS_BUCKETS,
        "sum by (namespace, job, kind, le) (rate(extproc_processing_seconds_bucket[5m]))",
    ),
    (SECONDS_P99, f"histogram_quantile(0.99, {SECONDS_BUCKETS})"),
    (ERRORS, "sum by (namespace, job, error) (rate(extproc_errors_total[5m]))"),
    (FAILED_OPEN, f"sum by (namespace, job) (rate({ENVOY_FAILED_OPEN}[5m]))"),
    (STREAMS_STARTED, f"sum by (namespace, job) (rate({ENVOY_STREAMS_STARTED}[5m]))"),
)

_WHERE = "{{ $labels.job }} in namespace {{ $labels.namespace }}"
_CLUSTER = "{{ if $labels.cluster }} (cluster {{ $labels.cluster }}){{ end }}"


@dataclass(frozen=True, slots=True)
class Alert:
    """One alerting rule; `hint` goes into the description after the measured value."""

    name: str
    expr: str
    duration: str
    summary: str
    description: str
    labels: tuple[tuple[str, str], ...] = ()


def _runbook(alert: str, base: str | None) -> dict[str, str]:
    """The alert's runbook annotation: a link when an address is known, else where to read."""
    if base is not None:
        return {"runbook_url": f"{base}#alert-{alert.lower()}"}
    return {
        "runbook": f"{RUNBOOK_PAGE}, heading 'Alert: {alert}', in extproc-doctor's source "
        "distribution. No runbook_url: the installed package names no documentation URL; "
        "render with --runbook-url URL to link your copy."
    }


def _reason_alerts() -> list[Alert]:
    known = set(HINTS)
    missing = [r for r in MISCONFIGURATION if r not in known]
    if missing:
        raise RenderError(f"monitoring: reasons not in the catalogue: {', '.join(missing)}")
    alerts = [
        Alert(
            "ExtprocMeshMisconfiguration",
            f'{DIAGNOSES}{{reason="{reason}"}} > 0',
            "5m",
            f"Mesh misconfiguration: {reason}",
            f"{{{{ $value | humanize }}}}/s responses diagnosed {reason} by {_WHERE}"
            f"{_CLUSTER}. Hint: {_template_safe(HINTS[reason])}",
            (("severity", "warning"), ("reason", reason)),
        )
        for reason in MISCONFIGURATION
    ]
    alerts += [
        Alert(
            "ExtprocDiagnosisSurge",
            f'sum without (cluster) ({DIAGNOSES}{{reason="{reason}"}})'
            f" > {SURGE_FACTOR} * {DIAGNOSES_1H}"
            f' and sum without (cluster) ({DIAGNOSES}{{reason="{reason}"}}) > {SURGE_MIN_RATE}',
            "5m",
            f"{reason} diagnoses rose sharply",
            f"{reason} at {{{{ $value | humanize }}}}/s from {_WHERE}, over "
            f"{SURGE_FACTOR} times its rate of the last hour. Hint: {_template_safe(hint)}",
            (("severity", "warning"), ("reason", reason)),
        )
        for reason, hint in HINTS.items()
        if reason not in NOT_THE_MESH
    ]
    return alerts


def _template_safe(text: str) -> str:
    """A hint as literal text in a Prometheus template (it never holds `{{`, but check)."""
    if "{{" in text or "}}" in text:
        raise RenderError(f"monitoring: a hint contains template braces: {text!r}")
    return text


def _operational_alerts() -> list[Alert]:
    return [
        Alert(
            "ExtprocFailingOpen",
            f"{FAILED_OPEN} / {STREAMS_STARTED} > {FAIL_OPEN_RATIO}",
            "2m",
            "Proxies pass requests without the doctor (failing open)",
            f"{{{{ $value | humanizePercentage }}}} of the ext_proc streams of the proxies scraped "
            f"by {_WHERE} failed open: the server was unreachable, refused the stream or "
            "missed the message timeout, so failures went out unannotated. Check the "
            "server's pods, its Service endpoints and the proxies' extproc cluster.",
            (("severity", "warning"),),
        ),
        Alert(
            "ExtprocProcessingErrors",
            f"{ERRORS} > 0",
            "5m",
            "The server answers messages it could not process",
            f"{{{{ $value | humanize }}}}/s {{{{ $labels.error }}}} errors in {_WHERE}: "
            "bad_message is a client sending ProcessingRequests with no kind set; "
            "processing_failed is a bug in the server (its log has processing_failed "
            "with the exception type, message and stack); unknown_flags is an Envoy newer "
            "than the server (response flags it does not know: upgrade extproc-doctor). "
            "Requests continue unannotated.",
            (("severity", "warning"),),
        ),
        Alert(
            "ExtprocPolicyReloadFailed",
            'sum by (namespace, job) (increase(extproc_policy_reloads_total{result="error"}[15m]))'
            " > 0",
            "0m",
            "A policy reload failed; the previous policy keeps serving",
            f"{{{{ $value | humanize }}}} failed policy reloads in the last 15 minutes in "
            f"{_WHERE}. The server's log line policy_reload_failed names the file, line "
            "and key. Fix the ConfigMap; the alert clears 15 minutes after the last error.",
            (("severity", "warning"),),
        ),
    ]


def alerts() -> list[Alert]:
    """Every alerting rule, in the order the rule file lists them."""
    return _reason_alerts() + _operational_alerts()


def rule_groups(alert_for: str | None = None, runbook: str | None = None) -> list[dict[str, Any]]:
    """The rule groups; `alert_for` replaces every alert's `for:` (tests use a short one);
    `runbook` is the document whose "Alert: NAME" headings the alerts link to (None: no
    link, the alerts name the page)."""
    recording = [{"record": name, "expr": expr} for name, expr in RECORDING_RULES]
    alerting = [
        {
            "alert": a.name,
            "expr": a.expr,
            "for": alert_for if alert_for is not None else a.duration,
            "labels": dict(a.labels),
            "annotations": {
                "summary": a.summary,
                "description": a.description,
                **_runbook(a.name, runbook),
            },
        }
        for a in alerts()
    ]
    return [
        {"name": f"{NAME}.recording", "rules": recording},
        {"name": f"{NAME}.alerts", "rules": alerting},
    ]


# --- the dashboard -----------------------------------------------------------------------

_SERVER = 'namespace=~"$namespace", job=~"$job"'
_PROXY = 'namespace=~"$proxy_namespace"'


@dataclass(frozen=True, slots=True)
class Panel:
    """A time-series panel: queries as (expr, legend), a description, a unit."""

    title: str
    description: str
    targets: tuple[tuple[str, str], ...]
    unit: str = "short"


def _reason_list() -> str:
    return "\n".join(f"- `{reason}`: {hint}" for reason, hint in HINTS.items())


def panels() -> list[Panel]:
    """The dashboard's panels, top left to bottom right."""
    return [
        Panel(
            "Diagnoses per second by reason",
            "Failing responses the doctor explained, by reason code. What each means:\n\n"
            + _reason_list(),
            ((f"sum by (reason) ({DIAGNOSES}{{{_SERVER}}})", "{{reason}}"),),
            "reqps",
        ),
        Panel(
            "Diagnoses per second by cluster (top 10)",
            "Which upstream cluster fails, and why. Needs `extproc serve "
            "--metrics-cluster-label`; clusters past its limit show as `other`.",
            (
                (
                    f'topk(10, sum by (cluster, reason) ({DIAGNOSES}{{{_SERVER}, cluster!=""}}))',
                    "{{cluster}} {{reason}}",
                ),
            ),
            "reqps",
        ),
        Panel(
            "Request changes per second by rule",
            "Headers the policy changed (`report=true`: only reported, mode report or a "
            "rule set to report).",
            (
                (
                    f"sum by (action, report) ({ACTIONS}{{{_SERVER}}})",
                    "{{action}} report={{report}}",
                ),
            ),
            "reqps",
        ),
        Panel(
            "Processing time per message",
            "Time to answer one ext_proc message, parse to response, by message kind. "
            "Envoy gives up after its message_timeout (0.5 s in the rendered manifests).",
            tuple(
                (
                    f"histogram_quantile({q}, sum by (kind, le) ({SECONDS_BUCKETS}{{{_SERVER}}}))",
                    f"p{round(q * 100)} {{{{kind}}}}",
                )
                for q in (0.5, 0.9, 0.99)
            ),
            "s",
        ),
        Panel(
            "Active streams",
            "ext_proc streams open now (one per HTTP request in flight); at "
            "--max-streams a new one takes a silent or over-share stream's place, else it "
            "is refused (extproc_streams_refused_total) and Envoy fails open.",
            ((f"sum by (job) (extproc_streams_active{{{_SERVER}}})", "{{job}}"),),
        ),
        Panel(
            "Fail-open rate, from the proxies",
            "Envoy's own ext_proc counters: requests that went on without the doctor "
            "(failure_mode_allowed: server unreachable, stream refused, or message timeout), "
            "and the timeouts among them. Needs the proxies' ext_proc stats in Prometheus "
            "(Istio: a stats inclusion for ext_proc).",
            (
                (f"sum by (namespace) ({FAILED_OPEN}{{{_PROXY}}})", "failed open {{namespace}}"),
                (
                    f"sum by (namespace) (rate({ENVOY_MESSAGE_TIMEOUTS}{{{_PROXY}}}"
                    "[$__rate_interval]))",
                    "message timeouts {{namespace}}",
                ),
                (
                    f"sum by (namespace) (rate({ENVOY_STREAMS_FAILED}{{{_PROXY}}}"
                    "[$__rate_interval]))",
                    "streams failed {{namespace}}",
                ),
            ),
            "reqps",
        ),
        Panel(
            "Policy reloads",
            "Policy reloads by result; on error the previous policy keeps serving.",
            (
                (
                    f"sum by (result) (increase(extproc_policy_reloads_total{{{_SERVER}}}"
                    "[$__rate_interval]))",
                    "{{result}}",
                ),
            ),
        ),
        Panel(
            "Processing errors per second",
            "bad_message: a ProcessingRequest with no kind; processing_failed: the server "
            "hit an exception and answered a plain continue.",
            ((f"sum by (error) ({ERRORS}{{{_SERVER}}})", "{{error}}"),),
            "reqps",
        ),
        Panel(
            "Diagnoses folded into cluster=other",
            "Diagnoses whose cluster came after the --metrics-cluster-label limit: raise "
            "the limit if this is not zero and the top-10 panel shows `other` high.",
            (
                (
                    "sum(rate(extproc_diagnoses_clusters_folded_total"
                    f"{{{_SERVER}}}[$__rate_interval]))",
                    "folded",
                ),
            ),
            "reqps",
        ),
    ]


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": name},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "current": {"text": "All", "value": "$__all"},
    }


def _templating() -> dict[str, Any]:
    datasource = {
        "name": "datasource",
        "label": "Prometheus",
        "type": "datasource",
        "query": "prometheus",
    }
    return {
        "list": [
            datasource,
            _variable("namespace", "namespace", "label_values(extproc_streams_total, namespace)"),
            _variable(
                "job", "job", 'label_values(extproc_streams_total{namespace=~"$namespace"}, job)'
            ),
            _variable(
                "proxy_namespace",
                "proxies' namespace",
                f"label_values({ENVOY_STREAMS_STARTED}, namespace)",
            ),
        ]
    }


def _panel_json(index: int, panel: Panel) -> dict[str, Any]:
    return {
        "id": index + 1,
        "type": "timeseries",
        "title": panel.title,
        "description": panel.description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(panel.targets)
        ],
    }


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard's JSON model."""
    return {
        "uid": NAME,
        "title": "extproc-doctor",
        "tags": [NAME, "envoy", "ext_proc"],
        "schemaVersion": 39,
        "editable": True,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "1m",
        "templating": _templating(),
        "panels": [_panel_json(i, p) for i, p in enumerate(panels())],
    }


def render_monitoring(options: RenderOptions) -> dict[str, dict[str, Any]]:
    """The monitoring files by name: PrometheusRule, plain rule file, dashboard, PodMonitor."""
    meta = {"name": NAME, "namespace": options.namespace, "labels": dict(LABELS)}
    return {
        "prometheusrule.yaml": {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": meta,
            "spec": {"groups": rule_groups(runbook=options.runbook_url)},
        },
        "rules.yaml": {"groups": rule_groups(runbook=options.runbook_url)},
        "dashboard.yaml": {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": f"{NAME}-dashboard",
                "namespace": options.namespace,
                "labels": {**LABELS, "grafana_dashboard": "1"},
            },
            "data": {f"{NAME}.json": json.dumps(dashboard(), indent=2) + "\n"},
        },
        "podmonitor.yaml": {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PodMonitor",
            "metadata": meta,
            "spec": {
                "selector": {"matchLabels": dict(LABELS)},
                "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics"}],
            },
        },
    }
