"""What fails right now, for the live page (`extproc.page`): plain data, no I/O.

One row per (cluster, reason) seen failing, kept in least-recently-seen order so that
recording is O(1) (a dict lookup, a move to the end, a slot of a fixed ring) and the
oldest row is the one evicted when the table is full. Every size is a named constant
below; the page's limits table in docs/page.md lists them.

A sample keeps the request's method, path without its query, status, Host, request id
and trace id: never another header value, a query string, a body or a cookie. The
adapters pick the request's fields (`request_fields`) only while the page is on; a clean
response never reaches `record`. Over the HTTP lane the response phase is a separate
POST, so the request phase carries those fields in our metadata namespace (`carry`) and
the response phase reads them back (`carried_fields`), checked again on the way in.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from extproc.diagnosis import Diagnosis
from extproc.filter_config import SAMPLE_ATTRIBUTES

# ---- Limits (docs/page.md, "Limits").
# Rows, one per (cluster, reason): Istio names one cluster per service port and subset, so
# a large mesh has thousands; each row costs about 6.5 KB (bench/page_memory.py).
MAX_ROWS = 2000
SAMPLES_PER_ROW = 5  # the last few requests of a row; older ones drop off
RECENT = 200  # the global ring of recent failures, newest last (`/api/failures`)
MINUTES = 60  # the per-minute counts: the last hour, one slot a minute
MAX_TEXT = 256  # any string a sample or a row keeps, in characters
# A row with no failure for this long shows as recovered (`serve --ui-recovered-after`).
RECOVERED_SECONDS = 60.0

# Where the filter sits, from Istio's cluster name when the request phase did not say.
_DIRECTIONS = (("outbound|", "outbound"), ("inbound|", "inbound"))
# The evidence a row shows as shared: the same for every failure of the row, or dropped.
SHARED_KEYS = ("flags", "detail", "upstream", "route", "policy", "tls", "sni", "alpn", "grpc")


def _cut(value: object) -> str:
    """At most MAX_TEXT characters of valid UTF-8: the adapters keep undecodable bytes as
    surrogate escapes, which JSON (the page's, Envoy's metadata) cannot carry; each becomes
    U+FFFD."""
    text = str(value)[:MAX_TEXT]
    if text.isascii():
        return text
    try:  # the undecodable bytes back, one U+FFFD each
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no byte made (a JSON \ud800 escape)
        data = text.encode("utf-8", "surrogatepass")
    return data.decode("utf-8", "replace")[:MAX_TEXT]


def sample_path(path: str) -> str:
    """The path without its query, fragment or path parameters (`;jsessionid=...` is a
    session id in a URL), at most MAX_TEXT characters (cut first: the same prefix)."""
    return _cut(path[:MAX_TEXT].split("?", 1)[0].split("#", 1)[0].split(";", 1)[0])


@dataclass(frozen=True, slots=True)
class RequestFields:
    """The request's fields a sample shows; "" when absent."""

    method: str = ""
    path: str = ""  # without its query
    request_id: str = ""
    trace_id: str = ""  # lowercase hex, from traceparent or x-b3-traceid, checked


_HEX = frozenset("0123456789abcdef")


def trace_id_of(traceparent: str, b3: str) -> str:
    """The trace id Envoy propagates: W3C `traceparent` (version-traceid-parent-flags, the
    trace id 32 hex digits, not all zero), else B3's `x-b3-traceid` (16 or 32 hex digits);
    "" when neither is well formed, so nothing else ever reaches a link."""
    parts = traceparent.split("-")
    if len(parts) >= 4 and len(parts[1]) == 32 and set(parts[1]) <= _HEX and parts[1].strip("0"):
        return parts[1]
    b3 = b3.lower()
    if len(b3) in (16, 32) and set(b3) <= _HEX and b3.strip("0"):
        return b3
    return ""


NO_REQUEST = RequestFields()


def request_fields(headers: Iterable[tuple[str, str]]) -> RequestFields:
    """Method, path (query cut off), x-request-id and the trace id from the request
    headers; nothing else."""
    method = path = request_id = traceparent = b3 = ""
    for name, value in headers:
        if name == ":method":
            method = value
        elif name == ":path":
            path = value
        elif name == "x-request-id":
            request_id = value
        elif name == "traceparent":
            traceparent = value[:MAX_TEXT]
        elif name == "x-b3-traceid":
            b3 = value[:MAX_TEXT]
    trace_id = trace_id_of(traceparent, b3)
    return RequestFields(_cut(method), sample_path(path), _cut(request_id), trace_id)


