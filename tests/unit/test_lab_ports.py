"""Ports the lab and the tests name in configs before anything binds them."""

from __future__ import annotations

import socket

from extproc.lab import envoy


class TestFreePorts:
    def test_ports_come_from_below_the_ephemeral_range(self):
        """No chosen port is one the kernel could hand to an outgoing connection meanwhile."""
        low = envoy._ephemeral_low()
        assert all(1024 <= port < low for port in envoy.free_ports(50))

    def test_a_port_is_never_handed_out_twice(self):
        """Ports released after a call are not chosen again by a later one in this process."""
        first = envoy.free_ports(20)
        later = [envoy.free_port() for _ in range(20)]
        assert len(set(first) | set(later)) == 40

    def test_a_port_in_use_is_skipped(self, monkeypatch):
        """A port another socket holds is not chosen: the next free one is."""
        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            held.listen()
            busy = held.getsockname()[1]
            # Point the cursor at the held port, as if it were the next in the span.
            first = busy - 1000
            monkeypatch.setattr(envoy, "_ephemeral_low", lambda: first + envoy._PORT_SPAN)
            monkeypatch.setattr(envoy, "_offset", 1000)
            monkeypatch.setattr(envoy, "_handed_out", set())
            port = envoy.free_port()
        assert port != busy
        assert port > busy

    def test_each_chosen_port_can_be_bound(self):
        """What is returned is free at that moment."""
        for port in envoy.free_ports(5):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", port))
