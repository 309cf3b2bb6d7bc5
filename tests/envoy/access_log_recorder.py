"""Record real access-log lines and local-reply bodies from a real Envoy, in three formats.

One Envoy listener with three file access logs: Envoy's default format (no log_format at
all), Istio's default text format, and Envoy Gateway's default JSON format. One route
per failure case sends to an upstream that fails that way. The lines it writes are what
`extproc diagnose` must read; `tests/corpus/lines/recorded.yaml` keeps a copy:

    .venv/bin/python -m tests.envoy.access_log_recorder > tests/corpus/lines/recorded.yaml
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import yaml

from extproc.accesslog import ISTIO_ACCESS_LOG_FORMAT
from extproc.lab.envoy import EnvoyProcess, free_port, wait_for_port
from extproc.lab.topology import LOOPBACK, cluster, http_connection_manager, route, virtual_host
from extproc.lab.upstreams import echo_upstream, status_upstream

HOST = "shop.default.svc.cluster.local"
# Envoy Gateway's default JSON access log (envoyproxy/gateway
# internal/xds/translator/accesslog.go, EnvoyTextLogFormat, 00175ad).
GATEWAY_JSON: dict[str, str] = {
    "start_time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "x-envoy-origin-path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "response_code_details": "%RESPONSE_CODE_DETAILS%",
    "connection_termination_details": "%CONNECTION_TERMINATION_DETAILS%",
    "upstream_transport_failure_reason": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "duration": "%DURATION%",
    "x-envoy-upstream-service-time": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    "x-forwarded-for": "%REQ(X-FORWARDED-FOR)%",
    "user-agent": "%REQ(USER-AGENT)%",
    "x-request-id": "%REQ(X-REQUEST-ID)%",
    ":authority": "%REQ(:AUTHORITY)%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "upstream_local_address": "%UPSTREAM_LOCAL_ADDRESS%",
    "downstream_local_address": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "requested_server_name": "%REQUESTED_SERVER_NAME%",
    "route_name": "%ROUTE_NAME%",
}
FORMATS = ("envoy", "istio", "envoy-gateway-json")

# case → (upstream kind, expected reason). The Host decides no_route; the rest by path.
CASES: dict[str, tuple[str, str | None]] = {
    "ok": ("echo", None),
    "app-503": ("app503", "upstream_app_error"),
    "refused": ("nothing", "upstream_refused"),
    "not-tls": ("tls-to-plaintext", "upstream_not_tls"),
    "closed": ("accept-and-close", "upstream_connection_closed"),
    "timeout": ("accept-and-hang", "upstream_timeout"),
    "no-cluster": ("missing-cluster", "cluster_not_found"),
    "no-route": ("", "no_route"),
}
# What a local-reply body alone supports: Envoy 1.40 no longer puts the transport failure
# reason in the body, so a refused port and TLS to a plaintext port read the same.
BODY_EXPECTED: dict[str, str] = {
    "refused": "upstream_failure",
    "not-tls": "upstream_failure",
    "closed": "upstream_connection_closed",
    "timeout": "upstream_timeout",
}
# Envoy's default format logs no code details: a connection failure is all it says.
NO_DETAILS_EXPECTED: dict[str, str] = {"refused": "upstream_failure", "not-tls": "upstream_failure"}
# A User-Agent with unescaped quotes, as Envoy logs it (issue 10, item 8).
QUOTED_AGENT = 'probe/1.0 "quoted" ua"'


def _listener(port: int, logs: dict[str, Path], clusters: list[str]) -> dict[str, Any]:
    routes = [
        route(name, f"outbound|8080||{name}.default.svc.cluster.local", prefix=f"/{name}")
        for name in clusters
    ]
    routes = [{**r, "route": {**r["route"], "timeout": "0.5s"}} for r in routes]
    manager = http_connection_manager("recorder", [virtual_host(HOST, *routes)])
    config = manager["typed_config"]
    config["route_config"]["validate_clusters"] = False
    config["access_log"] = [_file_log(logs[f], f) for f in FORMATS]
    return {
        "name": "recorder",
        "address": {"socket_address": {"address": LOOPBACK, "port_value": port}},
        "filter_chains": [{"filters": [manager]}],
    }


def _file_log(path: Path, form: str) -> dict[str, Any]:
    typed: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "path": str(path),
    }
    if form == "istio":
        source = {"inline_string": ISTIO_ACCESS_LOG_FORMAT.replace("\\n", "\n")}
        typed["log_format"] = {"text_format_source": source}
    elif form == "envoy-gateway-json":
        typed["log_format"] = {"json_format": GATEWAY_JSON}
    return {"name": "envoy.access_loggers.file", "typed_config": typed}


@contextmanager
def _socket_upstream(close: bool) -> Iterator[int]:
    """A TCP server that closes each connection at once, or holds it without answering."""
    server = socket.create_server((LOOPBACK, 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            if close:
                conn.close()
            else:
                held.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def _clusters(stack: ExitStack) -> list[dict[str, Any]]:
    ports = {
        "echo": stack.enter_context(echo_upstream()).port,
        "app503": stack.enter_context(status_upstream(503)).port,
        "nothing": free_port(),
        "accept-and-close": stack.enter_context(_socket_upstream(close=True)),
        "accept-and-hang": stack.enter_context(_socket_upstream(close=False)),
    }
    ports["tls-to-plaintext"] = ports["echo"]
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
            "UpstreamTlsContext"
        },
    }
    out = []
    for name, (kind, _) in CASES.items():
        if kind in ports:
            out.append(
                cluster(
                    f"outbound|8080||{name}.default.svc.cluster.local",
                    ports[kind],
                    tls=tls if kind == "tls-to-plaintext" else None,
                )
            )
    return out


def _request(port: int, case: str) -> bytes:
    host = "elsewhere.example.com" if case == "no-route" else HOST
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
    try:
        conn.request("GET", f"/{case}", headers={"Host": host, "User-Agent": QUOTED_AGENT})
        return conn.getresponse().read()
    finally:
        conn.close()


def record(workdir: Path) -> dict[str, object]:
    """Run Envoy, send one request per case; the lines of each log, and the bodies."""
    logs = {f: workdir / f"access-{f}.log" for f in FORMATS}
    with ExitStack() as stack:
        clusters = _clusters(stack)
        port = free_port()
        listener = _listener(port, logs, [c for c in CASES if c != "no-route"])
        bootstrap = {"static_resources": {"listeners": [listener], "clusters": clusters}}
        envoy = stack.enter_context(EnvoyProcess(bootstrap, workdir=workdir))
        wait_for_port(LOOPBACK, port)
        bodies = {case: _request(port, case).decode("utf-8", "replace") for case in CASES}
        lines = _wait_for_lines(logs, len(CASES))
        version = envoy.admin_get("/server_info")[1]
    return {
        "envoy": json.loads(version).get("version", "?"),
        "lines": lines,
        "bodies": bodies,
    }


def _wait_for_lines(
    logs: dict[str, Path], count: int, timeout: float = 10.0
) -> dict[str, list[str]]:
    """Each log's lines, once every log has `count` (Envoy flushes every 100 ms here)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = {f: p.read_text().splitlines() if p.exists() else [] for f, p in logs.items()}
        if all(len(v) >= count for v in lines.values()) or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def case_of(line: str) -> str:
    """The case a recorded line belongs to, by the path it logged."""
    return next(case for case in CASES if f"/{case}" in line)


def as_fixture(recorded: dict[str, object]) -> list[dict[str, object]]:
    """The records of `recorded.yaml`: one per line and per local-reply body."""
    out: list[dict[str, object]] = []
    lines = recorded["lines"]
    bodies = recorded["bodies"]
    assert isinstance(lines, dict) and isinstance(bodies, dict)
    for form, form_lines in lines.items():
        for line in form_lines:
            case = case_of(line)
            expected = CASES[case][1]
            if form == "envoy":
                expected = NO_DETAILS_EXPECTED.get(case, expected)
            out.append({"case": case, "form": form, "line": line, "expected": expected})
    for case, body in bodies.items():
        if case in BODY_EXPECTED:  # the others are the upstream's own body, or empty
            out.append(
                {"case": case, "form": "scan", "line": body, "expected": BODY_EXPECTED[case]}
            )
    return out


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="record-lines-") as tmp:
        recorded = record(Path(tmp))
    print(f"# Recorded from Envoy {recorded['envoy']} by tests/envoy/access_log_recorder.py;")
    print("# regenerate with: .venv/bin/python -m tests.envoy.access_log_recorder")
    yaml.safe_dump(as_fixture(recorded), sys.stdout, sort_keys=False, width=1000)


if __name__ == "__main__":
    main()