def attribute_fields(text: Callable[[str], str]) -> RequestFields:
    """The sample's request fields from the attributes a response-only filter asks for
    (`filter_config.SAMPLE_ATTRIBUTES`; `text` reads one, "" if absent), checked as the
    request headers are."""
    return request_fields((header, text(attribute)) for attribute, header in SAMPLE_ATTRIBUTES)


# Our metadata namespace's keys for a sample's request fields (HTTP lane, page on only).
CARRIED_METHOD = "sample_method"
CARRIED_PATH = "sample_path"
CARRIED_REQUEST_ID = "sample_request_id"
CARRIED_TRACE_ID = "sample_trace_id"


def carry(fields: RequestFields) -> dict[str, str]:
    """The request phase's fields for our metadata namespace: the set ones only."""
    pairs = (
        (CARRIED_METHOD, fields.method),
        (CARRIED_PATH, fields.path),
        (CARRIED_REQUEST_ID, fields.request_id),
        (CARRIED_TRACE_ID, fields.trace_id),
    )
    return {key: value for key, value in pairs if value}


def carried_fields(namespace: Mapping[str, object] | None) -> RequestFields:
    """The fields `carry` wrote, as the response phase's POST brings them back. Each is
    checked again (a peer, or another filter writing our namespace, could send anything):
    a string or nothing, cut to MAX_TEXT, the path without its query, a hex trace id."""
    if not namespace:
        return NO_REQUEST

    def text(key: str) -> str:
        value = namespace.get(key)
        return value if isinstance(value, str) else ""

    return RequestFields(
        _cut(text(CARRIED_METHOD)),
        sample_path(text(CARRIED_PATH)),
        _cut(text(CARRIED_REQUEST_ID)),
        trace_id_of("", text(CARRIED_TRACE_ID)[:MAX_TEXT]),
    )


@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    method: str
    path: str
    status: int | None
    host: str
    request_id: str
    trace_id: str = ""


@dataclass(slots=True)
class Row:
    """One (cluster, reason): counts, times, the evidence its failures share, samples."""

    cluster: str
    reason: str
    hint: str
    where: str
    destination_rule: str
    first_seen: float
    last_seen: float = 0.0
    count: int = 0
    seq: int = 0  # the store's sequence number when this row last changed
    shared: dict[str, str] = field(default_factory=dict)
    samples: deque[Sample] = field(default_factory=lambda: deque(maxlen=SAMPLES_PER_ROW))
    # Per-minute counts: slot m % MINUTES holds minute m's count while minutes[slot] == m.
    counts: list[int] = field(default_factory=lambda: [0] * MINUTES)
    minutes: list[int] = field(default_factory=lambda: [-1] * MINUTES)

    def add(self, minute: int) -> None:
        slot = minute % MINUTES
        if self.minutes[slot] != minute:
            self.minutes[slot], self.counts[slot] = minute, 0
        self.counts[slot] += 1

    def per_minute(self, now_minute: int) -> list[int]:
        """The last hour's counts, oldest first, ending with the current minute."""
        out = []
        for m in range(now_minute - MINUTES + 1, now_minute + 1):
            slot = m % MINUTES
            out.append(self.counts[slot] if self.minutes[slot] == m else 0)
        return out


def where_of(direction: str, cluster: str) -> str:
    """Edge, outbound or inbound: the request phase's direction, else Istio's cluster prefix."""
    if direction:
        return direction
    return next((name for prefix, name in _DIRECTIONS if cluster.startswith(prefix)), "")


