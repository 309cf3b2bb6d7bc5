"""What `extproc render` is asked for: parsed once, validated, frozen."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from importlib.metadata import version

from extproc.authority import parse_authority
from extproc.config import Direction, Policy
from extproc.filter_config import GRPC, HTTP, MESH_IDENTITY, TRANSPORTS
from extproc.published import published_documentation_url

# Kubernetes names: a DNS-1123 label.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

NAME = "extproc-doctor"
# The alerts' runbooks are the "Alert: NAME" headings of the documentation's monitoring
# page (docs/monitoring.md; on the site, MONITORING_PAGE under the documentation's address).
RUNBOOK_PAGE = "docs/monitoring.md"
MONITORING_PAGE = "monitoring/"


def published_runbook_url() -> str | None:
    """The monitoring page of the published documentation site; None when none is named."""
    base = published_documentation_url()
    return f"{base.rstrip('/')}/{MONITORING_PAGE}" if base else None


GRPC_PORT = 50051
HTTP_PORT = 50080  # the HTTP lane (`serve --http-listen`), served beside gRPC
POLICY_FILE = "policy.yaml"
# The Service the deploy/ examples render cilium for: a placeholder, named in their header.
EXAMPLE_CILIUM_SERVICE = "default/my-service:8080"


# Istio (see extproc/render/istio.py for why each default is what it is).
ISTIO_ROOT_NAMESPACE = "istio-system"
INGRESS_GATEWAY_SELECTOR = (("istio", "ingressgateway"),)
# Applied after default-priority EnvoyFilters, so no one's INSERT_FIRST lands ahead of ours.
ISTIO_PRIORITY = 1000
# Istio proxies whose build has ext_proc, composite and header_mutation (istio/proxy
# release-1.19 is the first with header_mutation; ext_proc and composite since 1.12).
ISTIO_PROXY_VERSION = r"^1\.(19|[2-9][0-9])([.-].*)?$"
# istiod treats a longer proxyVersion as matching no proxy (pilot/pkg/model/envoyfilter.go
# maxProxyVersionLen): refused here rather than silently patching nothing.
MAX_PROXY_VERSION = 1024
_INT32 = 2**31
# Kubernetes label keys ([DNS-subdomain/]name) and values: 63 characters a name or value.
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_LABEL_PREFIX = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


@dataclass(frozen=True, slots=True)
class IstioScope:
    """Where the EnvoyFilters apply: which namespace, which workloads, which gateways."""

    root_namespace: str = ISTIO_ROOT_NAMESPACE  # meshConfig.rootNamespace
    # None: the root namespace (every proxy in the mesh); a namespace: only its workloads.
    namespace: str | None = None
    # Sidecars: only workloads with these labels (empty: every sidecar in scope).
    workload_selector: tuple[tuple[str, str], ...] = ()
    # Gateways: only gateway workloads with these labels (the default install's ingress).
    gateway_selector: tuple[tuple[str, str], ...] = INGRESS_GATEWAY_SELECTOR
    sidecars: bool = True
    gateways: bool = True
    priority: int = ISTIO_PRIORITY
    proxy_version: str = ISTIO_PROXY_VERSION

    def __post_init__(self) -> None:
        for flag, value in (
            ("--istio-root-namespace", self.root_namespace),
            ("--istio-namespace", self.namespace),
        ):
            if value is not None and not _LABEL.fullmatch(value):
                raise RenderError(f"{flag}: {value!r} is not a Kubernetes namespace")
        if not self.gateway_selector:
            raise RenderError("--istio-gateway-selector: gateways need a selector (LABEL=VALUE)")
        if not (self.sidecars or self.gateways):
            raise RenderError("--istio-only: nothing left to render")
        if not -_INT32 <= self.priority < _INT32:
            raise RenderError(f"--istio-priority: {self.priority} is not a 32-bit integer")
        if len(self.proxy_version) > MAX_PROXY_VERSION:
            raise RenderError(f"--istio-proxy-version: longer than {MAX_PROXY_VERSION} characters")
        try:
            re.compile(self.proxy_version)
        except re.error as exc:
            raise RenderError(f"--istio-proxy-version: not a regular expression: {exc}") from None

    @property
    def target_namespace(self) -> str:
        """The EnvoyFilters' namespace."""
        return self.namespace or self.root_namespace


