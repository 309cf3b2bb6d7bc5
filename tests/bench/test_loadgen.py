"""Parsing what wrk and h2load print, and the percentile arithmetic (no load is generated)."""

from __future__ import annotations

import pytest

from bench.loadgen import (
    LoadError,
    parse_h2load_log,
    parse_h2load_seconds,
    parse_wrk,
    percentiles,
)

# wrk 4.1 (Debian) against Envoy's refused-upstream 503, 8 connections.
WRK_503 = """\
Running 1s test @ http://127.0.0.1:32965/
  2 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   476.57us  237.93us   7.63ms   91.68%
    Req/Sec     8.40k     1.27k    9.87k    70.00%
  Latency Distribution
     50%  414.00us
     75%  517.00us
     90%  676.00us
     99%    1.12ms
  16730 requests in 1.00s, 3.70MB read
  Non-2xx or 3xx responses: 16730
Requests/sec:  16722.09
Transfer/sec:      3.70MB
"""

WRK_WITH_SOCKET_ERRORS = """\
Running 5s test @ http://127.0.0.1:40000/
  2 threads and 64 connections
  Latency Distribution
     50%    1.50ms
     75%    2.00ms
     90%    3.00ms
     99%    1.02s
  200000 requests in 5.01s, 20.00MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
Requests/sec:  39920.16
"""

# h2load 1.52: the summary it prints, and lines of its --log-file.
H2LOAD_SUMMARY = """\
finished in 300.66ms, 4163.33 req/s, 943.25KB/s
requests: 1249 total, 1250 started, 1249 done, 0 succeeded, 1249 failed, 0 errored, 0 timeout
"""


class TestParseWrk:
    def test_requests_time_and_percentiles_in_milliseconds(self):
        """Counts, wrk's own elapsed time and the p50/p99 lines are read, units converted to ms."""
        result = parse_wrk(WRK_503, 8)
        assert (result.requests, result.seconds, result.connections) == (16730, 1.0, 8)
        assert result.p50_ms == pytest.approx(0.414)
        assert result.p99_ms == pytest.approx(1.12)
        assert result.rps == pytest.approx(16730)

    def test_non_2xx_responses_are_counted_apart(self):
        """wrk only tells 2xx/3xx from the rest: every refused-upstream 503 lands in `other`."""
        assert parse_wrk(WRK_503, 8).statuses == {"other": 16730}

    def test_socket_errors_are_summed_and_seconds_converted(self):
        """Read and timeout errors add up; a 1.02s percentile becomes 1020 ms."""
        result = parse_wrk(WRK_WITH_SOCKET_ERRORS, 64)
        assert result.errors == 5
        assert result.p99_ms == pytest.approx(1020)
        assert result.statuses == {"2xx/3xx": 200000}

    def test_output_without_percentiles_is_an_error(self):
        """Without --latency's distribution the parser refuses, quoting the output."""
        with pytest.raises(LoadError, match="unexpected wrk output"):
            parse_wrk("  100 requests in 1.00s, 1MB read\n", 1)


class TestParseH2load:
    def test_duration_from_the_summary(self):
        """ "finished in 300.66ms" is 0.30066 seconds."""
        assert parse_h2load_seconds(H2LOAD_SUMMARY) == pytest.approx(0.30066)

    def test_log_gives_exact_percentiles_and_status_classes(self):
        """Each log line is one request: its status class is counted and its duration ranked."""
        lines = [
            f"17952654178{i:05d}\t{503 if i % 2 else 200}\t{(i + 1) * 100}" for i in range(100)
        ]
        result = parse_h2load_log("\n".join(lines), 1, 2.0)
        assert result.requests == 100
        assert result.statuses == {"2xx": 50, "5xx": 50}
        assert result.p50_ms == pytest.approx(5.05)
        assert result.p99_ms == pytest.approx(9.901)
        assert result.rps == 50

    def test_failed_requests_are_errors_not_latencies(self):
        """A status of 0 (no response) counts as an error and is left out of the percentiles."""
        result = parse_h2load_log("1\t200\t1000\n2\t0\t5000000\n", 1, 1.0)
        assert (result.requests, result.errors, result.p99_ms) == (1, 1, 1.0)

    def test_an_empty_log_is_an_error(self):
        """No completed request means no measurement, and says so."""
        with pytest.raises(LoadError, match="no request"):
            parse_h2load_log("", 1, 1.0)


class TestPercentiles:
    def test_one_value_is_both_percentiles(self):
        """A single sample is its own p50 and p99."""
        assert percentiles([3.0]) == (3.0, 3.0)

    def test_percentiles_are_ordered_and_interpolated(self):
        """p50 of 1..101 is 51 and p99 is 100."""
        assert percentiles([float(v) for v in range(1, 102)]) == (51.0, 100.0)