class Failures:
    """The table of failing (cluster, reason) rows and the ring of recent failures.

    `on_evict` is called once per row evicted (the page counts it in a metric).
    """

    def __init__(
        self,
        max_rows: int = MAX_ROWS,
        recovered_after: float = RECOVERED_SECONDS,
        on_evict: Callable[[], None] | None = None,
        trace_url: str = "",
        docs_url: str = "",
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"the failures table needs at least 1 row, got {max_rows}")
        self.max_rows = max_rows
        self.recovered_after = recovered_after
        # `serve --ui-trace-url`: a link template with `{trace_id}`; "" shows ids as text.
        self.trace_url = trace_url
        # `serve --ui-docs-url`: the documentation site, ending in "/", where each reason's
        # entry is `reasons/#reason-CODE`; "" names the file and the anchor as text.
        self.docs_url = docs_url
        self.on_evict = on_evict
        self.rows: OrderedDict[tuple[str, str], Row] = OrderedDict()
        self.recent: deque[tuple[int, str, str, Sample]] = deque(maxlen=RECENT)
        self.seq = 0  # one more per failure recorded
        self.evicted = 0
        self.evicted_seq = 0  # the sequence number at the last eviction

    def record(
        self,
        diagnosis: Diagnosis,
        now: float,
        request: RequestFields = NO_REQUEST,
        direction: str = "",
    ) -> None:
        """One failure, in O(1): the row's counters, its shared evidence, a sample."""
        evidence = dict(diagnosis.evidence)
        cluster = _cut(evidence.get("cluster", ""))
        key = (cluster, diagnosis.reason)
        self.seq += 1
        row = self.rows.get(key)
        if row is None:
            row = self._new_row(key, diagnosis, evidence, direction, now)
        else:
            self.rows.move_to_end(key)
            shared = row.shared
            for name in [n for n, v in shared.items() if _cut(evidence.get(n, "")) != v]:
                del shared[name]  # at most len(SHARED_KEYS) names: still O(1)
        row.count += 1
        row.last_seen = now
        row.seq = self.seq
        row.add(int(now // 60))
        status = evidence.get("status")
        sample = Sample(now, request.method, request.path,
                        status if isinstance(status, int) else None,
                        _cut(evidence.get("host", "")), request.request_id,
                        request.trace_id)  # fmt: skip
        row.samples.append(sample)
        self.recent.append((self.seq, cluster, diagnosis.reason, sample))

    def _new_row(
        self,
        key: tuple[str, str],
        diagnosis: Diagnosis,
        evidence: dict[str, str | int],
        direction: str,
        now: float,
    ) -> Row:
        if len(self.rows) >= self.max_rows:
            self.rows.popitem(last=False)  # the least recently seen
            self.evicted += 1
            self.evicted_seq = self.seq
            if self.on_evict is not None:
                self.on_evict()
        cluster, reason = key
        row = Row(
            cluster, reason, _cut(diagnosis.hint), where_of(direction, cluster),
            _cut(evidence.get("dr", "")), first_seen=now,
            shared={k: _cut(evidence[k]) for k in SHARED_KEYS if k in evidence},
        )  # fmt: skip
        self.rows[key] = row
        return row

    def changed_since(self, seq: int) -> Iterator[Row]:
        """The rows changed after sequence number `seq`, newest first: the walk stops at the
        first older row, since every change moves its row to the end."""
        for row in reversed(self.rows.values()):
            if row.seq <= seq:
                return
            yield row

    def resumable(self, seq: int) -> bool:
        """Whether a client that saw everything up to `seq` can catch up with the changed rows
        alone: no row was evicted since (it would keep showing one that is gone)."""
        return self.evicted_seq <= seq <= self.seq

    def row_view(self, row: Row, now: float) -> dict[str, Any]:
        """A row as the page shows it (JSON-ready)."""
        return {
            "cluster": row.cluster,
            "reason": row.reason,
            "hint": row.hint,
            "where": row.where,
            "destination_rule": row.destination_rule,
            "count": row.count,
            "first_seen": row.first_seen,
            "last_seen": row.last_seen,
            "recovered": now - row.last_seen >= self.recovered_after,
            "per_minute": row.per_minute(int(now // 60)),
            "shared": dict(row.shared),
            "samples": [sample_view(s) for s in row.samples],
        }

    def snapshot(self, now: float) -> dict[str, Any]:
        """Every row, most recently seen first, and the recent failures, newest first."""
        return {
            "seq": self.seq,
            "now": now,
            "recovered_after": self.recovered_after,
            "trace_url": self.trace_url,
            "docs_url": self.docs_url,
            "evicted": self.evicted,
            "rows": [self.row_view(r, now) for r in reversed(self.rows.values())],
            "recent": [
                {"seq": seq, "cluster": cluster, "reason": reason, **sample_view(s)}
                for seq, cluster, reason, s in reversed(self.recent)
            ],
        }


def sample_view(sample: Sample) -> dict[str, Any]:
    return {
        "at": sample.at,
        "method": sample.method,
        "path": sample.path,
        "status": sample.status,
        "host": sample.host,
        "request_id": sample.request_id,
        "trace_id": sample.trace_id,
    }
