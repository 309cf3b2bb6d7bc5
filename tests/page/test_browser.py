"""The live page in a real browser (Debian's chromium, driven by Playwright) over the mesh lab.

Real Envoys fail real requests; the real server diagnoses them and records them for the
page on its own loop; chromium loads the page and follows its event stream. Waits are on
locators (a strict CSP blocks `wait_for_function`). The screenshot is docs/page.png
(`EXTPROC_UPDATE_SCREENSHOT=1` rewrites it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc.diagnosis import Diagnosis
from extproc.failures import Failures, RequestFields
from extproc.lab import DEMO_POLICY
from extproc.lab.demo import run_scenario, running_doctor
from extproc.lab.envoy import free_port
from extproc.lab.scenarios import SCENARIOS, mesh_host
from extproc.page import Page

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's chromium at /usr/bin/chromium (`make test-tools` installs it)",
    ),
]
playwright = pytest.importorskip("playwright.sync_api", reason="needs PyPI playwright (dev group)")
expect = playwright.expect

CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
RECOVERED_AFTER = 6.0  # seconds without a failure before a row shows as recovered
# The promise is 2 s: the server publishes on its next tick (page.TICK_SECONDS, 1 s;
# tests/page/test_door.py checks an update goes out on a tick) and the browser applies it.
# A loaded CI machine can delay a browser past that, so the test waits longer: what it
# checks is that the row arrives live, without a reload.
LIVE_MS = 10_000
BY_NAME = {s.name: s for s in SCENARIOS}
XSS_CLUSTER = "<script>document.title='pwned'</script>"
XSS_HOST = "<img src=x onerror=\"document.title='pwned'\">"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, object, str]]:
    """The mesh lab, the real server with the page beside it, and the page's URL."""
    page = Page(Failures(recovered_after=RECOVERED_AFTER), "127.0.0.1:0")
    with running_doctor(tmp_path_factory.mktemp("page"), DEMO_POLICY, page=page) as (lab, server):
        for name in ("requires_mtls", "host_not_in_mesh"):
            run_scenario(lab, BY_NAME[name], server)
        yield lab, server, f"http://127.0.0.1:{page.port}/"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def tab(browser, lab):
    page = browser.new_page(viewport={"width": 1400, "height": 700})
    page.goto(lab[2])
    yield page
    page.close()


def row(tab, text: str, reason: str | None = None):
    rows = tab.locator(f'#rows tr[data-reason="{reason}"]' if reason else "#rows tr:not(.detail)")
    return rows.filter(has_text=text)


class TestScreenshot:
    # First in the module, while the lab's rows still fail.
    def test_screenshot_for_the_docs(self, tab, tmp_path):
        """The page with the lab's failures, as a PNG; with EXTPROC_UPDATE_SCREENSHOT=1 it is
        saved as docs/page.png (the docs' and README's picture), else in a temporary folder so
        a test run leaves the work tree as it was."""
        ratings = row(tab, mesh_host("ratings"), "upstream_requires_mtls")
        expect(ratings).to_be_visible()
        ratings.get_by_role("button").click()
        expect(tab.locator("#rows tr.detail")).to_be_visible()
        update = os.environ.get("EXTPROC_UPDATE_SCREENSHOT") == "1"
        path = ROOT / "docs" / "page.png" if update else tmp_path / "page.png"
        tab.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 10_000


class TestRows:
    def test_lab_failures_show_reason_hint_and_destination_rule(self, tab):
        """The lab's failures are rows with their reason and DestinationRule; a row opens to its hint."""
        # The first close of the plaintext cluster reads as a keep-alive race, the second as
        # the mTLS requirement: two rows, one per reason.
        expect(row(tab, mesh_host("ratings"), "upstream_connection_closed")).to_be_visible()
        ratings = row(tab, mesh_host("ratings"), "upstream_requires_mtls")
        expect(ratings).to_contain_text("default/ratings")
        expect(row(tab, "PassthroughCluster")).to_contain_text("host_not_in_mesh")
        ratings.get_by_role("button", name="upstream_requires_mtls").click()
        detail = tab.locator("#rows tr.detail")
        expect(detail).to_contain_text("STRICT")  # the hint names the server's PeerAuthentication
        expect(detail.get_by_role("table")).to_contain_text(mesh_host("ratings"))

    def test_new_failure_appears_live_then_recovers(self, tab, lab):
        """A failure after the page loaded appears without a reload within 2 s, and shows as
        recovered once the cluster stops failing."""
        expect(row(tab, mesh_host("ratings"), "upstream_requires_mtls")).to_be_visible()
        run_scenario(lab[0], BY_NAME["refused"], lab[1])
        orders = row(tab, mesh_host("orders"))
        expect(orders).to_contain_text("upstream_refused", timeout=LIVE_MS)
        expect(orders.locator("td.state")).to_have_text("failing")
        expect(orders.locator("td.state")).to_contain_text(
            "recovered", timeout=(RECOVERED_AFTER + 5) * 1000
        )

    def test_filters_narrow_the_rows(self, tab):
        """Choosing a reason, typing a cluster or a namespace leaves only the matching rows."""
        expect(row(tab, "PassthroughCluster")).to_be_visible()
        tab.get_by_label("Reason").select_option("host_not_in_mesh")
        expect(tab.locator("#rows tr")).to_have_count(1)
        expect(row(tab, "PassthroughCluster")).to_be_visible()
        tab.get_by_label("Reason").select_option("")
        tab.get_by_label("Cluster").fill("ratings")
        expect(tab.locator("#rows tr")).to_have_count(2)
        expect(tab.locator("#rows tr").filter(has_text="ratings")).to_have_count(2)
        tab.get_by_label("Cluster").fill("")
        tab.get_by_label("Namespace").fill("nowhere")
        expect(tab.locator("#rows tr")).to_have_count(0)
        tab.get_by_label("Namespace").fill("default")
        expect(row(tab, mesh_host("ratings"), "upstream_requires_mtls")).to_be_visible()
        expect(row(tab, "PassthroughCluster")).to_have_count(0)


