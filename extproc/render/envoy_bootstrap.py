"""The `envoy` target: a standalone Envoy bootstrap in front of one upstream.

One listener, one route to the upstream, the doctor's filter before the router, the
ext_proc server's cluster, and an access log on stdout that carries the diagnosis from
dynamic metadata. It is the smallest complete deployment, and the one the end-to-end
test runs. The filter says where it sits (`--direction`, edge by default: a plain Envoy
is usually the front door). Upstream-sent `x-extproc-*` annotations, and the request
headers Envoy removes itself (`headers.native_removals`: the reveal token, and what the
policy strips by a fixed name here), are removed twice: by the guard filter after the
doctor's (for users who copy the filter list into their own Envoy) and by the route
configuration (for users who copy the route).
"""

from __future__ import annotations

from typing import Any

from extproc.filter_config import METADATA_NAMESPACE, discovery_type
from extproc.render.envoy_config import (
    Bootstrap,
    annotation_guard,
    doctor_filters,
    extproc_cluster,
    http_connection_manager,
    typed,
    without_annotations,
)
from extproc.render.gate import request_gate
from extproc.render.options import NAME, RenderOptions, host_port

LISTENER = "ingress"
UPSTREAM_CLUSTER = "upstream"
ADMIN_PORT = 9901

ACCESS_LOG_FORMAT = {
    "start_time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "authority": "%REQ(:AUTHORITY)%",
    "path": "%REQ(:PATH)%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "response_code_details": "%RESPONSE_CODE_DETAILS%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "extproc_doctor": f"%DYNAMIC_METADATA({METADATA_NAMESPACE})%",
}


def render_bootstrap(options: RenderOptions) -> dict[str, Any]:
    """The whole bootstrap, typed."""
    host, port = options.extproc_target(in_cluster=False)
    gate = request_gate(options.policy, options.direction)
    filters = [
        *doctor_filters(options.mode, NAME, gate, options.direction, options.transport),
        annotation_guard(options.policy, options.direction),
    ]
    bootstrap = {
        "admin": {"address": _address("127.0.0.1", ADMIN_PORT)},
        "static_resources": {
            "listeners": [_listener(options, filters)],
            "clusters": [
                _upstream_cluster(*host_port(options.upstream, "--upstream")),
                extproc_cluster(NAME, host, port, options),
            ],
        },
    }
    return typed(Bootstrap, bootstrap)


def _listener(options: RenderOptions, filters: list[dict[str, Any]]) -> dict[str, Any]:
    route = without_annotations(
        {
            "name": "local",
            "virtual_hosts": [
                {
                    "name": "upstream",
                    "domains": ["*"],
                    "routes": [
                        {
                            "name": UPSTREAM_CLUSTER,
                            "match": {"prefix": "/"},
                            "route": {"cluster": UPSTREAM_CLUSTER},
                        }
                    ],
                }
            ],
        },
        options.policy,
        options.direction,
    )
    access_log = {
        "name": "envoy.access_loggers.stdout",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            "log_format": {"json_format": ACCESS_LOG_FORMAT},
        },
    }
    manager = http_connection_manager(
        LISTENER, filters, route_config=route, access_log=[access_log]
    )
    return {
        "name": LISTENER,
        "address": _address(*host_port(options.envoy_listen, "--envoy-listen")),
        "filter_chains": [{"filters": [manager]}],
    }


def _upstream_cluster(host: str, port: int) -> dict[str, Any]:
    return {
        "name": UPSTREAM_CLUSTER,
        "type": discovery_type(host),
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": UPSTREAM_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(host, port)}}]}],
        },
    }


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}
