"""The policy file: parsed once, validated in full, frozen.

Every error names the file, the key and what was expected, because a policy that is
half-applied is worse than one that is refused.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from extproc.admission import MAX_MESSAGE_BYTES, MAX_STREAMS, STREAM_IDLE_SECONDS
from extproc.authority import parse_authority, parse_host


class PolicyError(ValueError):
    """The policy file cannot be used; the message says where and why."""


class Mode(enum.StrEnum):
    ENFORCE = "enforce"
    REPORT = "report"


class Action(enum.StrEnum):
    """What a header rule does with the headers it matches."""

    STRIP = "strip"  # remove them
    REPORT = "report"  # list them in x-extproc-actions, change nothing
    KEEP = "keep"  # rule off
    REWRITE = "rewrite"  # underscore headers only: x_user_id -> x-user-id


class Exposure(enum.StrEnum):
    """Whether the x-extproc-* response headers reach the client."""

    # On where the client is known to be a mesh workload: outbound sidecars, and inbound
    # ones when the caller is an mTLS mesh peer; off at the edge and for any other caller.
    AUTO = "auto"
    ON = "on"
    OFF = "off"  # diagnosis only in dynamic metadata, the log line and the metrics


class Direction(enum.StrEnum):
    """Where the filter sits, which decides the rules that apply."""

    AUTO = "auto"  # what the rendered filter says, else xds.listener_direction; unset: edge
    EDGE = "edge"  # a gateway or a plain front Envoy
    OUTBOUND = "outbound"  # a sidecar's outbound listener: the app is the client
    INBOUND = "inbound"  # a sidecar's inbound listener: another sidecar is the client


@dataclass(frozen=True, slots=True)
class Policy:
    """What the server does to requests. The defaults are safe for a mesh."""

    mode: Mode = Mode.ENFORCE
    # Left out of the hash (a mapping has none); equality still compares it.
    host_rewrites: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    strip_host_port: bool = False
    echoed_envoy_headers: Action = Action.STRIP
    forwarding_headers: Action = Action.STRIP
    underscore_headers: Action = Action.REPORT
    # An underscore header whose dashed name the mesh trusts is never renamed into it;
    # strip: drop it, keep: pass it on under its underscore name.
    protected_rewrite: Action = Action.STRIP
    direction: Direction = Direction.AUTO
    response_annotations: Exposure = Exposure.AUTO
    # The secret an operator sends in `x-extproc-reveal` to see the annotations where
    # they are hidden (the edge); read from `reveal_token_file`. Never printed.
    reveal_token: bytes = field(default=b"", repr=False)
    reveal_token_file: str = ""
    # How many proxies in front of the edge (a cloud load balancer, a CDN) set the
    # forwarding headers: Istio's gatewayTopology.numTrustedProxies, Envoy's
    # xff_num_trusted_hops. Above 0 the edge keeps what they set.
    trusted_hops: int = 0
    source: str = "<defaults>"

    @property
    def enforcing(self) -> bool:
        return self.mode is Mode.ENFORCE

    @property
    def reveal_header(self) -> Action:
        """The reveal rule: strip `x-extproc-reveal` when a token file is configured."""
        return Action.STRIP if self.reveal_token_file or self.reveal_token else Action.KEEP

    @property
    def trusts_forwarding(self) -> bool:
        """Whether the edge keeps forwarding headers: trusted proxies in front set them."""
        return self.trusted_hops > 0

    def shows_annotations(self, direction: Direction, *, mesh_peer: bool = False) -> bool:
        """Whether x-extproc-* headers reach the client of a filter sitting at `direction`.

        `mesh_peer`: the caller presented a mesh (SPIFFE) certificate on this connection.
        At an inbound sidecar that is the only sign that the caller is a workload of the
        mesh and not an ingress controller or a NodePort passing the headers on.
        """
        if self.response_annotations is Exposure.AUTO:
            return direction is Direction.OUTBOUND or (direction is Direction.INBOUND and mesh_peer)
        return self.response_annotations is Exposure.ON


# key -> (expected, converter). The converter raises ValueError with what was expected.
_SWITCH_ACTIONS = {Action.STRIP, Action.REPORT, Action.KEEP}
_UNDERSCORE_ACTIONS = {Action.STRIP, Action.REPORT, Action.KEEP, Action.REWRITE}


def _enum(kind: type[enum.StrEnum], allowed: set[Any] | None = None) -> Any:
    choices = sorted(str(v) for v in (allowed or set(kind)))

    def convert(value: object) -> enum.StrEnum:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return kind(value)

    return convert


_EXPOSURE = _enum(Exposure)


def _exposure(value: object) -> Exposure:
    """auto, on or off; YAML 1.1 reads a bare `on`/`off` as a boolean, so take those too."""
    if isinstance(value, bool):
        return Exposure.ON if value else Exposure.OFF
    converted: Exposure = _EXPOSURE(value)
    return converted


# A reveal token shorter than this is too easy to guess from the Internet.
MIN_REVEAL_TOKEN = 16


def _reveal_token_file(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected the path of a file holding the token, got {value!r}")
    return value


def token_path(path: str, source: str) -> Path:
    """The reveal token's file: a relative `path` is read next to the policy file `source`."""
    file, policy_file = Path(path), Path(source)
    if not file.is_absolute() and policy_file.is_file():
        return policy_file.parent / file
    return file


