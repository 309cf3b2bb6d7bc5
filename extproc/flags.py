"""Envoy's core response flags: the bitmask in `response.flags` and the short names in logs.

The bit order follows Envoy's `CoreResponseFlag` enum (stable since the flags became a
bitmask); access logs print the short names comma-separated, in no fixed order.
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
DI, URX, UPE, NC, OM, DF, RFCF = (
    0x200,
    0x8000,
    0x800000,
    0x1000000,
    0x2000000,
    0x4000000,
    0x100000,
)

# Flags that mark a response Envoy served on purpose rather than a failure.
BENIGN = DI | RFCF
ALL_FLAGS = (1 << len(RESPONSE_FLAGS)) - 1


class UnknownFlagError(ValueError):
    """A response flag name that Envoy does not define."""


def parse_flags(text: str) -> int:
    """Turn an access log's flags field (`UF,URX`, `UF|URX`, `-`) into the bitmask.

    Long names (`UpstreamConnectionFailure`) are accepted too, case-insensitively.
    """
    mask = 0
    for raw in text.replace("|", ",").split(","):
        name = raw.strip()
        if not name or name == "-":
            continue
        bit = _BY_NAME.get(name) or _BY_NAME.get(name.lower())
        if bit is None:
            raise UnknownFlagError(f"unknown response flag {name!r}")
        mask |= bit
    return mask


def format_flags(mask: int) -> str:
    """The short names of the bits set in `mask`, comma-separated in bit order."""
    return ",".join(short for bit, short, _ in RESPONSE_FLAGS if mask & bit)
