"""The live page's table of failures (extproc/failures.py): caps, eviction, cost, recovery."""

from __future__ import annotations

import orjson

from extproc import failures as F
from extproc.diagnosis import Diagnosis, Evidence, classify
from extproc.failures import Failures, RequestFields, request_fields

REFUSED = Evidence(status=503, flags=1 << 5, code_details="upstream_reset_before_response_started"
                   "{remote_connection_failure|delayed_connect_error:_Connection_refused}",
                   cluster="outbound|80||reviews.default.svc.cluster.local",
                   upstream_address="10.0.0.7:9080", host="reviews:9080", has_attributes=True,
                   cluster_metadata='filter_metadata { key: "istio" value { fields { key: "config"'
                   ' value { string_value: "/apis/networking.istio.io/v1/namespaces/shop/'
                   'destination-rule/reviews" } } } }')  # fmt: skip


def diagnosis(cluster: str = REFUSED.cluster, **changes: object) -> Diagnosis:
    from dataclasses import replace

    found = classify(replace(REFUSED, cluster=cluster, **changes))  # type: ignore[arg-type]
    assert found is not None
    return found


class TestRequestFields:
    def test_keeps_method_path_and_id_only(self):
        """The query, the fragment and every other header value stay out of a sample."""
        fields = request_fields([(":method", "GET"), (":path", "/a/b?token=secret#x"),
                                 ("cookie", "s=1"), ("authorization", "Bearer t"),
                                 ("x-request-id", "abc")])  # fmt: skip
        assert fields == RequestFields("GET", "/a/b", "abc")
        assert "secret" not in repr(fields) and "Bearer" not in repr(fields)

    def test_path_parameters_cut_off(self):
        """A session id in the path's parameters (`;jsessionid=`) stays out of a sample."""
        fields = request_fields([(":path", "/cart;jsessionid=S3SSION?x=1")])
        assert fields.path == "/cart"

    def test_undecodable_bytes_still_make_json(self):
        """A path or id with bytes that are not UTF-8 (kept by the adapters as surrogate
        escapes) is recorded as U+FFFD, so the page's JSON can still be made."""
        raw = b"/caf\xe9/\xff".decode("utf-8", "surrogateescape")
        fields = request_fields([(":path", raw), ("x-request-id", raw), (":method", raw)])
        assert fields.path == "/caf\ufffd/\ufffd" == fields.request_id == fields.method
        table = Failures()
        table.record(diagnosis(), 1.0, fields)
        assert "/caf\ufffd/\ufffd" in orjson.dumps(table.snapshot(1.0)).decode()


# Values a hostile peer could put in our metadata namespace, or a hostile client in its
# request: each must come out a bounded, JSON-safe string with no query.
HUGE = "x" * 100_000
BYTES = b"/\xe9\xff\xfe".decode("utf-8", "surrogateescape") * 1000


class TestCarried:
    """The HTTP lane's request phase carries a sample's fields to the response phase."""

    def test_round_trip(self):
        """What the request phase carries, the response phase reads back the same."""
        fields = request_fields([(":method", "GET"), (":path", "/a?q=1"), ("x-request-id", "r1"),
                                 ("traceparent", f"00-{TRACE}-00f067aa0ba902b7-01")])  # fmt: skip
        carried = F.carry(fields)
        assert carried == {"sample_method": "GET", "sample_path": "/a", "sample_request_id": "r1",
                           "sample_trace_id": TRACE}  # fmt: skip
        assert F.carried_fields(orjson.loads(orjson.dumps(carried))) == fields
        assert F.carry(F.NO_REQUEST) == {}

    def test_hostile_request_values_are_capped(self):
        """Huge, undecodable, query-holding and cookie-looking request values carry at most
        MAX_TEXT characters each, valid UTF-8, no query, no path parameter."""
        headers = [(":method", HUGE), (":path", "/" + HUGE + "?token=s3cret"),
                   ("x-request-id", BYTES), ("traceparent", HUGE), ("x-b3-traceid", BYTES)]  # fmt: skip
        for path in ("/" + HUGE + "?token=s3cret", "/a;jsessionid=s3cret", "/?cookie=s3cret",
                     "/a#s3cret", BYTES):  # fmt: skip
            headers[1] = (":path", path)
            carried = F.carry(request_fields(headers))
            text = orjson.dumps(carried).decode()  # raises on a surrogate
            assert "s3cret" not in text
            assert all(len(v) <= F.MAX_TEXT for v in carried.values())
            assert "sample_trace_id" not in carried

    def test_hostile_namespace_values_are_checked_again(self):
        """Whatever the namespace holds when it comes back (wrong types, huge or undecodable
        strings, a query, a trace id that is not hex), the sample is bounded and clean."""
        hostile: list[object] = [HUGE, BYTES, 7, 1.5, None, True, ["GET"], {"a": "b"},
                                 "/p?token=s3cret", "/p;jsessionid=s3cret"]  # fmt: skip
        for value in hostile:
            namespace = {key: value for key in (F.CARRIED_METHOD, F.CARRIED_PATH,
                                                F.CARRIED_REQUEST_ID, F.CARRIED_TRACE_ID)}  # fmt: skip
            fields = F.carried_fields(namespace)
            assert all(len(v) <= F.MAX_TEXT for v in (fields.method, fields.path,
                                                      fields.request_id))  # fmt: skip
            assert fields.trace_id == ""
            assert "s3cret" not in fields.path
            table = Failures()
            table.record(diagnosis(), 1.0, fields)
            orjson.dumps(table.snapshot(1.0))
        good = {F.CARRIED_TRACE_ID: TRACE.upper(), F.CARRIED_PATH: 5}
        assert F.carried_fields(good) == RequestFields(trace_id=TRACE)
        assert F.carried_fields(None) is F.carried_fields({}) is F.NO_REQUEST