# The files the server reads. Both are an operator's, but a wrong mount (a log, a binary)
# must get a clear error, not a server that reads hundreds of megabytes: a real policy is a
# few kilobytes, and a token travels in one header value.
MAX_POLICY_BYTES = 1024 * 1024
MAX_TOKEN_FILE_BYTES = 4096


def read_capped(file: Path, limit: int) -> bytes:
    """The bytes of `file`, or ValueError when it holds more than `limit`; OSError passes."""
    with file.open("rb") as stream:
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{file} is larger than {limit} bytes")
    return data


def read_reveal_token(path: str) -> bytes:
    """The token in `path` (surrounding whitespace removed), or ValueError saying what is wrong.

    The message never quotes the file's content.
    """
    file = Path(path)
    try:
        token = read_capped(file, MAX_TOKEN_FILE_BYTES).strip()
    except OSError as exc:
        raise ValueError(f"cannot read {file}: {exc.strerror or exc}") from None
    if len(token) < MIN_REVEAL_TOKEN:
        raise ValueError(f"the token in {file} is shorter than {MIN_REVEAL_TOKEN} bytes")
    if not all(0x21 <= byte <= 0x7E for byte in token):
        raise ValueError(
            f"the token in {file} must be visible ASCII (it travels in a header value)"
        )
    return token


# Istio and Envoy take any number; no real chain of proxies in front of a gateway is this
# long, so a bigger one is a typo.
MAX_TRUSTED_HOPS = 16


def _trusted_hops(value: object) -> int:
    # YAML's `true` is an int to Python: refuse it by type, not by value.
    if type(value) is not int or not 0 <= value <= MAX_TRUSTED_HOPS:
        raise ValueError(f"expected a whole number from 0 to {MAX_TRUSTED_HOPS}, got {value!r}")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _host_rewrites(value: object) -> Mapping[str, str]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a map from Host to authority, got {type(value).__name__}")
    rewrites: dict[str, str] = {}
    for host, target in value.items():
        if not isinstance(host, str) or parse_host(host) is None:
            raise ValueError(
                f"key {host!r} is not a host name (give it without a port: the port is ignored)"
            )
        if not isinstance(target, str) or parse_authority(target) is None:
            raise ValueError(f"{host}: {target!r} is not an authority (host or host:port)")
        key = host.lower().rstrip(".")
        if key in rewrites:
            raise ValueError(f"{host!r} is listed twice (keys are case-insensitive)")
        rewrites[key] = target.lower()
    return MappingProxyType(rewrites)


_KEYS: dict[str, Any] = {
    "mode": _enum(Mode),
    "host_rewrites": _host_rewrites,
    "strip_host_port": _bool,
    "echoed_envoy_headers": _enum(Action, _SWITCH_ACTIONS),
    "forwarding_headers": _enum(Action, _SWITCH_ACTIONS),
    "underscore_headers": _enum(Action, _UNDERSCORE_ACTIONS),
    "protected_rewrite": _enum(Action, {Action.STRIP, Action.KEEP}),
    "direction": _enum(Direction),
    "response_annotations": _exposure,
    "reveal_token_file": _reveal_token_file,
    "trusted_hops": _trusted_hops,
}


