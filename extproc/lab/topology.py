"""The lab: one Envoy that plays a client sidecar and the mesh servers it calls.

```
client --HTTP--> [client_sidecar listener, ext_proc filter] --Host picks a cluster-->
    echo.demo         plaintext         -> echo upstream (Python)
    refused.demo      plaintext         -> a port where nothing listens
    not-tls.demo      mesh TLS          -> echo upstream (plaintext)
    mtls.demo         plaintext         -> mtls_server listener (requires client certs)
    san.demo          mesh TLS          -> mtls_server, expecting SAN .../sa/api (it is .../sa/web)
    untrusted.demo    mesh TLS          -> untrusted_server (certificate from another CA)
    expired.demo      mesh TLS          -> expired_server (certificate expired)
    app-error.demo    plaintext         -> status upstream answering 503
    api.demo          only /api/        -> echo upstream; other paths: no route
    * (allow_any)     plaintext         -> PassthroughCluster -> mtls_server, like Istio's
                                           passthrough for a Host that is no mesh service
```

One process starts fast and is cheap on a small machine. The server-side listeners answer
with a direct response, so the only Python upstreams are the echo and status servers.
The bootstrap is built from small functions in Envoy's JSON shape (`cluster()`,
`route()`, `upstream_tls()` ...), so `bootstrap()` reads as the table above.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from extproc.filter_config import ext_proc_cluster, ext_proc_filter
from extproc.lab.certs import CertFiles, CertificateAuthority
from extproc.lab.envoy import EnvoyProcess, free_ports, wait_for_port
from extproc.lab.upstreams import echo_upstream, status_upstream

LOOPBACK = "127.0.0.1"
CLIENT_LISTENER = "client_sidecar"
EXTPROC_CLUSTER = "extproc"
SERVER_SNI = "web.default.svc.cluster.local"

# The client sidecar's JSON access log, keyed like Istio's JSON encoding so that
# `extproc.accesslog` reads it, plus what the doctor emitted: its response header and
# its whole dynamic metadata namespace.
ACCESS_LOG_FORMAT: dict[str, str] = {
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(:PATH)%",
    "authority": "%REQ(:AUTHORITY)%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "response_code_details": "%RESPONSE_CODE_DETAILS%",
    "upstream_transport_failure_reason": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    "route_name": "%ROUTE_NAME%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_service_time": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "extproc_diagnosis": "%RESP(X-EXTPROC-DIAGNOSIS)%",
    "extproc_doctor": "%DYNAMIC_METADATA(extproc_doctor)%",
}


def spiffe_id(service_account: str, namespace: str = "default") -> str:
    """The SPIFFE ID Istio gives a workload in the `cluster.local` trust domain."""
    return f"spiffe://cluster.local/ns/{namespace}/sa/{service_account}"


# --- Envoy config builders -------------------------------------------------------------


def socket_address(port: int) -> dict[str, Any]:
    """A loopback address."""
    return {"socket_address": {"address": LOOPBACK, "port_value": port}}


def cluster(
    name: str,
    port: int,
    *,
    tls: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A STATIC cluster of one loopback endpoint, optionally originating TLS."""
    config: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(port)}}]}],
        },
    }
    if tls is not None:
        config["transport_socket"] = tls
    if metadata is not None:
        config["metadata"] = metadata
    return config


def destination_rule(name: str, namespace: str = "default") -> dict[str, Any]:
    """Cluster metadata as Istio stamps it on a cluster shaped by a DestinationRule."""
    config = f"/apis/networking.istio.io/v1alpha3/namespaces/{namespace}/destination-rule/{name}"
    return {"filter_metadata": {"istio": {"config": config}}}


def upstream_tls(client: CertFiles, *, expect_san: str | None = None) -> dict[str, Any]:
    """Mesh TLS origination: present `client`, trust its CA, optionally require a URI SAN."""
    validation: dict[str, Any] = {"trusted_ca": {"filename": str(client.trusted_ca)}}
    if expect_san is not None:
        validation["match_typed_subject_alt_names"] = [
            {"san_type": "URI", "matcher": {"exact": expect_san}}
        ]
    context = {
        "sni": SERVER_SNI,
        "common_tls_context": {
            "tls_certificates": [_tls_certificate(client)],
            "validation_context": validation,
        },
    }
    return _tls_socket("UpstreamTlsContext", context)