def label_pairs(values: list[str] | None, flag: str) -> tuple[tuple[str, str], ...]:
    """`LABEL=VALUE` arguments -> sorted pairs, or RenderError naming `flag`."""
    pairs = []
    for value in values or ():
        key, sep, label = value.partition("=")
        prefix, _, name = key.rpartition("/")
        valid = (
            sep
            and _LABEL_NAME.fullmatch(name)
            and (not prefix or _LABEL_PREFIX.fullmatch(prefix))
            and (not label or _LABEL_NAME.fullmatch(label))
        )
        if not valid:
            raise RenderError(f"{flag}: expected a Kubernetes LABEL=VALUE, got {value!r}")
        pairs.append((key, label))
    return tuple(sorted(pairs))


class RenderError(ValueError):
    """The render options or the result are unusable; the message says which and why."""


# A CEC sits in front of a Service: its clients come from outside (edge) or are pods of
# the cluster (outbound); no sidecar's inbound side is there.
CILIUM_DIRECTIONS = (Direction.EDGE, Direction.OUTBOUND)


# The tracers `render envoy` can configure (`--tracing-zipkin`, `--tracing-otlp`).
ZIPKIN, OTLP = "zipkin", "otlp"


class RenderMode(enum.StrEnum):
    ALWAYS = "always"  # every request and response goes to the server
    GATED = "gated"  # Envoy matchers decide; clean traffic stays inside Envoy


def host_port(value: str, what: str) -> tuple[str, int]:
    """`host:port` (IPv6 in brackets) → (host, port), or RenderError naming `what`."""
    parsed = parse_authority(value)
    if parsed is None or not parsed.port:
        raise RenderError(f"{what}: expected HOST:PORT, got {value!r}")
    return parsed.host.strip("[]"), int(parsed.port)


def _default_image() -> str:
    return f"{NAME}:{version(NAME)}"


