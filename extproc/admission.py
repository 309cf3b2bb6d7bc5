"""The gRPC door: which streams the server admits, and which it closes.

Strategy. Envoy opens one stream per HTTP request and writes its first message (the
request headers, or the response headers of a response-only filter) in the same write as
the stream's HEADERS frame, then waits for the answer. A peer that opens streams and sends
nothing is not an Envoy. Without a door, `--max-streams` such streams lock every Envoy
out: each later stream is refused, Envoy fails open, and the mesh loses its protections
while health still says SERVING. So:

- a stream must send its first message within `FIRST_MESSAGE_SECONDS`, and then a message
  at least every `idle_seconds` (the upstream's response time lies between the request
  and the response headers, so this one is long);
- at capacity a new stream takes the place of a stream that has sent nothing for
  `PENDING_GRACE_SECONDS` (the oldest such), else of the least recently heard stream of
  the peer (IP address) that holds the most streams, if that peer holds more than the
  newcomer's; only when neither exists is the new stream refused.

So idle streams from one address can never hold more than their share against an Envoy
at another, and silent ones not even that. The table is plain data and a clock, no gRPC:
`extproc.server` turns its answers into statuses, counters and log lines.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

# Every limit of the gRPC door, in one place (docs/operations.md, threat model T12).
# Streams open at once (`--max-streams`): each costs a task and grpc's per-call state.
MAX_STREAMS = 1000
# Envoy sends its first message with the stream; one that has not arrived by then is not
# coming (Envoy gave up on it after its own message_timeout, 0.5 s in our filters).
FIRST_MESSAGE_SECONDS = 2.0
# At capacity, a stream that has sent nothing for this long gives its place to a new one:
# far above a message's delivery plus one turn of a busy loop, so Envoy's young streams
# are never the ones evicted.
PENDING_GRACE_SECONDS = 0.1
# Between two messages of a stream (`--stream-idle-timeout`). The gap between the request
# and the response headers is the upstream's response time; Envoy's own HCM resets a
# request on which nothing moves for 5 minutes (stream_idle_timeout's default), so
# response headers later than that are rare. A stream closed for idling ends with OK and
# Envoy skips its response phase: that response goes unannotated, the request is served.
STREAM_IDLE_SECONDS = 300.0
# The largest ProcessingRequest (`--max-message-bytes`), checked by grpc before parsing.
# Envoy's header limits default to 60 KiB per header block (max_request_headers_kb,
# max_response_headers_kb); 1 MiB holds that many times over with the attributes. An
# operator who raises Envoy's limit (up to 8192 KiB) raises this one with it.
MAX_MESSAGE_BYTES = 1024 * 1024
# An HTTP/2 connection with no stream for this long is closed (GOAWAY); Envoy reconnects
# on its next request. Bounds what an idle peer's connections cost.
CONNECTION_IDLE_SECONDS = 300.0
# No per-connection stream cap (grpc.max_concurrent_streams): measured with Envoy 1.40,
# 64 concurrent requests against a cap of 4 per connection, Envoy opened 16 connections
# (it honours SETTINGS_MAX_CONCURRENT_STREAMS with more connections, not a queue), but
# 877 of 9478 streams failed open: those it sent on a new connection before the server's
# SETTINGS arrived were refused. And an attacker opens more connections anyway; the door
# above counts by address instead.
# The other streaming RPCs on the port, health's Watch and server reflection, each at most
# this many at once (RESOURCE_EXHAUSTED beyond): probes use the unary Check, reflection
# is an operator's grpcurl. They are outside the door, so they get a small cap of their
# own instead of sharing --max-streams with Envoy.
MAX_SIDE_STREAMS = 16
# How often the deadlines are checked: a stream may outlive its deadline by this much.
SWEEP_SECONDS = 0.25
# At most one warning per limit this often; the counters count every stream.
WARN_INTERVAL_SECONDS = 10.0

# Why a stream was refused or closed: the `limit` label of the counters.
REFUSED_MAX_STREAMS = "max_streams"
CLOSED_FIRST_MESSAGE = "first_message_timeout"
CLOSED_IDLE = "idle_timeout"
CLOSED_SILENT = "evicted_silent"
CLOSED_FAIR_SHARE = "evicted_fair_share"
REFUSALS = (REFUSED_MAX_STREAMS,)
CLOSINGS = (CLOSED_FIRST_MESSAGE, CLOSED_IDLE, CLOSED_SILENT, CLOSED_FAIR_SHARE)


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """The limits an operator may tune (`extproc serve` options), checked once."""

    max_streams: int = MAX_STREAMS
    idle_seconds: float = STREAM_IDLE_SECONDS
    max_message_bytes: int = MAX_MESSAGE_BYTES

    def __post_init__(self) -> None:
        if self.max_streams < 1:
            raise ValueError(f"--max-streams must be at least 1, got {self.max_streams}")
        if not (math.isfinite(self.idle_seconds) and self.idle_seconds >= FIRST_MESSAGE_SECONDS):
            raise ValueError(
                f"--stream-idle-timeout must be at least {FIRST_MESSAGE_SECONDS:g} seconds "
                f"(the first message's deadline), got {self.idle_seconds:g}"
            )
        if self.max_message_bytes < 64 * 1024:
            raise ValueError(
                "--max-message-bytes must be at least 65536 (Envoy's default header limit "
                f"alone is 60 KiB), got {self.max_message_bytes}"
            )


def peer_address(peer: str) -> str:
    """The address part of grpc's peer string: `ipv4:10.0.0.7:41234` -> `ipv4:10.0.0.7`.

    Every connection from one address counts as one peer; `unix:` sockets are one peer.
    """
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return f"{kind}:{rest.rpartition(':')[0]}"
    return kind


@dataclass(slots=True, eq=False)
class Stream:
    """One admitted stream: whose it is, when it was last heard, and how to close it."""

    peer: str
    last: float
    close: Callable[[], object]
    heard: bool = False  # it has sent a message
    closed_by: str | None = None  # the limit that closed it, once closed


@dataclass(slots=True)
class Door:
    """The streams open now, by peer.

    A message costs one attribute store (`heard`): the scans happen in `expired`, a few
    times a second, and in `admit` only at capacity.
    """

    limits: StreamLimits = field(default_factory=StreamLimits)
    open_streams: int = 0
    # Streams that have sent nothing yet, oldest first.
    _silent: dict[Stream, None] = field(default_factory=dict)
    # Each peer's streams.
    _peers: dict[str, set[Stream]] = field(default_factory=dict)

    def admit(
        self, peer: str, close: Callable[[], object], now: float
    ) -> tuple[Stream | None, Stream | None]:
        """(the new stream or None when refused, the stream closed to make room or None)."""
        evicted = None
        if self.open_streams >= self.limits.max_streams:
            evicted = self._make_room(peer, now)
            if evicted is None:
                return None, None
        stream = Stream(peer, now, close)
        self._silent[stream] = None
        streams = self._peers.get(peer)
        if streams is None:
            streams = self._peers[peer] = set()
        streams.add(stream)
        self.open_streams += 1
        return stream, evicted

    def heard(self, stream: Stream, now: float) -> None:
        """A message arrived on `stream`: its idle deadline starts again."""
        stream.last = now
        if not stream.heard:
            stream.heard = True
            self._silent.pop(stream, None)

    def done(self, stream: Stream) -> None:
        """The stream ended (any way); forget it unless a limit already did."""
        if stream.closed_by is None:
            self._forget(stream)

    def expired(self, now: float) -> list[Stream]:
        """Close and return the streams past their deadline."""
        closed = []
        while self._silent:
            stream = next(iter(self._silent))
            if now - stream.last < FIRST_MESSAGE_SECONDS:
                break
            closed.append(self._close(stream, CLOSED_FIRST_MESSAGE))
        since = now - self.limits.idle_seconds
        idle = [s for streams in self._peers.values() for s in streams if s.last <= since]
        closed.extend(self._close(stream, CLOSED_IDLE) for stream in idle)
        return closed

    def _make_room(self, peer: str, now: float) -> Stream | None:
        if self._silent:
            oldest = next(iter(self._silent))
            if now - oldest.last >= PENDING_GRACE_SECONDS:
                return self._close(oldest, CLOSED_SILENT)
        own = len(self._peers.get(peer, ()))
        heaviest = max(self._peers, key=lambda p: len(self._peers[p]))
        if heaviest != peer and len(self._peers[heaviest]) > own + 1:
            idlest = min(self._peers[heaviest], key=lambda s: s.last)
            return self._close(idlest, CLOSED_FAIR_SHARE)
        return None

    def _close(self, stream: Stream, limit: str) -> Stream:
        self._forget(stream)
        stream.closed_by = limit
        stream.close()
        return stream

    def _forget(self, stream: Stream) -> None:
        self._silent.pop(stream, None)
        streams = self._peers[stream.peer]
        streams.remove(stream)
        if not streams:
            del self._peers[stream.peer]
        self.open_streams -= 1
