"""The rendered EnvoyFilters as istiod would apply them: which proxies, which listeners, what order.

The Istio stand-in (istio_pilot.py) selects, orders and applies the EnvoyFilters with
istiod's rules to listeners built as istiod builds them; these tests read where the
doctor's filters land and which direction they declare.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.filter_config import ANNOTATION_GUARD_FILTER, DIRECTION_METADATA
from extproc.render import RenderMode, RenderOptions
from extproc.render.istio import render_envoy_filters
from extproc.render.options import NAME, IstioScope

from .istio_pilot import HCM, ROUTER, Proxy, apply, patch_listener, patches_for

PATCH_CASES = yaml.safe_load(
    (Path(__file__).parent / "data" / "istio_patch_cases.yaml").read_text()
)
ORDER_CASES = yaml.safe_load(
    (Path(__file__).parent / "data" / "istio_order_cases.yaml").read_text()
)

ROOT = "istio-system"
SIDECAR = Proxy("web", router=False, namespace="default", labels={"app": "web"})
HBONE_SIDECAR = Proxy("web", router=False, namespace="default", labels={"app": "web"}, hbone=True)
INGRESS = Proxy("in", router=True, namespace=ROOT, labels={"istio": "ingressgateway"})
EGRESS = Proxy("out", router=True, namespace=ROOT, labels={"istio": "egressgateway"})


def rendered(mode: RenderMode = RenderMode.ALWAYS, **scope: Any) -> list[dict[str, Any]]:
    return render_envoy_filters(RenderOptions(mode=mode, istio=IstioScope(**scope)))


def filters_of(listeners: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    (lis,) = [lis for lis in listeners if lis["name"] == name]
    return list(lis["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"])


def doctor(filters: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """(position, declared direction) of each of the doctor's filters."""
    out = []
    for n, f in enumerate(filters):
        text = json.dumps(f)
        if DIRECTION_METADATA in text:
            direction = text.split(f'"key": "{DIRECTION_METADATA}", "value": "')[1].split('"')[0]
            out.append((n, direction))
    return out


def names(filters: list[dict[str, Any]]) -> list[str]:
    return [f["name"] for f in filters]


def user_insert_first(namespace: str, context: str) -> dict[str, Any]:
    """A user's EnvoyFilter at the default priority putting its own filter first."""
    value = {"name": "user.first", "typed_config": {"@type": "type.googleapis.com/x"}}
    return {
        # Created after ours, as a user's filter applied to a running mesh would be.
        "metadata": {
            "name": "user",
            "namespace": namespace,
            "creationTimestamp": "2026-12-02T10:00:00Z",
        },
        "spec": {
            "configPatches": [
                {
                    "applyTo": "HTTP_FILTER",
                    "match": {"context": context},
                    "patch": {"operation": "INSERT_FIRST", "value": value},
                }
            ]
        },
    }


class TestStandInMatchesIstio:
    @pytest.mark.parametrize("case", ORDER_CASES["cases"], ids=lambda c: c["name"].split()[0])
    def test_order_of_envoy_filters(self, case):
        """The stand-in applies EnvoyFilters in the order istiod's own tests expect."""
        envoy_filters = [
            {
                "metadata": {
                    "name": f["name"],
                    "namespace": f["namespace"],
                    "creationTimestamp": f["created"],
                },
                "spec": {
                    "priority": f.get("priority", 0),
                    "configPatches": [
                        {
                            "applyTo": "HTTP_FILTER",
                            "match": {"proxy": {"proxyVersion": "foobar"}},
                            "patch": {"operation": "INSERT_BEFORE", "value": {"name": f["name"]}},
                        }
                    ],
                },
            }
            for f in case["filters"]
        ]
        proxy = Proxy("p", router=False, namespace=case["proxy"]["namespace"], version="foobar")
        patches = patches_for(envoy_filters, proxy, case["root_namespace"])
        by_name = {f["metadata"]["name"]: f["metadata"]["namespace"] for f in envoy_filters}
        got = [
            f"{by_name[p['patch']['value']['name']]}/{p['patch']['value']['name']}" for p in patches
        ]
        assert got == case["expected"]