@dataclass(frozen=True, slots=True)
class RenderOptions:
    """Everything a manifest depends on besides the target."""

    mode: RenderMode = RenderMode.GATED
    namespace: str = NAME  # where the server runs
    image: str = field(default_factory=_default_image)
    # Where Envoy reaches the server; None: the Service's DNS name (mesh targets) or
    # 127.0.0.1:50051 (the standalone Envoy).
    extproc_address: str | None = None
    # A CA file inside the proxy: with it, Envoy speaks TLS to the server and verifies it.
    extproc_tls_ca: str | None = None
    # mTLS to the server: a directory inside the proxy with ca.crt, tls.crt, tls.key (the
    # layout of a cert-manager Secret), or "istio": the proxy's own mesh identity by SDS.
    # The Deployment then requires client certificates (`--client-ca`).
    extproc_mtls: str | None = None
    policy: Policy = field(default_factory=Policy)
    # The policy file's text, for the ConfigMap; "" renders the defaults.
    policy_text: str = ""
    # Cilium: the Service port whose traffic goes through the listener, NAMESPACE/NAME:PORT.
    # Required to render cilium (deploy/ uses EXAMPLE_CILIUM_SERVICE).
    cilium_service: str | None = None
    # The standalone Envoy: where it listens, and the one upstream it routes to.
    envoy_listen: str = "0.0.0.0:10000"
    upstream: str = "127.0.0.1:8080"
    # The standalone Envoy: where it sits (edge, outbound, inbound), told to the server.
    direction: Direction = Direction.EDGE
    # Cilium: where the CEC's filter sits. The edge unless declared otherwise: only
    # `outbound` (pods of the cluster are the only clients) turns the edge rules off.
    cilium_direction: Direction = Direction.EDGE
    # How Envoy calls the server: gRPC (the default), or ext_proc's http_service lane.
    transport: str = GRPC
    # Istio: the scope of the EnvoyFilters.
    istio: IstioScope = field(default_factory=IstioScope)
    # monitoring: the document the alerts' runbook links point into; None: no address is
    # known, so the alerts name the runbook page instead of linking a guessed one.
    runbook_url: str | None = field(default_factory=published_runbook_url)
    # The standalone Envoy's tracer: where it sends spans, Zipkin (JSON v2 over HTTP) or
    # OpenTelemetry (OTLP/gRPC), HOST:PORT; None: no tracer. At most one: an HCM has one.
    tracing_zipkin: str | None = None
    tracing_otlp: str | None = None
    # The diagnosis as span tags (filter_config.TRACE_TAGS) wherever the HCM traces; off
    # (`--no-trace-tags`) leaves Istio's HCM tracing exactly as the mesh configures it.
    trace_tags: bool = True

    def __post_init__(self) -> None:
        if self.runbook_url is not None and (
            not self.runbook_url.startswith(("https://", "http://")) or "#" in self.runbook_url
        ):
            raise RenderError(
                f"--runbook-url: expected an http(s) URL without a #fragment, got {self.runbook_url!r}"
            )
        if not _LABEL.fullmatch(self.namespace):
            raise RenderError(f"--namespace: {self.namespace!r} is not a Kubernetes name")
        if not self.image or any(c.isspace() for c in self.image):
            raise RenderError(f"--image: {self.image!r} is not an image reference")
        if self.extproc_address is not None:
            host_port(self.extproc_address, "--extproc-address")
        self._check_mtls()
        host_port(self.envoy_listen, "--envoy-listen")
        host_port(self.upstream, "--upstream")
        if self.cilium_service is not None:
            self.cilium_backend()  # validates
        if self.transport not in TRANSPORTS:
            raise RenderError(f"--transport: expected grpc or http, got {self.transport!r}")
        if self.direction is Direction.AUTO:
            raise RenderError("--direction: expected edge, outbound or inbound, got auto")
        self._check_tracing()
        if self.cilium_direction not in CILIUM_DIRECTIONS:
            raise RenderError(
                f"--cilium-direction: expected edge or outbound, got {self.cilium_direction}"
            )

    def _check_tracing(self) -> None:
        if self.tracing_zipkin is not None and self.tracing_otlp is not None:
            raise RenderError(
                "--tracing-zipkin and --tracing-otlp: an HTTP connection manager has one "
                "tracer, give one of them"
            )
        for flag, value in (("--tracing-zipkin", self.tracing_zipkin),
                            ("--tracing-otlp", self.tracing_otlp)):  # fmt: skip
            if value is not None:
                host_port(value, flag)

    @property
    def tracer(self) -> tuple[str, str] | None:
        """(ZIPKIN or OTLP, HOST:PORT) of the standalone Envoy's tracer, if one is named."""
        if self.tracing_zipkin is not None:
            return ZIPKIN, self.tracing_zipkin
        if self.tracing_otlp is not None:
            return OTLP, self.tracing_otlp
        return None

    def _check_mtls(self) -> None:
        mtls = self.extproc_mtls
        if mtls is None:
            return
        if self.extproc_tls_ca is not None:
            raise RenderError(
                "--extproc-mtls includes the CA: give it or --extproc-tls-ca, not both"
            )
        if mtls != MESH_IDENTITY and not (mtls.startswith("/") and mtls.strip("/")):
            raise RenderError(
                f"--extproc-mtls: expected an absolute directory inside the proxy or "
                f"{MESH_IDENTITY!r}, got {mtls!r}"
            )

    @property
    def server_tls(self) -> bool:
        """Whether the server serves TLS (and, with mTLS, requires client certificates)."""
        return self.extproc_tls_ca is not None or self.extproc_mtls is not None

    def extproc_target(self, *, in_cluster: bool) -> tuple[str, int]:
        """Where Envoy reaches the server."""
        if self.extproc_address is not None:
            return host_port(self.extproc_address, "--extproc-address")
        port = HTTP_PORT if self.transport == HTTP else GRPC_PORT
        if in_cluster:
            return f"{NAME}.{self.namespace}.svc.cluster.local", port
        return "127.0.0.1", port

    def cilium_backend(self) -> tuple[str, str, int]:
        """(namespace, name, port) of the Cilium service."""
        if self.cilium_service is None:
            raise RenderError(
                "--cilium-service is required for cilium: the Service port whose traffic "
                "passes the doctor, NAMESPACE/NAME:PORT (its port number, not the target port)"
            )
        where, _, port = self.cilium_service.rpartition(":")
        namespace, _, name = where.partition("/")
        if not (_LABEL.fullmatch(namespace) and _LABEL.fullmatch(name) and port.isdigit()):
            raise RenderError(
                f"--cilium-service: expected NAMESPACE/NAME:PORT, got {self.cilium_service!r}"
            )
        return namespace, name, int(port)
