"""`extproc diagnose` says nothing about innocent text (issue 19 item 6).

A bare flag word (`DC`, `UH`), a status alone or an application's JSON `{"status": 503}`
is evidence only inside Envoy-shaped structure. tests/corpus/negative.txt holds ordinary
logs (applications, nginx, kubectl, Go and Java, Python, Istio's own proxy logs that are
not access logs); none of its texts may get a diagnosis.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from extproc.accesslog import read_text
from extproc.accesslog.summary import lines_of, summarise
from extproc.diagnosis import classify

NEGATIVE = Path(__file__).parent / "negative.txt"
TEXTS = [
    line
    for line in NEGATIVE.read_text(encoding="utf-8").splitlines()
    if line.strip() and not line.startswith("#")
]


class TestNegativeCorpus:
    @pytest.mark.parametrize("text", TEXTS, ids=[f"line{n}" for n in range(len(TEXTS))])
    def test_no_diagnosis(self, text: str) -> None:
        """An ordinary log line that is not Envoy's gets no diagnosis."""
        assert classify(read_text(text).evidence) is None

    def test_whole_file_as_a_log(self) -> None:
        """Read as one log, the corpus has no failures."""
        summary = summarise(lines_of(io.BytesIO(NEGATIVE.read_bytes())))
        print(f"negative corpus: {summary.failures} diagnosed of {len(TEXTS)} texts")
        assert summary.failures == 0


class TestEnvoyShapeStillReads:
    @pytest.mark.parametrize(
        ("text", "reason"),
        [
            ('"GET / HTTP/1.1" 502 UH 0 19 0 - "-"', "no_healthy_upstream"),
            ("status=503 response_flags=UF,URX", "upstream_failure"),
            (
                '{"response_code": 503, "response_flags": "DC", "upstream_cluster": "outbound|80||a"}',
                "client_disconnected",
            ),
            (
                "503 UC outbound|8080||ratings.default.svc.cluster.local",
                "upstream_connection_closed",
            ),
        ],
    )
    def test_flags_inside_envoy_structure(self, text: str, reason: str) -> None:
        """The same words inside Envoy's structure are still evidence."""
        diagnosis = classify(read_text(text).evidence)
        assert diagnosis is not None and diagnosis.reason == reason