def downstream_tls(server: CertFiles, *, require_client_certificate: bool) -> dict[str, Any]:
    """Server-side TLS: present `server`; with mTLS, demand a client cert from its CA."""
    common: dict[str, Any] = {"tls_certificates": [_tls_certificate(server)]}
    if require_client_certificate:
        common["validation_context"] = {"trusted_ca": {"filename": str(server.trusted_ca)}}
    context = {
        "require_client_certificate": require_client_certificate,
        "common_tls_context": common,
    }
    return _tls_socket("DownstreamTlsContext", context)


def route(name: str, cluster_name: str, *, prefix: str = "/") -> dict[str, Any]:
    """A named route sending a path prefix to a cluster."""
    return {"name": name, "match": {"prefix": prefix}, "route": {"cluster": cluster_name}}


def virtual_host(domain: str, *routes: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    """A virtual host for one Host (`*` for the catch-all)."""
    return {"name": name or domain, "domains": [domain], "routes": list(routes)}


def http_listener(
    name: str,
    port: int,
    virtual_hosts: Iterable[dict[str, Any]],
    *,
    http_filters: Iterable[dict[str, Any]] = (),
    access_log: Path | None = None,
    tls: dict[str, Any] | None = None,
    direction: str | None = None,
) -> dict[str, Any]:
    """A loopback listener with one HTTP connection manager; the router filter goes last."""
    manager: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "route_config": {"name": name, "virtual_hosts": list(virtual_hosts)},
        # Lets a client find its request in the access log (`Lab.access_log_entry`).
        "always_set_request_id_in_response": True,
        "http_filters": [*http_filters, _ROUTER],
    }
    if access_log is not None:
        manager["access_log"] = [json_access_log(access_log)]
    chain: dict[str, Any] = {
        "filters": [
            {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}
        ]
    }
    if tls is not None:
        chain["transport_socket"] = tls
    listener: dict[str, Any] = {
        "name": name,
        "address": socket_address(port),
        "filter_chains": [chain],
    }
    if direction is not None:
        listener["traffic_direction"] = direction
    return listener


def server_listener(name: str, port: int, cert: CertFiles, *, mtls: bool = False) -> dict[str, Any]:
    """A mesh workload's inbound side: TLS with `cert` (mTLS if asked), 200 to every request."""
    answer = {
        "name": name,
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": f"hello from {name}\n"}},
    }
    tls = downstream_tls(cert, require_client_certificate=mtls)
    vhosts = [virtual_host("*", answer, name=name)]
    return http_listener(name, port, vhosts, tls=tls, direction="INBOUND")


def json_access_log(path: Path) -> dict[str, Any]:
    """A file access log writing one JSON object per request."""
    return {
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(path),
            "log_format": {"json_format": ACCESS_LOG_FORMAT},
        },
    }


_ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}


def _tls_certificate(files: CertFiles) -> dict[str, Any]:
    return {
        "certificate_chain": {"filename": str(files.cert_chain)},
        "private_key": {"filename": str(files.private_key)},
    }


_TLS_TYPE_PREFIX = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"


def _tls_socket(context_type: str, context: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": f"{_TLS_TYPE_PREFIX}.{context_type}",
            **context,
        },
    }


# --- The lab topology ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LabPorts:
    """The loopback ports the bootstrap names (the client listener binds port 0)."""

    echo: int
    app_error: int
    refused: int
    mtls_server: int
    untrusted_server: int
    expired_server: int