def policy_from_mapping(
    data: object, source: str = "<policy>", *, read_secrets: bool = True
) -> Policy:
    """Validate a parsed YAML document into a Policy, or raise PolicyError naming the key."""
    if data is None:
        return Policy(source=source)
    if not isinstance(data, Mapping):
        raise PolicyError(
            f"{source}: expected a map of policy keys at the top level, got {type(data).__name__}"
        )
    values: dict[str, Any] = {}
    for key, raw in data.items():
        convert = _KEYS.get(key)
        if convert is None:
            known = ", ".join(sorted(_KEYS))
            raise PolicyError(
                f"{source}{_line_of(data, key)}: unknown key {key!r} (known keys: {known})"
            )
        try:
            values[key] = convert(raw)
        except ValueError as exc:
            raise PolicyError(f"{source}{_line_of(data, key)}: {key}: {exc}") from None
    if "reveal_token_file" in values and read_secrets:
        try:
            values["reveal_token"] = read_reveal_token(
                str(token_path(values["reveal_token_file"], source))
            )
        except ValueError as exc:
            where = f"{source}{_line_of(data, 'reveal_token_file')}"
            raise PolicyError(f"{where}: reveal_token_file: {exc}") from None
    return Policy(source=source, **values)


def _line_of(data: Mapping[Any, Any], key: object) -> str:
    lines = getattr(data, "lines", {})
    return f":{lines[key]}" if key in lines else ""


class _LineLoader(yaml.SafeLoader):
    """A safe loader whose top-level map remembers the line of each key."""


class _LinedDict(dict[Any, Any]):
    lines: dict[Any, int]


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _LinedDict:
    mapping = _LinedDict(loader.construct_mapping(node, deep=True))
    mapping.lines = {
        loader.construct_object(k, deep=True): k.start_mark.line + 1 for k, _ in node.value
    }
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The gRPC listener's certificate, key, and the CA that client certificates must chain to."""

    cert: Path
    key: Path
    client_ca: Path | None = None


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """How `extproc serve` runs, from the command line."""

    # A server in a pod listens on all interfaces; None: no gRPC listener (HTTP lane only).
    listen: str | None = "0.0.0.0:50051"
    # The ext_proc `http_service` lane (extproc/http_lane.py), on the same event loop.
    http_listen: str | None = None
    # Connections the HTTP lane serves at once; beyond it a new one gets 503 and a close
    # (`http_lane.MAX_CONNECTIONS`, where the lane's other limits are).
    http_max_connections: int = 1000
    policy_path: Path | None = None
    grace: float = 10.0
    tls: TlsFiles | None = None
    metrics_listen: str | None = None
    # > 0: the diagnoses counter gets a `cluster` label, for at most this many clusters.
    metrics_cluster_label: int = 0
    # A plaintext port with only the health service, for probes that cannot speak TLS.
    health_listen: str | None = None
    # The gRPC door's limits (extproc/admission.py says why each is what it is). Beyond
    # max_streams a new stream takes a silent or an over-share stream's place, or gets
    # RESOURCE_EXHAUSTED at once: with failure_mode_allow Envoy then passes the request
    # through unannotated instead of waiting.
    max_streams: int = MAX_STREAMS
    stream_idle_timeout: float = STREAM_IDLE_SECONDS
    max_message_bytes: int = MAX_MESSAGE_BYTES
    # Server processes (see extproc/workers.py).
    workers: int = 1
    # How often the policy file is checked for changes (SIGHUP reloads at once).
    reload_interval: float = 2.0
    # Envoy's admin base URL: the clusters' TLS settings sharpen handshake diagnoses.
    envoy_admin: str | None = None
    # The live page (extproc/page.py): its HOST:PORT (None: off), the token a non-loopback
    # address needs (read from --ui-token-file; never printed), and how long a row must
    # see no failure to show as recovered.
    ui_listen: str | None = None
    ui_token: bytes = field(default=b"", repr=False)
    ui_recovered_after: float = 60.0
    # Prometheus's base URL: the page's mesh-wide view (extproc/mesh_view.py).
    ui_prometheus: str | None = None
    ui_trace_url: str = ""  # a link template with {trace_id}; "": ids as text
    # The documentation site the page links reasons into (ends in "/"); "": names the file.
    ui_docs_url: str = ""


def load_policy(path: str | Path, *, read_secrets: bool = True) -> Policy:
    """Read and validate a policy file; `read_secrets=False` leaves the files it names
    (the reveal token) unread, for tools that only need the policy's shape (render)."""
    path = Path(path)
    try:
        text = read_capped(path, MAX_POLICY_BYTES).decode("utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{path}: the policy file is not UTF-8: {exc.reason}") from None
    except ValueError:
        raise PolicyError(
            f"{path}: the policy file is larger than {MAX_POLICY_BYTES} bytes"
        ) from None
    try:
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(f"{path}{where}: not valid YAML: {problem}") from None
    return policy_from_mapping(data, source=str(path), read_secrets=read_secrets)
