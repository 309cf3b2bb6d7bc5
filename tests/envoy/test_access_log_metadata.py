"""The doctor's metadata as Envoy 1.40 prints it in a text access log, read by `diagnose`.

`%DYNAMIC_METADATA(extproc_doctor)%` in a text format prints the namespace as one JSON
object, its keys sorted (`{"actions":…,"cluster":…,"hint":…,"reason":…}`): the reason
comes after the hint and whatever other keys the two phases wrote. Here Envoy's own
header-to-metadata filter writes the namespace (the keys the server writes, in the order
it writes them), so the line is Envoy's printing, not ours.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from extproc.accesslog import read_text
from extproc.diagnosis import HINTS, classify
from extproc.lab import EnvoyProcess

pytestmark = pytest.mark.envoy

# Written in the order the server writes them: the request phase's, then the diagnosis.
WRITTEN = (
    ("actions", "strip-hop-by-hop"),
    ("reason", "upstream_refused"),
    ("hint", HINTS["upstream_refused"]),
    ("cluster", "outbound|9080||reviews.default.svc.cluster.local"),
    ("flags", "UF"),
)
# Envoy's default text format, with the doctor's namespace at the end.
FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "
    '"%UPSTREAM_HOST%" %DYNAMIC_METADATA(extproc_doctor)%\n'
)


def bootstrap(log: Path) -> dict[str, Any]:
    rules = [
        {"header": f"x-meta-{key}",
         "on_header_present": {"metadata_namespace": "extproc_doctor", "key": key,
                               "type": "STRING"}}
        for key, _ in WRITTEN
    ]  # fmt: skip
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "meta",
        "access_log": [{"name": "file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(log), "log_format": {"text_format_source": {"inline_string": FORMAT}}}}],
        "http_filters": [
            {"name": "meta", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config",
                "request_rules": rules}},
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "direct_response": {"status": 503}}]}]},
    }  # fmt: skip
    listener = {
        "name": "meta",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [{"filters": [
            {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}],
    }  # fmt: skip
    return {"static_resources": {"listeners": [listener]}}


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The access-log line Envoy wrote for one request with the namespace filled in."""
    log = tmp_path_factory.mktemp("meta") / "access.log"
    with EnvoyProcess(bootstrap(log)) as envoy:
        (port,) = envoy.listener_ports().values()
        headers = {f"x-meta-{key}": value for key, value in WRITTEN}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/reviews/0", headers=headers)
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(request, timeout=10)
        deadline = time.monotonic() + 10
        while not (log.exists() and log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)  # Envoy flushes its access log on a timer
        return log.read_text().strip()


def test_envoy_prints_the_namespace_with_its_keys_sorted(line: str) -> None:
    """The premise: the reason comes last, after the hint and the request phase's keys."""
    printed = line[line.index("{") :]
    assert printed.startswith('{"actions":')
    assert printed.index('"hint":') < printed.index('"reason":')


def test_diagnose_reads_the_doctors_reason_and_hint_from_the_line(line: str) -> None:
    """`extproc diagnose` takes the reason and hint the doctor wrote (before: neither,
    since it looked for the reason first)."""
    reading = read_text(line)
    assert (reading.evidence.doctor_reason, reading.evidence.doctor_hint) == (
        "upstream_refused",
        HINTS["upstream_refused"],
    )
    diagnosis = classify(reading.evidence)
    assert diagnosis is not None and diagnosis.reason == "upstream_refused"