class TestRows:
    def test_one_row_per_cluster_and_reason(self):
        """Failures of one cluster with one reason share a row: counts, times, DestinationRule."""
        table = Failures()
        for at in (100.0, 130.0, 170.0):
            table.record(diagnosis(), at, RequestFields("GET", "/p", "r1"))
        (row,) = table.rows.values()
        view = table.row_view(row, 171.0)
        assert view["count"] == 3
        assert (view["first_seen"], view["last_seen"]) == (100.0, 170.0)
        assert view["where"] == "outbound"
        assert view["destination_rule"] == "shop/reviews"
        assert view["reason"] == diagnosis().reason and view["hint"]
        assert view["per_minute"][-2:] == [1, 2]  # minute 1 (100 s), minute 2 (130, 170 s)
        assert view["samples"][-1] == {
            "at": 170.0,
            "method": "GET",
            "path": "/p",
            "status": 503,
            "host": "reviews:9080",
            "request_id": "r1",
            "trace_id": "",
        }

    def test_shared_evidence_drops_what_differs(self):
        """Evidence the same in every failure of a row stays; an upstream that differs goes."""
        table = Failures()
        table.record(diagnosis(), 1.0)
        table.record(diagnosis(upstream_address="10.0.0.8:9080"), 2.0)
        (row,) = table.rows.values()
        assert "upstream" not in row.shared
        assert row.shared["flags"] == "UF"

    def test_per_minute_ring_forgets_an_hour_ago(self):
        """A slot reused an hour later starts from zero, not from the old minute's count."""
        table = Failures()
        table.record(diagnosis(), 0.0)
        table.record(diagnosis(), 3600.0)
        (row,) = table.rows.values()
        assert sum(row.per_minute(60)) == 1

    def test_recovered_after_quiet_time(self):
        """A row with no failure for the recovery time shows as recovered; before it, not."""
        table = Failures(recovered_after=60.0)
        table.record(diagnosis(), 1000.0)
        (row,) = table.rows.values()
        assert not table.row_view(row, 1059.0)["recovered"]
        assert table.row_view(row, 1060.0)["recovered"]


class TestCaps:
    def test_samples_per_row_capped(self):
        """A row keeps the last SAMPLES_PER_ROW samples, newest last."""
        table = Failures()
        for i in range(F.SAMPLES_PER_ROW + 3):
            table.record(diagnosis(), float(i), RequestFields("GET", f"/{i}", ""))
        (row,) = table.rows.values()
        assert [s.path for s in row.samples][-1] == f"/{F.SAMPLES_PER_ROW + 2}"
        assert len(row.samples) == F.SAMPLES_PER_ROW

    def test_recent_ring_capped(self):
        """The global ring keeps the last RECENT failures."""
        table = Failures()
        for i in range(F.RECENT + 10):
            table.record(diagnosis(f"outbound|80||s{i}.ns.svc.cluster.local"), float(i))
        assert len(table.recent) == F.RECENT

    def test_least_recently_seen_row_evicted_and_counted(self):
        """At the row cap a new row evicts the least recently seen one, and each eviction is counted."""
        evictions = []
        table = Failures(max_rows=3, on_evict=lambda: evictions.append(1))
        for name in ("a", "b", "c"):
            table.record(diagnosis(f"outbound|80||{name}"), 1.0)
        table.record(diagnosis("outbound|80||a"), 2.0)  # a is seen again: b is now the oldest
        table.record(diagnosis("outbound|80||d"), 3.0)
        assert [c for c, _ in table.rows] == ["outbound|80||c", "outbound|80||a", "outbound|80||d"]
        assert table.evicted == 1 and len(evictions) == 1

    def test_long_names_cut(self):
        """A cluster name longer than MAX_TEXT is kept cut to it."""
        table = Failures()
        table.record(diagnosis("outbound|80||" + "x" * 5000), 1.0)
        ((cluster, _),) = table.rows
        assert len(cluster) == F.MAX_TEXT


