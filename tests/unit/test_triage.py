"""The response phase's triage: shared Evidence for repeated inputs, with a bounded memory."""

from __future__ import annotations

from extproc import core
from extproc.diagnosis import is_envoy_failure


class TestTriageCache:
    def test_repeated_inputs_share_one_evidence(self):
        """Two clean 200s with the same attributes get the very same Evidence, still clean."""
        signs = {":status": b"200", "x-envoy-upstream-service-time": b"2"}
        first = core.triage(signs, has_attributes=True, flags=0, code=200, details="via_upstream")
        again = core.triage(dict(signs), has_attributes=True, flags=0, code=200,
                            details="via_upstream")  # fmt: skip
        assert again is first
        assert not is_envoy_failure(first)

    def test_inputs_that_differ_are_told_apart(self):
        """A refused upstream's 503 with the UF flag is a failure beside a cached clean 200."""
        core.triage({":status": b"200"}, has_attributes=True, flags=0, code=200,
                    details="via_upstream")  # fmt: skip
        failing = core.triage({":status": b"503"}, has_attributes=True, flags=0x20, code=503,
                              details="upstream_reset_before_response_started{connection_failure}")  # fmt: skip
        assert failing.status == 503 and failing.has_attributes
        assert is_envoy_failure(failing)

    def test_ever_new_details_keep_the_cache_bounded(self):
        """A peer sending a new code_details on every message fills at most TRIAGE_CACHE_SIZE entries."""
        for n in range(4 * core.TRIAGE_CACHE_SIZE):
            core.triage({":status": b"200"}, has_attributes=True, flags=0, code=200,
                        details=f"detail-{n}" * 100)  # fmt: skip
        assert core._triaged.cache_info().currsize <= core.TRIAGE_CACHE_SIZE
