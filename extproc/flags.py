"""Envoy's core response flags: the bitmask in `response.flags` and the short names in logs.

The bit order follows Envoy's `CoreResponseFlag` enum (stable since the flags became a
bitmask); access logs print the short names comma-separated, in no fixed order. A newer
Envoy may set a bit or print a name this table does not know yet: the readers keep the
known flags and hand the rest back as evidence (`unknown_bits`, `split_flags`) instead of
rejecting the whole value.
"""

from __future__ import annotations

# (bit, short name, long name), in bit order.
RESPONSE_FLAGS: tuple[tuple[int, str, str], ...] = (
    (0x1, "LH", "FailedLocalHealthCheck"),
    (0x2, "UH", "NoHealthyUpstream"),
    (0x4, "UT", "UpstreamRequestTimeout"),
    (0x8, "LR", "LocalReset"),
    (0x10, "UR", "UpstreamRemoteReset"),
    (0x20, "UF", "UpstreamConnectionFailure"),
    (0x40, "UC", "UpstreamConnectionTermination"),
    (0x80, "UO", "UpstreamOverflow"),
    (0x100, "NR", "NoRouteFound"),
    (0x200, "DI", "DelayInjected"),
    (0x400, "FI", "FaultInjected"),
    (0x800, "RL", "RateLimited"),
    (0x1000, "UAEX", "UnauthorizedExternalService"),
    (0x2000, "RLSE", "RateLimitServiceError"),
    (0x4000, "DC", "DownstreamConnectionTermination"),
    (0x8000, "URX", "UpstreamRetryLimitExceeded"),
    (0x10000, "SI", "StreamIdleTimeout"),
    (0x20000, "IH", "InvalidEnvoyRequestHeaders"),
    (0x40000, "DPE", "DownstreamProtocolError"),
    (0x80000, "UMSDR", "UpstreamMaxStreamDurationReached"),
    (0x100000, "RFCF", "ResponseFromCacheFilter"),
    (0x200000, "NFCF", "NoFilterConfigFound"),
    (0x400000, "DT", "DurationTimeout"),
    (0x800000, "UPE", "UpstreamProtocolError"),
    (0x1000000, "NC", "NoClusterFound"),
    (0x2000000, "OM", "OverloadManagerTerminated"),
    (0x4000000, "DF", "DnsResolutionFailed"),
    (0x8000000, "DO", "DropOverload"),
    (0x10000000, "DR", "DownstreamRemoteReset"),
    (0x20000000, "UDO", "UnconditionalDropOverload"),
)

_BY_NAME: dict[str, int] = {}
for _bit, _short, _long in RESPONSE_FLAGS:
    _BY_NAME[_short] = _bit
    _BY_NAME[_long.lower()] = _bit

LH, UH, UT, LR, UR, UF, UC, UO, NR = (0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40, 0x80, 0x100)
DI, FI, RL, UAEX, RLSE, DC, URX, SI, IH, DPE = (
    0x200, 0x400, 0x800, 0x1000, 0x2000, 0x4000, 0x8000, 0x10000, 0x20000, 0x40000,
)  # fmt: skip
RFCF, UPE, NC, OM, DF, DO, DR, UDO = (
    0x100000, 0x800000, 0x1000000, 0x2000000, 0x4000000, 0x8000000, 0x10000000, 0x20000000,
)  # fmt: skip

# Flags that mark a response Envoy served on purpose rather than a failure.
BENIGN = DI | RFCF
ALL_FLAGS = (1 << len(RESPONSE_FLAGS)) - 1
# `response.flags` arrives as a double: integers are exact up to here.
MAX_FLAGS_VALUE = (1 << 53) - 1


class UnknownFlagError(ValueError):
    """A response flag name that Envoy does not define."""


def split_flags(text: str) -> tuple[int, tuple[str, ...]]:
    """An access log's flags field (`UF,URX`, `UF|URX`, `-`) as the bitmask of the known
    names and the names this table does not know, in their order.

    Long names (`UpstreamConnectionFailure`) are accepted too, case-insensitively.
    """
    mask = 0
    unknown: list[str] = []
    for raw in text.replace("|", ",").split(","):
        name = raw.strip()
        if not name or name == "-":
            continue
        bit = _BY_NAME.get(name) or _BY_NAME.get(name.lower())
        if bit is None:
            unknown.append(name)
        else:
            mask |= bit
    return mask, tuple(unknown)


def parse_flags(text: str) -> int:
    """The bitmask of a flags field typed by a user; a name Envoy does not define raises
    `UnknownFlagError` (a typo should not pass silently; log readers use `split_flags`)."""
    mask, unknown = split_flags(text)
    if unknown:
        raise UnknownFlagError(f"unknown response flag {unknown[0]!r}")
    return mask


def unknown_bits(mask: int) -> str:
    """The bits of `mask` this table does not know, as `bit40,bit41`; '' when there are none."""
    rest = mask & ~ALL_FLAGS
    return ",".join(f"bit{n}" for n in range(rest.bit_length()) if rest >> n & 1)


def format_flags(mask: int) -> str:
    """The short names of the known bits set in `mask`, comma-separated in bit order."""
    return ",".join(short for bit, short, _ in RESPONSE_FLAGS if mask & bit)
