"""The forwarding headers at the edge, through a real Envoy 1.40 (threat-model T11, T24, T25).

Which `x-forwarded-*` headers does Envoy's HTTP connection manager set itself, and which
does it pass on from whatever a client sent? Envoy decides the first kind by its own
settings (`use_remote_address`, `xff_num_trusted_hops`, `forward_client_cert_details`,
`append_x_forwarded_port`); the doctor must remove the second kind at the edge, also when
the server is down, and keep them when the policy trusts proxies in front (`trusted_hops`).

`CLIENT_SENT` is this test's own list, gathered from what frameworks and proxies read or
write (each name with one that does), not from `extproc.headers`: a name the doctor's
list misses fails here.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import pytest

from extproc.config import Direction, Policy, policy_from_mapping
from extproc.filter_config import annotation_guard_filter, ext_proc_cluster, ext_proc_filter
from extproc.headers import native_removals
from extproc.lab.background import BackgroundServer
from extproc.lab.envoy import EnvoyProcess, free_port
from extproc.lab.topology import (
    cluster,
    http_connection_manager,
    route,
    socket_address,
    virtual_host,
)
from extproc.lab.upstreams import HttpUpstream, _EchoHandler
from extproc.server import ExtProcServer

pytestmark = pytest.mark.envoy

CLIENT_SENT = {
    "x-forwarded-for": "6.6.6.6",  # every proxy; Envoy appends with use_remote_address
    "x-forwarded-proto": "https",  # every proxy; Envoy sets it
    "x-forwarded-client-cert": "By=spiffe://evil",  # Envoy, Istio
    "x-forwarded-host": "evil.example",  # Django, Rails, Spring, Express, Werkzeug
    "x-forwarded-port": "8443",  # Django, Rails, Spring, Werkzeug
    "x-forwarded-prefix": "/evil",  # Spring, ASP.NET Core, Werkzeug, Traefik
    "x-forwarded-server": "evil",  # Apache mod_proxy, Traefik
    "x-forwarded-uri": "/evil",  # Traefik forward auth
    "x-forwarded-method": "DELETE",  # Traefik forward auth
    "x-forwarded-path": "/evil",  # a path prefix some API gateways pass on
    "x-forwarded-scheme": "https",  # Rack, ingress-nginx
    "x-forwarded-ssl": "on",  # Rack, Spring
    "x-forwarded-user": "admin",  # oauth2-proxy
    "x-forwarded-email": "admin@example.com",  # oauth2-proxy
    "x-forwarded-groups": "admins",  # oauth2-proxy
    "x-forwarded-preferred-username": "admin",  # oauth2-proxy
    "x-forwarded-access-token": "ey.evil",  # oauth2-proxy
    "forwarded": "for=6.6.6.6;host=evil.example",  # RFC 7239
    "x-real-ip": "6.6.6.6",  # nginx
}
EDGE_MANAGERS: dict[str, dict[str, Any]] = {
    "defaults": {},
    # What an Istio gateway sets (istio/istio pilot/pkg/networking/core/gateway.go:687,709
    # at 86c9f01f); with numTrustedProxies, xff_num_trusted_hops (gateway.go:734,741).
    "remote": {"use_remote_address": True},
    "trusted": {"use_remote_address": True, "xff_num_trusted_hops": 1},
    "port": {"use_remote_address": True, "append_x_forwarded_port": True},
}
# What Envoy 1.40 was seen to set with use_remote_address (an Istio gateway's setting).
ENVOY_OWN = {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-client-cert"}
TRUSTING = policy_from_mapping({"trusted_hops": 1})


class Edge:
    """One Envoy: bare edge listeners (no doctor) with each HCM setting, and doctor ones."""

    def __init__(self, ports: dict[str, int], server: BackgroundServer) -> None:
        self.ports, self.server = ports, server

    def received(self, listener: str, headers: dict[str, str]) -> dict[str, str]:
        """The request headers the upstream got through `listener`, by lower-case name."""
        conn = http.client.HTTPConnection("127.0.0.1", self.ports[listener], timeout=10)
        try:
            conn.request("GET", "/", headers=headers)
            response = conn.getresponse()
            assert response.status == 200
            body = json.loads(response.read())
        finally:
            conn.close()
        return {name.lower(): value for name, value in body["headers"]}


def _listener(name: str, port: int, filters: list[dict[str, Any]], **settings: Any) -> Any:
    manager = http_connection_manager(name, [virtual_host("*", route("r", "echo"))],
                                      http_filters=filters)  # fmt: skip
    manager["typed_config"].update(settings)
    return {
        "name": name,
        "address": socket_address(port),
        "filter_chains": [{"filters": [manager]}],
    }


def _doctor(server_cluster: str, policy: Policy) -> list[dict[str, Any]]:
    return [
        ext_proc_filter(server_cluster, direction="edge"),
        annotation_guard_filter(native_removals(policy, Direction.EDGE)),
    ]


@pytest.fixture(scope="module")
def edge() -> Iterator[Edge]:
    doctor = {
        "doctor": ("extproc", Policy(), EDGE_MANAGERS["remote"]),
        "down": ("dead", Policy(), EDGE_MANAGERS["remote"]),
        "trusting": ("extproc", TRUSTING, EDGE_MANAGERS["trusted"]),
        "trusting_down": ("dead", TRUSTING, EDGE_MANAGERS["trusted"]),
    }
    ports = {name: free_port() for name in [*EDGE_MANAGERS, *doctor]}
    with (
        HttpUpstream(_EchoHandler) as upstream,
        BackgroundServer(ExtProcServer(Policy())) as server,
    ):
        listeners = [_listener(n, ports[n], [], **s) for n, s in EDGE_MANAGERS.items()]
        listeners += [_listener(n, ports[n], _doctor(c, p), **s) for n, (c, p, s) in doctor.items()]
        bootstrap = {
            "static_resources": {
                "listeners": listeners,
                "clusters": [
                    cluster("echo", upstream.port),
                    ext_proc_cluster("extproc", "127.0.0.1", server.port),
                    ext_proc_cluster("dead", "127.0.0.1", free_port()),
                ],
            }
        }
        with EnvoyProcess(bootstrap):
            yield Edge(ports, server)


def envoy_sets(edge: Edge, listener: str) -> set[str]:
    """The names of `CLIENT_SENT` that Envoy itself adds, changes or removes at `listener`."""
    alone = edge.received(listener, {})
    sent = edge.received(listener, CLIENT_SENT)
    return {name for name, value in CLIENT_SENT.items() if name in alone or sent.get(name) != value}


class TestWhatEnvoySets:
    @pytest.mark.parametrize(
        ("listener", "expected"),
        [
            ("defaults", {"x-forwarded-proto", "x-forwarded-client-cert"}),
            ("remote", ENVOY_OWN),
            ("trusted", ENVOY_OWN),
            ("port", {*ENVOY_OWN, "x-forwarded-port"}),
        ],
    )
    def test_envoy_sets_only_these(self, edge, listener, expected):
        """Envoy 1.40 at an edge HCM sets (or sanitises) x-forwarded-proto and the client
        certificate header always, x-forwarded-for with use_remote_address, and
        x-forwarded-port only with append_x_forwarded_port; the rest of what a client
        sends passes on untouched."""
        assert envoy_sets(edge, listener) == expected


class TestTheEdgeRemovesTheRest:
    @pytest.mark.parametrize("listener", ["doctor", "down"])
    def test_upstream_gets_only_what_envoy_set(self, edge, listener):
        """With the server up or down, the upstream receives of a client's forwarding
        headers only those Envoy sets itself; Envoy's own values are untouched."""
        bare = edge.received("remote", CLIENT_SENT)
        received = edge.received(listener, CLIENT_SENT)
        envoys_own = envoy_sets(edge, "remote")
        for name in CLIENT_SENT:
            if name in envoys_own:
                assert received.get(name) == bare.get(name), name
            else:
                assert name not in received, name

    @pytest.mark.parametrize("listener", ["trusting", "trusting_down"])
    def test_trusted_hops_keep_what_the_proxy_in_front_set(self, edge, listener):
        """trusted_hops: 1 (beside xff_num_trusted_hops: 1) keeps the forwarding headers a
        load balancer in front set, with the server up or down."""
        with edge.server.policy(TRUSTING):
            received = edge.received(listener, CLIENT_SENT)
        for name, value in CLIENT_SENT.items():
            if name not in envoy_sets(edge, "trusted"):
                assert received.get(name) == value, name
