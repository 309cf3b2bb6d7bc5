"""A stand-in for cilium-agent's part in a CiliumEnvoyConfig: what it publishes and redirects.

Given a rendered CEC (or CCEC) and the cluster's Services with their EndpointSlices, it
computes the ClusterLoadAssignments cilium-agent would send cilium-envoy by EDS (names,
and which backends each holds) and which Service ports it redirects into the listener.
Each rule is copied from cilium/cilium's source (facts, not code), cited where it is used:

- C1 `k8s_reflector.go:145-165` at 011404e06ed8, the CEC transform: the ports a CEC names
  for a Service are the union of `services[].ports` (numbers) and `backendServices[].number`
  (numbers or port names).
- C2 `controller.go:398-536` at 01c123c6ae9c, `computeLoadAssignments`: with no ports
  named, every active backend goes under the key `*` (:420, :433); otherwise a backend
  with port names matches a named port by name, or by that name's Service port number
  (:451-467); a backend without a port name matches the Service's nameless port by number
  (:435-446). Each key K is published as `NS/NAME:K` (:521), and `*` also as plain
  `NS/NAME` (:527, "for backward compatibility").
- C3 `controller.go:79-99` at 01c123c6ae9c, `getProxyRedirect`: a `services[]` entry
  redirects with `Ports: svcl.Ports` (:97); pkg/loadbalancer/service.go:164-169 at
  008d8c1b7110, `ProxyRedirect.Redirects`: an empty list redirects every frontend port,
  otherwise only the listed ones.
- C4 namespaces: a `services[]` entry of a namespaced CEC is always the CEC's namespace
  (testdata/namespaced-cross.txtar at 24564ecd6f3a); a `backendServices[]` namespace
  defaults to the CEC's (CCEC: `default`), per the field's doc in
  pkg/k8s/apis/cilium.io/v2/cec_types.go at 25972d8e8c67.

The backends are the EndpointSlice's: one per (address, port), carrying the names of the
slice ports with that number, as Cilium's Table[Backend] holds them
(testdata/backendservices.txtar at 035b1474d6dc: one backend 2.1.0.1:9080 for the ports
`http` and `http-alt`). Cases from Cilium's own script tests, in
data/cilium_agent_cases.yaml, check this module against the results Cilium recorded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ANY_PORT = "*"
CLA_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


@dataclass(frozen=True)
class Service:
    """A Service and its EndpointSlice: frontend ports by name, slice ports, ready addresses."""

    namespace: str
    name: str
    ports: Mapping[str, int]  # Service port name ("" for a nameless one) -> its port number
    slice_ports: tuple[tuple[str, int], ...]  # EndpointSlice (name, port)
    addresses: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def backends(self) -> dict[tuple[str, int], tuple[str, ...]]:
        """(address, port) -> the slice port names with that number (empty: nameless)."""
        names: dict[int, list[str]] = {}
        for name, port in self.slice_ports:
            names.setdefault(port, [])
            if name:
                names[port].append(name)
        return {(a, p): tuple(n) for a in self.addresses for p, n in names.items()}


def _referenced(cec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(kind, service key, entry) of each Service the CEC names, namespaces as C4 says."""
    own = cec["metadata"].get("namespace")
    spec = cec["spec"]
    out = []
    for entry in spec.get("services", []):
        namespace = own or entry.get("namespace") or "default"
        out.append(("services", f"{namespace}/{entry['name']}", entry))
    for entry in spec.get("backendServices", []):
        namespace = entry.get("namespace") or own or "default"
        out.append(("backendServices", f"{namespace}/{entry['name']}", entry))
    return out


def named_ports(cec: dict[str, Any]) -> dict[str, set[str]]:
    """Rule C1: per Service key, the ports the CEC names (an empty set: none)."""
    ports: dict[str, set[str]] = {}
    for kind, key, entry in _referenced(cec):
        named = entry.get("ports", []) if kind == "services" else entry.get("number", [])
        ports.setdefault(key, set()).update(str(p) for p in named)
    return ports


def _keys(ports: set[str], names: tuple[str, ...], service: Service) -> list[str]:
    """Rule C2: the keys one backend is published under."""
    if not ports:
        return [ANY_PORT]
    if not names:
        return [str(n) for name, n in service.ports.items() if not name and str(n) in ports]
    keys = []
    for name in names:
        if name in ports:
            keys.append(name)
        elif name in service.ports and str(service.ports[name]) in ports:
            keys.append(str(service.ports[name]))
    return keys


def load_assignments(
    cec: dict[str, Any], services: Mapping[str, Service]
) -> dict[str, list[tuple[str, int]]]:
    """Rule C2: assignment name -> its endpoints, for every Service the CEC names."""
    out: dict[str, list[tuple[str, int]]] = {}
    for key, ports in named_ports(cec).items():
        service = services.get(key)
        if service is None:
            continue  # no Service (yet): no endpoints (controller.go, backendProcessor)
        by_key: dict[str, list[tuple[str, int]]] = {}
        for backend, names in service.backends().items():
            for k in _keys(ports, names, service):
                by_key.setdefault(k, []).append(backend)
        for k, backends in sorted(by_key.items()):
            out[f"{key}:{k}"] = sorted(backends)
            if k == ANY_PORT:
                out[key] = sorted(backends)
    return out


def redirected_ports(cec: dict[str, Any], services: Mapping[str, Service]) -> dict[str, set[int]]:
    """Rule C3: per Service key, the frontend ports sent into the CEC's listener."""
    out: dict[str, set[int]] = {}
    for kind, key, entry in _referenced(cec):
        service = services.get(key)
        if kind != "services" or service is None:
            continue
        listed = {int(p) for p in entry.get("ports", [])}
        frontends = set(service.ports.values())
        out.setdefault(key, set()).update(frontends if not listed else frontends & listed)
    return out


def cluster_load_assignment(name: str, endpoints: list[tuple[str, int]]) -> dict[str, Any]:
    """The assignment as Envoy's JSON, one locality as Cilium sends it."""
    lb_endpoints = [
        {"endpoint": {"address": {"socket_address": {"address": a, "port_value": p}}}}
        for a, p in endpoints
    ]
    return {"@type": CLA_TYPE, "cluster_name": name, "endpoints": [{"lb_endpoints": lb_endpoints}]}


def eds_resource_name(cluster: dict[str, Any]) -> str:
    """The assignment an EDS cluster asks for: its service_name, else its own name."""
    return str(cluster.get("eds_cluster_config", {}).get("service_name") or cluster["name"])


def feed_from_files(
    clusters: list[dict[str, Any]], published: Mapping[str, list[tuple[str, int]]], where: Path
) -> list[str]:
    """Point each EDS cluster whose assignment is published at a file holding it.

    Only the config source changes (a `path_config_source`, one file per assignment,
    as Envoy's EDS takes exactly one resource per update); names stay as rendered.
    Returns the EDS resource names that nothing publishes (those clusters keep their
    source and never get endpoints).
    """
    missing = []
    for cluster in clusters:
        if cluster.get("type") != "EDS":
            continue
        name = eds_resource_name(cluster)
        if name not in published:
            missing.append(name)
            continue
        path = where / f"eds-{len(list(where.iterdir()))}.json"
        response = {
            "version_info": "1",
            "resources": [cluster_load_assignment(name, published[name])],
        }
        path.write_text(json.dumps(response), encoding="utf-8")
        eds = cluster.setdefault("eds_cluster_config", {})
        eds["eds_config"] = {
            "path_config_source": {"path": str(path)},
            "resource_api_version": "V3",
        }
    return missing
