"""The server's own memory of closed connections, per cluster: a one-off or every request?

A connection the upstream closed under a request (`UC`, `connection_termination`) on a
plaintext cluster is one of two things that look the same on the wire: a server that
requires mTLS (it closes every plaintext connection, so every request fails) or the
keep-alive race (an idle connection closed just as a request went out; it follows an
answer on that very connection, and is rare). So the server remembers, per cluster, how
many closes came in a row with no answer from the cluster in between: `MISMATCH_CLOSES`
or more is the mismatch, fewer is not proof of it.

The memory is bounded: at most `MAX_CLUSTERS` clusters, least recently touched evicted
first (an `OrderedDict`, O(1) per event); a run of closes older than `CLOSE_WINDOW`
seconds starts again. It costs nothing while no cluster has closed a connection: answers
are recorded only for clusters it already holds. It sees what the server sees: in gated
mode the server sees failures only, so an answer between two closes goes unseen there;
the window keeps two races far apart from adding up. Each worker process has its own.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from time import monotonic

from extproc import flags as F
from extproc.diagnosis import Evidence

# Closes in a row, with no answer between, that make a mismatch (a keep-alive race needs
# an answer on the connection first, so two in a row with none seen is no race).
MISMATCH_CLOSES = 2
# Clusters remembered; the least recently touched one goes first. 4096 outbound clusters
# cover a large mesh's sidecar; each entry is a few hundred bytes.
MAX_CLUSTERS = 4096
# Seconds after which a run of closes starts again: a mismatch fails every request, so
# its closes come as fast as the traffic; two races minutes apart are no run.
CLOSE_WINDOW = 60.0

_TERMINATION = "connection_termination"


def is_close(ev: Evidence) -> bool:
    """A connection closed under the request: the UC flag with Envoy's termination reason."""
    return bool(ev.flags & F.UC) and _TERMINATION in ev.code_details.replace(" ", "_")


class ClosedConnections:
    """Closes in a row per cluster, bounded (`MAX_CLUSTERS`, LRU) and O(1) per event."""

    def __init__(
        self,
        max_clusters: int = MAX_CLUSTERS,
        window: float = CLOSE_WINDOW,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        self._runs: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._max = max_clusters
        self._window = window
        self._clock = clock

    def __len__(self) -> int:
        return len(self._runs)

    @property
    def watching(self) -> bool:
        """Whether any cluster has a run of closes (answers matter only then)."""
        return bool(self._runs)

    def closed(self, cluster: str) -> int:
        """Record a close on `cluster`; the closes in a row so far, this one included."""
        now = self._clock()
        count, last = self._runs.pop(cluster, (0, now))
        count = count + 1 if now - last <= self._window else 1
        self._runs[cluster] = (count, now)
        if len(self._runs) > self._max:
            self._runs.popitem(last=False)
        return count

    def answered(self, cluster: str) -> None:
        """The cluster answered a request: its run of closes ends."""
        self._runs.pop(cluster, None)

    def observe(self, ev: Evidence) -> Evidence:
        """`ev` with `repeated_close` set when it is a close on a named cluster; an answer
        from the cluster ends its run."""
        if not ev.cluster:
            return ev
        if ev.code_details == "via_upstream":
            self.answered(ev.cluster)
            return ev
        if not is_close(ev):
            return ev
        return replace(ev, repeated_close=self.closed(ev.cluster) >= MISMATCH_CLOSES)
