"""`extproc demo`: the lab's scenarios through real Envoys and the real server, as a table.

It exits non-zero when any scenario gets another reason, status or action list than
expected, so `make run` doubles as a smoke test on a fresh machine.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from extproc.config import Policy
from extproc.failures import Failures
from extproc.filter_config import GRPC, HTTP
from extproc.http_lane import HttpLane, HttpProcessor
from extproc.lab.background import BackgroundServer
from extproc.lab.envoy import free_port
from extproc.lab.scenarios import DEMO_POLICY, MESH, SCENARIOS, Scenario
from extproc.lab.topology import LOOPBACK, Lab, Response
from extproc.page import Page
from extproc.server import ExtProcServer

HINT_WIDTH = 60
# The scenario printed in full under the table.
EXAMPLE = "subset_plaintext"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one scenario's request got back, and whether that was expected."""

    scenario: Scenario
    response: Response
    reason: str | None
    actions: tuple[str, ...]

    @property
    def ok(self) -> bool:
        s = self.scenario
        return (
            self.reason == s.expected_reason
            and self.actions == s.expected_actions
            and (s.expected_status is None or self.response.status == s.expected_status)
        )


def split_list(value: str | None) -> tuple[str, ...]:
    """The members of an RFC 8941 List as written by the server (no commas inside members)."""
    return tuple(m.strip() for m in value.split(",")) if value else ()


@contextmanager
def running_doctor(
    workdir: Path,
    policy: Policy = DEMO_POLICY,
    *,
    envoy_admin: bool = True,
    transport: str = GRPC,
    page: Page | None = None,
) -> Iterator[tuple[Lab, BackgroundServer]]:
    """The mesh lab with the real server in its path, reading the client sidecar's admin.

    The Envoys start first, pointed at a free port, so the server can be given their
    admin address; the ext_proc filter fails open until the server is up. `transport`:
    gRPC, or the HTTP lane (`serve --http-listen`); `page`: the live page beside it.
    """
    port = free_port()
    address = f"{LOOPBACK}:{port}"
    lane = (
        HttpLane(HttpProcessor(policy), address) if transport == HTTP
        else ExtProcServer(policy, address)
    )  # fmt: skip
    with (
        Lab((LOOPBACK, port), workdir, MESH, transport=transport) as lab,
        BackgroundServer(
            lane, envoy_admin=lab.admin_url if envoy_admin else None, page=page
        ) as server,
    ):
        yield lab, server


def run_scenario(lab: Lab, scenario: Scenario, server: BackgroundServer | None = None) -> Outcome:
    """Send the scenario's request; under its own policy when it has one (needs `server`)."""
    if scenario.policy is not None and server is None:
        raise ValueError(f"scenario {scenario.name} needs the server, to serve its own policy")
    with server.policy(scenario.policy) if server and scenario.policy else nullcontext():
        for _ in range(scenario.repeat):
            response = lab.request(
                scenario.host, scenario.path, scenario.headers, method=scenario.method
            )
    diagnosis = response.header("x-extproc-diagnosis")
    reason = diagnosis.split(";", 1)[0] if diagnosis else None
    actions = tuple(
        m.split(";headers=")[0] + (";report" if m.endswith(";report") else "")
        for m in split_list(response.header("x-extproc-actions"))
    )
    return Outcome(scenario, response, reason, actions)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def request_line(s: Scenario) -> str:
    """The request, as the table shows it: Host, path and the headers that select a route."""
    routing = [f"{name}: {value}" for name, value in s.headers if name == "x-subset"]
    return f"{s.host}{s.path}" + (f" [{', '.join(routing)}]" if routing else "")


# Under the table: what its two reason columns mean on a real cluster.
CLUSTER_NOTE = (
    "reason: what this demo's server says; it reads the client sidecar's admin (--envoy-admin)\n"
    "  for the cluster's TLS settings (SNI, ALPN, TLS or not).\n"
    "on a cluster: what the rendered deployment says, which has no admin access to the\n"
    "  proxies (* where that context changes the reason; tests/envoy/test_doctor.py checks\n"
    "  this column with a server without it). Gated mode, the rendered default, calls the\n"
    "  server only for a 5xx, a 404 no upstream answered, or a gRPC error.\n"
    "  docs/deploy/index.md: 'Which reasons on a real cluster'."
)


