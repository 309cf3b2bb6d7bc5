"""A whole log in, failures grouped by reason and cluster out, in bounded memory.

Strategy: the log is read as bytes in fixed-size chunks and cut into lines of at most
`MAX_LINE` bytes (the rest of a longer line is skipped, and counted), so neither a huge
log nor a huge line has to fit in memory. Each line is read and classified
(`diagnose_text`, which turns any error into an unread line, counted by error type);
successes and lines with no evidence are only counted. Failures are counted per group
(reason, cluster, DestinationRule), and the number of groups is capped: past
`MAX_GROUPS`, new groups fold into one "other" group.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from extproc.accesslog import Read, Reading, Unread, diagnose_text
from extproc.diagnosis import Diagnosis

MAX_LINE = 32 * 1024
MAX_GROUPS = 1000
CHUNK = 64 * 1024
OTHER = "(other groups)"


@dataclass(slots=True)
class Group:
    """Failures that share a reason, a cluster and a DestinationRule."""

    reason: str
    cluster: str
    destination_rule: str
    hint: str
    count: int = 0
    first_seen: str = ""
    last_seen: str = ""
    first_line: int = 0

    def as_dict(self) -> dict[str, object]:
        """The group as plain data, for `--json`."""
        return {
            "reason": self.reason,
            "cluster": self.cluster,
            "destination_rule": self.destination_rule,
            "count": self.count,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "first_line": self.first_line,
            "hint": self.hint,
        }


@dataclass(slots=True)
class Summary:
    """Counts over a whole log, and the failure groups."""

    lines: int = 0
    failures: int = 0
    successes: int = 0
    not_log: int = 0
    truncated: int = 0
    # Lines the reader could not read, by the type of the error (never fatal).
    unread: Counter[str] = field(default_factory=Counter)
    forms: Counter[str] = field(default_factory=Counter)
    missing: Counter[str] = field(default_factory=Counter)
    groups: dict[tuple[str, str, str], Group] = field(default_factory=dict)
    # The only log line, when there was exactly one: then a single diagnosis is shown.
    single: tuple[Reading, Diagnosis | None] | None = None

    def add(self, number: int, result: Read | Unread) -> None:
        """Count one line; group it when it is a failure."""
        self.lines = max(self.lines, number)
        if isinstance(result, Unread):
            self.unread[result.error] += 1
            return
        reading, diagnosis = result.reading, result.diagnosis
        if not reading.is_log:
            self.not_log += 1
            return
        self.forms[reading.form] += 1
        log_lines = self.failures + self.successes
        self.single = (reading, diagnosis) if log_lines == 0 else None
        if diagnosis is None:
            self.successes += 1
            return
        self.failures += 1
        self.missing.update(reading.missing)
        self._group(number, reading, diagnosis).count += 1

    def _group(self, number: int, reading: Reading, diagnosis: Diagnosis) -> Group:
        key = (diagnosis.reason, reading.evidence.cluster, reading.destination_rule)
        group = self.groups.get(key)
        if group is None:
            if len(self.groups) >= MAX_GROUPS:
                key = (OTHER, "", "")
                group = self.groups.get(key)
            if group is None:
                group = Group(*key, hint=diagnosis.hint, first_line=number)
                group.first_seen = reading.time
                self.groups[key] = group
        group.last_seen = reading.time or group.last_seen
        group.first_seen = group.first_seen or reading.time
        return group

    def ranked(self) -> list[Group]:
        """The groups, most frequent first (then in the order first seen)."""
        return sorted(self.groups.values(), key=lambda g: (-g.count, g.first_line))

    def as_dict(self) -> dict[str, object]:
        """The summary as plain data, for `--json`."""
        return {
            "lines": self.lines,
            "failures": self.failures,
            "successes": self.successes,
            "not_log_lines": self.not_log,
            "truncated_lines": self.truncated,
            "unread_lines": dict(self.unread.most_common()),
            "formats": dict(self.forms.most_common()),
            "missing_fields": dict(self.missing.most_common()),
            "groups": [g.as_dict() for g in self.ranked()],
        }


def lines_of(
    stream: BinaryIO, on_progress: Callable[[int, int], None] | None = None
) -> Iterator[tuple[bytes, bool]]:
    """The lines of a byte stream, each cut to `MAX_LINE` bytes; True when one was cut.

    A cut line is yielded as soon as it is full and the rest of it is skipped.
    `on_progress(bytes_read, lines)` is called after each chunk.
    """
    pending = b""
    skipping = False
    read = count = 0
    while chunk := stream.read(CHUNK):
        read += len(chunk)
        parts = chunk.split(b"\n")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if skipping:
                skipping = last  # the long line goes on into the next chunk
                continue
            room = MAX_LINE - len(pending)
            cut = len(part) > room
            pending += part[:room]
            if last and not cut:
                continue
            count += 1
            yield pending, cut
            pending, skipping = b"", cut and last
        if on_progress is not None:
            on_progress(read, count)
    if pending:
        yield pending, False


def summarise(
    lines: Iterable[tuple[bytes, bool]],
) -> Summary:
    """Read every line and count it into a `Summary`."""
    summary = Summary()
    for number, (raw, cut) in enumerate(lines, 1):
        summary.truncated += cut
        text = raw.decode("utf-8", errors="replace").rstrip("\r")
        if not text.strip():
            summary.lines = number
            continue
        summary.add(number, diagnose_text(text))
    return summary