class TestTraceLinks:
    def test_a_sample_links_its_trace(self, tab, lab):
        """With --ui-trace-url a sample's trace id is a link built from the template."""
        trace = "4bf92f3577b34da6a3ce929d0e0e4736"
        failures = lab[1].page.failures
        evidence = (("status", 503), ("cluster", "traced-cluster"), ("host", "traced.example"))

        def record() -> None:
            failures.trace_url = "https://jaeger.example/trace/{trace_id}"
            failures.record(Diagnosis("upstream_refused", "hint", evidence), time.time(),
                            RequestFields("GET", "/t", "r-1", trace))  # fmt: skip

        lab[1].call_soon(record)
        traced = row(tab, "traced-cluster")
        traced.get_by_role("button").click()
        link = tab.locator("#rows tr.detail").get_by_role("link", name=trace)
        expect(link).to_have_attribute("href", f"https://jaeger.example/trace/{trace}")


class TestReasonLinks:
    DOCS = "https://docs.example/extproc-doctor/"

    @staticmethod
    def _record(lab, cluster: str, docs_url: str) -> None:
        failures = lab[1].page.failures
        evidence = (("status", 503), ("cluster", cluster), ("host", "docs.example"))

        def record() -> None:
            failures.docs_url = docs_url
            failures.record(Diagnosis("upstream_refused", "hint", evidence), time.time())

        lab[1].call_soon(record)

    def test_without_a_docs_url_the_row_names_the_entry(self, tab, lab):
        """With no documentation site known the opened row names the file and the anchor
        as text, and links nothing."""
        self._record(lab, "plain-text-cluster", "")
        row(tab, "plain-text-cluster").get_by_role("button").click()
        detail = tab.locator("#rows tr.detail")
        expect(detail).to_contain_text("docs/reasons.md, anchor reason-upstream_refused")
        expect(detail.locator("dd a")).to_have_count(0)

    def test_a_row_links_its_reason(self, tab, lab):
        """With --ui-docs-url the opened row links its reason's catalogue entry, the link
        made under the page's CSP with no violation reported."""
        csp: list[str] = []
        tab.on("console", lambda m: csp.append(m.text) if "Content Security" in m.text else None)
        self._record(lab, "linked-cluster", self.DOCS)
        row(tab, "linked-cluster").get_by_role("button").click()
        link = tab.locator("#rows tr.detail").get_by_role("link", name="upstream_refused")
        expect(link).to_have_attribute("href", f"{self.DOCS}reasons/#reason-upstream_refused")
        expect(link).to_have_attribute("rel", "noopener noreferrer")
        assert csp == []


class TestSafety:
    def test_markup_in_names_shows_as_text_and_runs_nothing(self, tab, lab):
        """A cluster name and a Host holding markup show as text; no script runs, no element is made."""
        dialogs: list[str] = []
        tab.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        evidence = (("status", 503), ("cluster", XSS_CLUSTER), ("host", XSS_HOST))
        hint = "<b onmouseover=alert(1)>bold</b>"
        lab[1].call_soon(lab[1].page.failures.record,
                         Diagnosis("upstream_refused", hint, evidence), __import__("time").time())  # fmt: skip
        hostile = row(tab, XSS_CLUSTER)
        expect(hostile).to_contain_text(XSS_CLUSTER)
        hostile.get_by_role("button").click()
        expect(tab.locator("#rows tr.detail")).to_contain_text(XSS_HOST)
        expect(tab.locator("#rows tr.detail")).to_contain_text(hint)
        assert tab.title() == "extproc-doctor: what fails now"
        expect(tab.locator("#rows script, #rows img, #rows b")).to_have_count(0)
        assert dialogs == []

    def test_security_headers(self, browser, lab):
        """The page comes with the CSP, nosniff and no-store."""
        tab = browser.new_page()
        response = tab.goto(lab[2])
        headers = response.headers
        assert headers["content-security-policy"] == "default-src 'self'; frame-ancestors 'none'"
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["cache-control"] == "no-store"
        tab.close()

    def test_non_loopback_without_token_refuses_to_start(self):
        """`extproc serve --ui-listen 0.0.0.0:PORT` without a token exits at once, saying why."""
        result = subprocess.run(
            [sys.executable, "-m", "extproc", "serve", "--listen", "127.0.0.1:0",
             "--ui-listen", f"0.0.0.0:{free_port()}"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 2
        assert "--ui-token-file" in result.stderr


class TestAccessibility:
    def test_landmarks_and_labels(self, tab):
        """Banner, main, search and status landmarks; every filter has a label; the table a caption."""
        for role in ("banner", "main", "search", "status", "contentinfo"):
            expect(tab.get_by_role(role)).to_have_count(1)
        for label in ("Reason", "Cluster", "Namespace"):
            expect(tab.get_by_label(label)).to_be_visible()
        expect(tab.get_by_role("table", name="Failing (cluster, reason) rows")).to_be_visible()
        expect(tab.get_by_role("columnheader", name="DestinationRule")).to_be_visible()