def as_envoy_filters(patch_set: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One EnvoyFilter per patch in namespace not-default, created in list order (the test's)."""
    out = []
    for n, p in enumerate(patch_set):
        listener: dict[str, Any] = {
            "filterChain": {"filter": {"name": HCM, "subFilter": {"name": p["subFilter"]}}}
        }
        for key in ("portNumber", "name"):
            if key in p or (key == "name" and "listener" in p):
                listener[key] = p[key] if key in p else p["listener"]
        if "sni" in p:
            listener["filterChain"]["sni"] = p["sni"]
        patch: dict[str, Any] = {"operation": p["operation"]}
        if "value" in p:
            patch["value"] = {"name": p["value"]}
        match = {"context": p.get("context", "ANY"), "listener": listener}
        out.append(
            {
                "metadata": {
                    "name": f"test-envoyfilter-{n}",
                    "namespace": "not-default",
                    "creationTimestamp": f"2026-01-01T00:00:{n:02d}Z",
                },
                "spec": {
                    "priority": p.get("priority", 0),
                    "configPatches": [{"applyTo": "HTTP_FILTER", "match": match, "patch": patch}],
                },
            }
        )
    return out


def case_listener(spec: dict[str, Any]) -> dict[str, Any]:
    chains = []
    for c in spec["chains"]:
        fcm = {k: c[k] for k in ("server_names", "destination_port") if k in c}
        manager = {"http_filters": [{"name": f} for f in c["filters"]]}
        chain = {"filter_chain_match": fcm, "filters": [{"name": HCM, "typed_config": manager}]}
        chains.append({**chain, "name": c["name"]} if "name" in c else chain)
    address = {"socket_address": {"address": "0.0.0.0", "port_value": spec["port"]}}
    return {"name": spec["name"], "address": address, "filter_chains": chains}


class TestStandInPatchesAsIstio:
    @pytest.mark.parametrize("case", PATCH_CASES["cases"], ids=lambda c: c["name"].split(" (")[0])
    def test_listener_patches(self, case):
        """The stand-in's HTTP filter patches give the filter lists istiod's own test expects."""
        envoy_filters = as_envoy_filters(PATCH_CASES["patch_sets"][case["patch_set"]])
        proxy = Proxy("p", router=case["router"], namespace="not-default", version="1.2.2")
        patches = patches_for(envoy_filters, proxy, "istio-system")
        for spec in case["listeners"]:
            patched = patch_listener(case_listener(spec), case["context"], patches)
            for chain, expected in zip(patched["filter_chains"], spec["chains"], strict=True):
                manager = chain["filters"][0]["typed_config"]
                assert [f["name"] for f in manager["http_filters"]] == expected["expected"]


@pytest.mark.parametrize("mode", list(RenderMode))
class TestWhereTheDoctorLands:
    def test_sidecar_outbound_first_and_outbound(self, mode):
        """On a sidecar's outbound listener the doctor is first (ahead of metadata exchange), declaring outbound."""
        listeners, _ = apply(rendered(mode), SIDECAR, ROOT)
        filters = filters_of(listeners, "0.0.0.0_8080")
        found = doctor(filters)
        assert found and found[0][0] == 0
        assert {d for _, d in found} == {"outbound"}
        after = filters[found[-1][0] + 1 :]
        assert names(after)[:2] == [ANNOTATION_GUARD_FILTER, "istio.metadata_exchange"]

    def test_sidecar_inbound_just_before_the_router(self, mode):
        """On virtualInbound the doctor follows Istio's authn/authz and precedes the router, declaring inbound."""
        listeners, _ = apply(rendered(mode), SIDECAR, ROOT)
        filters = filters_of(listeners, "virtualInbound")
        found = doctor(filters)
        assert {d for _, d in found} == {"inbound"}
        assert names(filters)[-2:] == [ANNOTATION_GUARD_FILTER, ROUTER]
        assert names(filters).index("envoy.filters.http.rbac") < found[0][0]

    def test_ingress_gateway_first_and_edge(self, mode):
        """On the ingress gateway the doctor is first and declares the edge (Istio marks it OUTBOUND)."""
        listeners, _ = apply(rendered(mode), INGRESS, ROOT)
        found = doctor(filters_of(listeners, "0.0.0.0_8080"))
        assert found and found[0][0] == 0
        assert {d for _, d in found} == {"edge"}

    def test_egress_gateway_is_left_alone(self, mode):
        """An egress gateway gets neither the doctor nor its cluster: its clients are sidecars."""
        listeners, clusters = apply(rendered(mode), EGRESS, ROOT)
        assert doctor(filters_of(listeners, "0.0.0.0_8080")) == []
        assert clusters == []

    def test_hbone_tunnel_does_not_pass_the_doctor(self, mode):
        """With HBONE, connect_terminate (the tunnel itself) has no doctor; main_internal's requests do."""
        listeners, _ = apply(rendered(mode), HBONE_SIDECAR, ROOT)
        assert doctor(filters_of(listeners, "connect_terminate")) == []
        assert {d for _, d in doctor(filters_of(listeners, "main_internal"))} == {"inbound"}

    def test_each_proxy_gets_the_cluster_once(self, mode):
        """The server's cluster is added once per sidecar and once per ingress gateway, never twice."""
        for proxy in (SIDECAR, INGRESS):
            _, clusters = apply(rendered(mode), proxy, ROOT)
            assert [c["name"] for c in clusters] == [NAME]


class TestCompetingFilters:
    @pytest.mark.parametrize(
        ("proxy", "listener", "context"),
        [
            (SIDECAR, "0.0.0.0_8080", "SIDECAR_OUTBOUND"),
            (INGRESS, "0.0.0.0_8080", "GATEWAY"),
        ],
    )
    @pytest.mark.parametrize("where", ["root", "workload"])
    def test_user_insert_first_lands_behind(self, proxy, listener, context, where):
        """A user's INSERT_FIRST at the default priority, root or workload namespace, lands behind the doctor."""
        namespace = ROOT if where == "root" else proxy.namespace
        envoy_filters = [*rendered(), user_insert_first(namespace, context)]
        listeners, _ = apply(envoy_filters, proxy, ROOT)
        filters = filters_of(listeners, listener)
        assert doctor(filters)[0][0] == 0
        assert "user.first" in names(filters)

    def test_a_higher_priority_goes_ahead(self):
        """A user who needs to be ahead of the doctor can: with a higher priority."""
        user = user_insert_first(SIDECAR.namespace, "SIDECAR_OUTBOUND")
        user["spec"]["priority"] = 2000
        listeners, _ = apply([*rendered(), user], SIDECAR, ROOT)
        assert names(filters_of(listeners, "0.0.0.0_8080"))[0] == "user.first"


class TestScope:
    def test_one_namespace_only(self):
        """--istio-namespace: that namespace's sidecars get the doctor, other namespaces' do not."""
        envoy_filters = rendered(namespace="shop")
        shop = Proxy("cart", router=False, namespace="shop", labels={"app": "cart"})
        for proxy, expected in ((shop, True), (SIDECAR, False)):
            listeners, _ = apply(envoy_filters, proxy, ROOT)
            assert bool(doctor(filters_of(listeners, "0.0.0.0_8080"))) is expected

    def test_workload_selector(self):
        """--istio-selector: only sidecars whose labels include it."""
        envoy_filters = rendered(workload_selector=(("app", "cart"),))
        cart = Proxy("cart", router=False, namespace="default", labels={"app": "cart", "v": "1"})
        for proxy, expected in ((cart, True), (SIDECAR, False)):
            listeners, _ = apply(envoy_filters, proxy, ROOT)
            assert bool(doctor(filters_of(listeners, "virtualInbound"))) is expected

    def test_one_gateway(self):
        """--istio-gateway-selector and --istio-only gateways: that gateway alone, no sidecar."""
        selector = (("gateway.networking.k8s.io/gateway-name", "public"),)
        envoy_filters = rendered(gateway_selector=selector, sidecars=False)
        public = Proxy("public", router=True, namespace=ROOT, labels=dict(selector))
        listeners, _ = apply(envoy_filters, public, ROOT)
        assert doctor(filters_of(listeners, "0.0.0.0_8080"))
        for proxy in (INGRESS, SIDECAR):
            listeners, _ = apply(envoy_filters, proxy, ROOT)
            assert doctor(filters_of(listeners, "0.0.0.0_8080")) == []

    def test_root_namespace_is_the_meshes(self):
        """With meshConfig.rootNamespace istio-config, --istio-root-namespace reaches every namespace."""
        envoy_filters = rendered(root_namespace="istio-config")
        listeners, _ = apply(envoy_filters, SIDECAR, "istio-config")
        assert doctor(filters_of(listeners, "0.0.0.0_8080"))
        listeners, _ = apply(rendered(), SIDECAR, "istio-config")
        assert doctor(filters_of(listeners, "0.0.0.0_8080")) == []

    @pytest.mark.parametrize(
        ("version", "expected"), [("1.28.1", True), ("1.18.3", False), ("", False)]
    )
    def test_proxy_version(self, version, expected):
        """Only proxies whose Istio version has the filters the doctor needs are patched."""
        proxy = Proxy("web", router=False, namespace="default", version=version)
        listeners, clusters = apply(rendered(), proxy, ROOT)
        assert bool(doctor(filters_of(listeners, "0.0.0.0_8080"))) is expected
        assert bool(clusters) is expected