@dataclass(frozen=True, slots=True)
class LabCerts:
    """Certificate bundles: the client sidecar's, and one per server-side listener."""

    client: CertFiles
    web: CertFiles
    untrusted_web: CertFiles
    expired_web: CertFiles

    @classmethod
    def create(cls, directory: Path) -> LabCerts:
        """Issue the lab's certificates from a mesh CA and an unrelated CA, into `directory`."""
        mesh = CertificateAuthority.create("mesh")
        other = CertificateAuthority.create("other-mesh")
        web = spiffe_id("web")
        return cls(
            client=mesh.issue(spiffe_id=spiffe_id("client")).write(directory, "client"),
            web=mesh.issue(spiffe_id=web, dns_names=[SERVER_SNI]).write(directory, "web"),
            untrusted_web=other.issue(spiffe_id=web).write(directory, "untrusted-web"),
            expired_web=mesh.issue(spiffe_id=web, expired=True).write(directory, "expired-web"),
        )


def bootstrap(
    extproc_address: tuple[str, int],
    ports: LabPorts,
    certs: LabCerts,
    access_log: Path,
) -> dict[str, Any]:
    """The lab's Envoy bootstrap: the client sidecar, its clusters, the server listeners."""
    mesh_tls = upstream_tls(certs.client, expect_san=spiffe_id("web"))
    clusters = [
        cluster("echo", ports.echo),
        cluster("refused", ports.refused),
        cluster("not_tls", ports.echo, tls=mesh_tls),
        cluster("mtls_plaintext", ports.mtls_server, metadata=destination_rule("mtls-disable")),
        cluster(
            "san_mismatch",
            ports.mtls_server,
            tls=upstream_tls(certs.client, expect_san=spiffe_id("api")),
        ),
        cluster("untrusted", ports.untrusted_server, tls=mesh_tls),
        cluster("expired", ports.expired_server, tls=mesh_tls),
        cluster("app_error", ports.app_error),
        cluster("PassthroughCluster", ports.mtls_server),
        ext_proc_cluster(EXTPROC_CLUSTER, *extproc_address),
    ]
    virtual_hosts = [
        virtual_host("echo.demo", route("echo", "echo")),
        virtual_host("refused.demo", route("refused", "refused")),
        virtual_host("not-tls.demo", route("not_tls", "not_tls")),
        virtual_host("mtls.demo", route("mtls_plaintext", "mtls_plaintext")),
        virtual_host("san.demo", route("san_mismatch", "san_mismatch")),
        virtual_host("untrusted.demo", route("untrusted", "untrusted")),
        virtual_host("expired.demo", route("expired", "expired")),
        virtual_host("app-error.demo", route("app_error", "app_error")),
        virtual_host("api.demo", route("api", "echo", prefix="/api/")),
        virtual_host("*", route("allow_any", "PassthroughCluster"), name="allow_any"),
    ]
    client = http_listener(
        CLIENT_LISTENER,
        0,
        virtual_hosts,
        http_filters=[ext_proc_filter(EXTPROC_CLUSTER)],
        access_log=access_log,
        direction="OUTBOUND",
    )
    servers = [
        server_listener("mtls_server", ports.mtls_server, certs.web, mtls=True),
        server_listener("untrusted_server", ports.untrusted_server, certs.untrusted_web),
        server_listener("expired_server", ports.expired_server, certs.expired_web),
    ]
    return {"static_resources": {"listeners": [client, *servers], "clusters": clusters}}


@dataclass(frozen=True, slots=True)
class Response:
    """What the client got back: header names lower-cased, in order, duplicates kept."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header `name` (any case), or None."""
        wanted = name.lower()
        return next((value for key, value in self.headers if key == wanted), None)


Headers = Mapping[str, str] | Iterable[tuple[str, str]]
LogEntry = dict[str, Any]
T = TypeVar("T")


