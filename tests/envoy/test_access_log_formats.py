"""Envoy 1.40 writes access logs in three formats; `extproc diagnose` reads each exactly."""

from __future__ import annotations

import pytest

from extproc.accesslog import read_text
from extproc.diagnosis import classify

from .access_log_recorder import as_fixture, record

pytestmark = pytest.mark.envoy


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, object]]:
    """One recording run: every case through Envoy, every line of the three logs."""
    return as_fixture(record(tmp_path_factory.mktemp("access-logs")))


def test_every_case_is_logged_in_every_format(recorded: list[dict[str, object]]) -> None:
    """Envoy logged one line per case in each of the three formats."""
    forms = {(r["form"], r["case"]) for r in recorded}
    assert {f for f, _ in forms} >= {"envoy", "istio", "envoy-gateway-json"}
    assert len([r for r in recorded if r["form"] == "istio"]) == 8


def test_lines_read_exactly_and_classify(recorded: list[dict[str, object]]) -> None:
    """Each live line is read in its exact format and gets the reason of its case."""
    for r in recorded:
        reading = read_text(str(r["line"]))
        diagnosis = classify(reading.evidence)
        got = diagnosis.reason if diagnosis else None
        assert (r["case"], reading.form, got) == (r["case"], r["form"], r["expected"])
