"""`extproc demo`: the lab's scenarios through a real Envoy and the real server, as a table.

It exits non-zero when any scenario gets another reason, status or action list than
expected, so `make run` doubles as a smoke test on a fresh machine.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from extproc.config import Policy
from extproc.lab.background import BackgroundServer
from extproc.lab.scenarios import DEMO_POLICY, HYGIENE_SCENARIOS, SCENARIOS, Scenario
from extproc.lab.topology import Lab, Response
from extproc.server import ExtProcServer

HINT_WIDTH = 60


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


def run_scenario(lab: Lab, scenario: Scenario) -> Outcome:
    response = lab.request(scenario.host, scenario.path, scenario.headers)
    diagnosis = response.header("x-extproc-diagnosis")
    reason = diagnosis.split(";", 1)[0] if diagnosis else None
    actions = tuple(
        m.split(";headers=")[0] + (";report" if m.endswith(";report") else "")
        for m in split_list(response.header("x-extproc-actions"))
    )
    return Outcome(scenario, response, reason, actions)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def render_table(outcomes: list[Outcome]) -> str:
    rows = [("", "request", "status", "reason", "hint", "actions")]
    for o in outcomes:
        rows.append(
            (
                "ok" if o.ok else "FAIL",
                f"{o.scenario.host}{o.scenario.path}",
                str(o.response.status),
                o.reason or "-",
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
    """One annotated failure as curl -i would show its extproc headers."""
    s = outcome.scenario
    shown = [
        f"$ curl -si -H 'Host: {s.host}' http://127.0.0.1:PORT{s.path}",
        f"HTTP/1.1 {outcome.response.status}",
    ]
    shown += [
        f"{name}: {value}"
        for name, value in outcome.response.headers
        if name.startswith("x-extproc-")
    ]
    return "\n".join(shown)


def run_demo(policy: Policy | None = None, *, stay: bool = True, out: TextIO = sys.stdout) -> int:
    """Start the server, Envoy and the upstreams; print the table; wait for Ctrl-C if `stay`."""
    policy = policy or DEMO_POLICY
    with (
        tempfile.TemporaryDirectory(prefix="extproc-demo-") as workdir,
        BackgroundServer(ExtProcServer(policy)) as server,
        Lab(("127.0.0.1", server.port), Path(workdir)) as lab,
    ):
        outcomes = [run_scenario(lab, s) for s in (*SCENARIOS, *HYGIENE_SCENARIOS)]
        print(render_table(outcomes), file=out)
        failing = next(o for o in outcomes if o.scenario.name == "requires_mtls")
        print("\nOne of them in full:\n\n" + render_example(failing), file=out)
        bad = [o.scenario.name for o in outcomes if not o.ok]
        if bad:
            print(f"\nUNEXPECTED: {', '.join(bad)} (policy: {policy.source})", file=out)
        if stay:
            _stay_up(lab, out)
    return 1 if bad else 0


def _stay_up(lab: Lab, out: TextIO) -> None:
    print(
        f"\nEnvoy is listening on {lab.url}. Try:\n"
        f"  curl -si -H 'Host: mtls.demo' {lab.url}/\n"
        f"  curl -si -H 'Host: store.example.com' {lab.url}/\n"
        "Ctrl-C to stop.",
        file=out,
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