class Lab:
    """The running lab for the duration of a `with` block: upstreams, certificates, Envoy.

    `extproc_address` is where the ext_proc server listens; it need not be up yet, since
    the filter fails open. Certificates, the bootstrap and the logs go to `workdir`.
    """

    def __init__(
        self, extproc_address: tuple[str, int], workdir: Path, *, ready_timeout: float = 20.0
    ) -> None:
        self.extproc_address = extproc_address
        self.workdir = workdir
        self.access_log_path = workdir / "access.log"
        self._ready_timeout = ready_timeout
        self._stack: ExitStack | None = None
        self._envoy: EnvoyProcess | None = None
        self._port: int | None = None

    @property
    def envoy(self) -> EnvoyProcess:
        """The lab's Envoy process (admin port, log)."""
        if self._envoy is None:
            raise RuntimeError("the lab is not running")
        return self._envoy

    @property
    def port(self) -> int:
        """The client sidecar listener's port on 127.0.0.1."""
        if self._port is None:
            raise RuntimeError("the lab is not running")
        return self._port

    @property
    def url(self) -> str:
        """The client sidecar listener's base URL."""
        return f"http://{LOOPBACK}:{self.port}"

    def __enter__(self) -> Self:
        with ExitStack() as stack:
            echo = stack.enter_context(echo_upstream())
            app_error = stack.enter_context(status_upstream(503))
            refused, mtls, untrusted, expired = free_ports(4)
            ports = LabPorts(
                echo=echo.port,
                app_error=app_error.port,
                refused=refused,
                mtls_server=mtls,
                untrusted_server=untrusted,
                expired_server=expired,
            )
            config = bootstrap(
                self.extproc_address, ports, LabCerts.create(self.workdir), self.access_log_path
            )
            envoy = stack.enter_context(
                EnvoyProcess(config, workdir=self.workdir, ready_timeout=self._ready_timeout)
            )
            port = envoy.listener_ports()[CLIENT_LISTENER]
            wait_for_port(LOOPBACK, port, timeout=self._ready_timeout)
            self._stack, self._envoy, self._port = stack.pop_all(), envoy, port
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._stack is not None:
                self._stack.close()
        finally:
            self._stack = self._envoy = self._port = None

    def request(
        self,
        host: str | None,
        path: str = "/",
        headers: Headers = (),
        *,
        method: str = "GET",
        timeout: float = 10.0,
    ) -> Response:
        """Send one request through the client sidecar and read the whole answer (blocking).

        `host` becomes the Host header; with None, none is added (pass your own, even two).
        """
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=timeout)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            if host is not None:
                conn.putheader("Host", host)
            pairs = headers.items() if isinstance(headers, Mapping) else headers
            for name, value in pairs:
                conn.putheader(name, value)
            conn.endheaders()
            answer = conn.getresponse()
            pairs_back = [(name.lower(), value) for name, value in answer.getheaders()]
            return Response(answer.status, pairs_back, answer.read())
        finally:
            conn.close()

    def access_log_entries(self, *, at_least: int = 0, timeout: float = 5.0) -> list[LogEntry]:
        """The client sidecar's access log, one dict per request, once it has `at_least`.

        Envoy writes an entry after the response and flushes the file every 100 ms.
        """
        return self._wait_for_log(
            lambda entries: entries if len(entries) >= at_least else None,
            timeout,
            f"{at_least} access log entries",
        )

    def access_log_entry(self, request_id: str, *, timeout: float = 5.0) -> LogEntry:
        """The access log entry of one request, by the `x-request-id` its response carries."""
        return self._wait_for_log(
            lambda entries: next((e for e in entries if e.get("request_id") == request_id), None),
            timeout,
            f"the access log entry of request {request_id}",
        )

    def _wait_for_log(
        self, pick: Callable[[list[LogEntry]], T | None], timeout: float, what: str
    ) -> T:
        """Re-read the access log until `pick` finds something in it."""
        deadline = time.monotonic() + timeout
        while (found := pick(self._read_access_log())) is None:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no {what} in {self.access_log_path} after {timeout:g}s")
            time.sleep(0.05)
        return found

    def _read_access_log(self) -> list[LogEntry]:
        try:
            text = self.access_log_path.read_text()
        except FileNotFoundError:
            return []
        # Whatever follows the last newline is an entry still being written.
        complete = text.split("\n")[:-1]
        return [json.loads(line) for line in complete if line]
