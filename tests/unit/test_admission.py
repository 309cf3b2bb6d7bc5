"""The gRPC door's table as data: who is admitted at capacity, and who is closed when."""

from __future__ import annotations

import pytest

from extproc import admission
from extproc.admission import Door, StreamLimits, peer_address


class Closer:
    """Records which streams the door closed."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def fill(door: Door, peer: str, n: int, now: float, *, heard: bool) -> list[admission.Stream]:
    streams = []
    for _ in range(n):
        stream, evicted = door.admit(peer, Closer(), now)
        assert stream is not None and evicted is None
        if heard:
            door.heard(stream, now)
        streams.append(stream)
    return streams


class TestPeerAddress:
    @pytest.mark.parametrize(
        ("peer", "address"),
        [
            ("ipv4:10.0.0.7:41234", "ipv4:10.0.0.7"),
            ("ipv6:[::1]:5000", "ipv6:[::1]"),
            ("unix:/tmp/x.sock", "unix"),
            ("unix:", "unix"),
            ("", ""),
        ],
    )
    def test_the_port_is_not_part_of_the_peer(self, peer, address):
        """Every connection from one address is one peer; grpc's port suffix is dropped."""
        assert peer_address(peer) == address


class TestAdmission:
    def test_at_capacity_a_silent_stream_gives_its_place(self):
        """A stream silent past the grace is closed for a new one, and told why."""
        door = Door(StreamLimits(max_streams=3))
        silent = fill(door, "a", 3, 0.0, heard=False)
        stream, evicted = door.admit("a", Closer(), admission.PENDING_GRACE_SECONDS)
        assert stream is not None and evicted is silent[0]
        assert evicted.closed_by == admission.CLOSED_SILENT and evicted.close.calls == 1
        assert door.open_streams == 3

    def test_young_silent_streams_are_not_evicted(self):
        """Streams that may still be Envoy's first-message-in-flight keep their place."""
        door = Door(StreamLimits(max_streams=2))
        fill(door, "a", 2, 0.0, heard=False)
        assert door.admit("a", Closer(), admission.PENDING_GRACE_SECONDS / 2) == (None, None)

    def test_the_busiest_peer_gives_way_to_a_lighter_one(self):
        """At capacity, another address gets the least recently heard stream of the busiest."""
        door = Door(StreamLimits(max_streams=4))
        hostile = fill(door, "h", 4, 0.0, heard=False)
        for at, stream in enumerate(hostile):
            door.heard(stream, float(at))
        door.heard(hostile[0], 10.0)  # now hostile[1] is the least recently heard
        stream, evicted = door.admit("envoy", Closer(), 11.0)
        assert stream is not None and evicted is hostile[1]
        assert evicted.closed_by == admission.CLOSED_FAIR_SHARE

    def test_fair_share_converges_to_half(self):
        """A lighter peer keeps taking places until it holds about as many as the busiest."""
        door = Door(StreamLimits(max_streams=10))
        fill(door, "h", 10, 0.0, heard=True)
        admitted = 0
        while door.admit("envoy", Closer(), 1.0)[0] is not None:
            admitted += 1
        assert admitted == 5

    def test_one_peer_at_capacity_is_refused(self):
        """A peer that already holds every place gets no more: refused, nothing closed."""
        door = Door(StreamLimits(max_streams=2))
        fill(door, "a", 2, 0.0, heard=True)
        assert door.admit("a", Closer(), 100.0) == (None, None)


class TestDeadlines:
    def test_silent_streams_expire_after_the_first_message_deadline(self):
        """Only the streams silent for FIRST_MESSAGE_SECONDS are closed, oldest first."""
        door = Door()
        old = fill(door, "a", 2, 0.0, heard=False)
        young = fill(door, "a", 1, 1.0, heard=False)
        closed = door.expired(admission.FIRST_MESSAGE_SECONDS)
        assert closed == old
        assert {s.closed_by for s in closed} == {admission.CLOSED_FIRST_MESSAGE}
        assert door.open_streams == len(young)

    def test_heard_streams_expire_after_the_idle_timeout(self):
        """A stream heard from is closed only after idle_seconds without a message."""
        door = Door(StreamLimits(idle_seconds=10.0))
        (stream,) = fill(door, "a", 1, 0.0, heard=True)
        door.heard(stream, 5.0)
        assert door.expired(14.0) == []
        assert door.expired(15.0) == [stream]
        assert stream.closed_by == admission.CLOSED_IDLE

    def test_a_closed_stream_is_forgotten_once(self):
        """A stream closed by a limit and then ending is not counted out twice."""
        door = Door()
        (stream,) = fill(door, "a", 1, 0.0, heard=False)
        door.expired(60.0)
        door.done(stream)
        door.heard(stream, 61.0)
        assert door.open_streams == 0


class TestLimits:
    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"max_streams": 0}, "--max-streams"),
            ({"idle_seconds": 0.5}, "--stream-idle-timeout"),
            ({"idle_seconds": float("nan")}, "--stream-idle-timeout"),
            ({"max_message_bytes": 1000}, "--max-message-bytes"),
        ],
    )
    def test_bad_limits_are_refused_with_the_option_name(self, kwargs, message):
        """A limit out of range names the option an operator would change."""
        with pytest.raises(ValueError, match=message):
            StreamLimits(**kwargs)
