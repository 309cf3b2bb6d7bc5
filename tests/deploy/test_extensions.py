"""Every rendered manifest uses only extensions its mesh's Envoy compiles.

The oracles: `data/mesh_extensions.yaml` (each mesh's build file, quoted as data with its
commit) says which extensions a build has; a real Envoy's `/server_info` says which
extension each `@type` belongs to (`node.extensions[].type_urls`), so no table of ours
maps types to extensions.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config import Direction, Policy
from extproc.lab import EnvoyProcess
from extproc.render import RenderMode, RenderOptions, modes, render
from extproc.render.envoy_config import doctor_filters
from extproc.render.gate import request_gate

pytestmark = pytest.mark.envoy

DATA = yaml.safe_load((Path(__file__).parent / "data" / "mesh_extensions.yaml").read_text())
BUILDS = {build["name"]: build for build in DATA["builds"]}
_PREFIX = "type.googleapis.com/"


@pytest.fixture(scope="module")
def extension_of() -> Iterator[dict[str, set[str]]]:
    """Type URL -> the extensions registering it, as the installed Envoy reports them."""
    with EnvoyProcess({"static_resources": {}}) as envoy:
        _, body = envoy.admin_get("/server_info")
    found: dict[str, set[str]] = {}
    for extension in json.loads(body)["node"]["extensions"]:
        for url in extension.get("type_urls", []):
            found.setdefault(url, set()).add(extension["name"])
    yield found


def types_in(document: Any) -> set[str]:
    """Every `@type` in a document, without the type.googleapis.com/ prefix."""
    if isinstance(document, dict):
        own = {document["@type"].removeprefix(_PREFIX)} if "@type" in document else set()
        return own.union(*(types_in(v) for v in document.values()))
    if isinstance(document, list):
        return set().union(*(types_in(v) for v in document))
    return set()


def extensions_used(document: Any, extension_of: dict[str, set[str]]) -> dict[str, set[str]]:
    """Each extension-typed `@type` -> the extensions that could provide it.

    xDS resources (`envoy.config.*`) are not extensions. A type no extension lists (the
    composite filter's action) belongs to the extension that registers its proto package.
    """
    used: dict[str, set[str]] = {}
    for url in types_in(document):
        if url.startswith("envoy.config.") and url.count(".") == 4:
            continue
        package = url.rsplit(".", 1)[0]
        used[url] = extension_of.get(url) or {
            name
            for other, names in extension_of.items()
            if other.startswith(package + ".")
            for name in names
        }
    return used


def outside(build: dict[str, Any], used: dict[str, set[str]]) -> dict[str, set[str]]:
    """The types no extension of `build` (or Envoy's core) provides."""
    compiled = set(build["extensions"]) | set(DATA["core"])
    return {url: names for url, names in used.items() if not names & compiled}


def rendered_documents(target: str) -> Iterator[tuple[str, Any]]:
    for mode in modes(target):
        options = RenderOptions(mode=mode, cilium_service="default/s:80")
        for path, text in render(target, options).items():
            for document in yaml.safe_load_all(text):
                yield path, document


class TestMeshExtensions:
    @pytest.mark.parametrize("build", list(BUILDS))
    def test_manifest_uses_only_what_the_mesh_compiles(self, build, extension_of):
        """Each rendered file of the build's target uses only extensions that build compiles."""
        target = BUILDS[build]["target"]
        for path, document in rendered_documents(target):
            used = extensions_used(document, extension_of)
            assert "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor" in used
            assert outside(BUILDS[build], used) == {}, path

    def test_every_type_has_an_extension(self, extension_of):
        """No rendered `@type` is unknown to Envoy: the mapping leaves nothing unchecked."""
        for target in ("istio", "cilium", "envoy"):
            for path, document in rendered_documents(target):
                used = extensions_used(document, extension_of)
                assert all(used.values()), (path, used)

    def test_gated_filters_would_be_caught_on_cilium(self, extension_of):
        """The check has teeth: gated mode's composite filter is outside cilium-envoy's build."""
        gate = request_gate(Policy(), Direction.OUTBOUND)
        gated = doctor_filters(RenderMode.GATED, "x", gate, Direction.OUTBOUND)
        missing = outside(BUILDS["cilium/proxy main"], extensions_used(gated, extension_of))
        assert "envoy.extensions.filters.http.composite.v3.Composite" in missing

    def test_istio_gets_the_guard_filter_cilium_the_route(self, extension_of):
        """header_mutation is used where the mesh compiles it (Istio), never on Cilium."""
        mutation = "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"
        options = RenderOptions(mode=RenderMode.ALWAYS, cilium_service="default/s:80")
        istio = render("istio", options)["istio/always.yaml"]
        cilium = render("cilium", options)["cilium/always.yaml"]
        assert mutation in types_in(list(yaml.safe_load_all(istio)))
        assert mutation not in types_in(yaml.safe_load(cilium))
        assert "response_headers_to_remove" in cilium