class TestCost:
    def test_recording_cost_does_not_grow_with_the_table(self, monkeypatch):
        """Recording into a table of 8n rows takes as many row steps as into one of n rows."""
        steps = {"n": 0}
        real = F.Row.add

        def counted(self, minute):  # counts the per-row work one record does
            steps["n"] += 1
            return real(self, minute)

        monkeypatch.setattr(F.Row, "add", counted)

        def cost(rows: int) -> int:
            table = Failures(max_rows=rows)
            for i in range(rows):
                table.record(diagnosis(f"c{i}"), 1.0)
            steps["n"] = 0
            walked = 0
            for i in range(100):
                table.record(diagnosis(f"c{i * 7 % rows}"), 2.0)
                walked += sum(1 for _ in table.changed_since(table.seq - 1))
            return steps["n"] + walked

        assert cost(100) == cost(800)

    def test_changed_since_walks_only_changed_rows(self):
        """After k records, catching up walks k rows whatever the table size."""
        table = Failures()
        for i in range(500):
            table.record(diagnosis(f"c{i}"), 1.0)
        seq = table.seq
        table.record(diagnosis("c3"), 2.0)
        table.record(diagnosis("c9"), 2.0)
        assert [r.cluster for r in table.changed_since(seq)] == ["c9", "c3"]

    def test_resumable_until_an_eviction(self):
        """A client behind an eviction must resync; one after it can catch up."""
        table = Failures(max_rows=2)
        table.record(diagnosis("a"), 1.0)
        seq = table.seq
        assert table.resumable(seq)
        table.record(diagnosis("b"), 1.0)
        table.record(diagnosis("c"), 1.0)
        assert not table.resumable(seq)
        assert table.resumable(table.seq)
        assert not table.resumable(table.seq + 5)


TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


class TestTraceIds:
    """A sample carries the trace id Envoy propagates, and nothing else from those headers."""

    def test_w3c_traceparent(self):
        """The trace id of a well-formed traceparent is kept."""
        headers = [("traceparent", f"00-{TRACE}-00f067aa0ba902b7-01")]
        assert request_fields(headers).trace_id == TRACE

    def test_b3_when_no_traceparent(self):
        """x-b3-traceid, 16 or 32 hex digits, any case, is the fallback."""
        assert request_fields([("x-b3-traceid", TRACE.upper())]).trace_id == TRACE
        assert request_fields([("x-b3-traceid", TRACE[:16])]).trace_id == TRACE[:16]

    def test_traceparent_wins_over_b3(self):
        """Both present: the W3C one."""
        headers = [("x-b3-traceid", "a" * 16), ("traceparent", f"00-{TRACE}-00f067aa0ba902b7-01")]
        assert request_fields(headers).trace_id == TRACE

    def test_malformed_ids_never_reach_a_link(self):
        """Non-hex, wrong length, all-zero or markup-carrying values give no trace id."""
        for traceparent, b3 in [
            (f"00-{'0' * 32}-00f067aa0ba902b7-01", ""),
            (f'00-{TRACE[:-1]}"-00f067aa0ba902b7-01', ""),
            ("", "javascript:alert(1)"),
            ("", "<script>x</script>"),
            ("", "a" * 20),
            ("", "0" * 16),
        ]:
            headers = [("traceparent", traceparent), ("x-b3-traceid", b3)]
            assert request_fields(headers).trace_id == "", (traceparent, b3)

    def test_snapshot_carries_the_docs_url(self):
        """The page gets the documentation site its reason links point into ("" : none)."""
        assert Failures().snapshot(1000.0)["docs_url"] == ""
        table = Failures(docs_url="https://docs.example/")
        assert table.snapshot(1000.0)["docs_url"] == "https://docs.example/"

    def test_snapshot_carries_the_id_and_the_template(self):
        """The page gets each sample's trace id and the operator's link template."""
        table = Failures(trace_url="https://jaeger.example/trace/{trace_id}")
        table.record(diagnosis(), 1000.0, RequestFields("GET", "/", "r1", TRACE), "outbound")
        snapshot = table.snapshot(1000.0)
        assert snapshot["trace_url"] == "https://jaeger.example/trace/{trace_id}"
        assert snapshot["rows"][0]["samples"][0]["trace_id"] == TRACE