def cluster_reason(outcome: Outcome) -> str:
    """The reason without the proxy's admin context, starred where that context changes it."""
    s = outcome.scenario
    reason = s.reason_without_context or "-"
    return f"{reason} *" if s.offline_reason is not None else reason


def render_table(outcomes: Iterable[Outcome]) -> str:
    rows = [("", "#", "request", "status", "reason", "on a cluster", "hint", "actions")]
    for o in outcomes:
        rows.append(
            (
                "ok" if o.ok else "FAIL",
                o.scenario.label,
                request_line(o.scenario),
                str(o.response.status),
                o.reason or "-",
                cluster_reason(o),
                _cut(o.response.header("x-extproc-hint") or "-", HINT_WIDTH),
                ", ".join(o.actions) or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_example(outcome: Outcome) -> str:
    """One annotated response as curl -i would show its extproc headers."""
    s = outcome.scenario
    extra = "".join(f" -H '{name}: {value}'" for name, value in s.headers)
    shown = [
        f"$ curl -si -H 'Host: {s.host}'{extra} http://127.0.0.1:PORT{s.path}",
        f"HTTP/1.1 {outcome.response.status}",
    ]
    shown += [
        f"{name}: {value}"
        for name, value in outcome.response.headers
        if name.startswith("x-extproc-")
    ]
    return "\n".join(shown)


def list_scenarios(scenarios: Iterable[Scenario] = SCENARIOS) -> str:
    """`--list`: each scenario's label, name, expected reason and story."""
    return "\n".join(
        f"{s.label:<16}{s.name:<22}{s.expected_reason or '-':<25}{s.description}" for s in scenarios
    )


def run_demo(
    policy: Policy | None = None,
    *,
    stay: bool = True,
    out: TextIO = sys.stdout,
    scenarios: Iterable[Scenario] | None = None,
    transport: str = GRPC,
    ui_listen: str | None = None,
) -> int:
    """Start the lab and the server (and the live page on `ui_listen`); print the table;
    wait for Ctrl-C if `stay`."""
    policy = policy or DEMO_POLICY
    chosen = tuple(scenarios or SCENARIOS)
    page = Page(Failures(), ui_listen) if ui_listen else None
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="extproc-demo-")))
        lab, server = stack.enter_context(
            running_doctor(workdir, policy, transport=transport, page=page)
        )
        outcomes = [run_scenario(lab, s, server) for s in chosen]
        print(render_table(outcomes), file=out)
        if page is not None:
            print(f"\nThe live page of these failures: {page_url(page)}", file=out, flush=True)
        print("\n" + CLUSTER_NOTE, file=out)
        example = next((o for o in outcomes if o.scenario.name == EXAMPLE), None)
        if len(outcomes) == 1 or example is None:
            example = outcomes[0]
        print("\nIn full:\n\n" + render_example(example), file=out)
        bad = [o.scenario.name for o in outcomes if not o.ok]
        if bad:
            print(f"\nUNEXPECTED: {', '.join(bad)} (policy: {policy.source})", file=out)
        if stay:
            _stay_up(lab, out)
    return 1 if bad else 0


def page_url(page: Page) -> str:
    host = f"[{page.host}]" if ":" in page.host else page.host
    return f"http://{host}:{page.port}/"


def _stay_up(lab: Lab, out: TextIO) -> None:
    print(
        f"\nThe client sidecar is listening on {lab.url}. Try:\n"
        f"  curl -si -H 'Host: app.example.com' {lab.url}/\n"
        f"  curl -si -H 'Host: reviews.default.svc.cluster.local' -H 'x-subset: v2' {lab.url}/\n"
        "Ctrl-C to stop.",
        file=out,
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
