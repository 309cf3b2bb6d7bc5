"""`extproc render`: the deployment manifests, from the same settings the server relies on.

One module per target (`istio`, `cilium`, `envoy_bootstrap`, `k8s`, `monitoring`); `envoy_config`
builds and type-checks the Envoy parts they share, and `gate` says what gated mode sends
to the server. `render` returns each target's files by their path in `deploy/`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import yaml

from extproc.filter_config import GRPC, MESH_IDENTITY, TRANSPORTS
from extproc.render import cilium, envoy_bootstrap, istio, k8s, monitoring
from extproc.render.gate import request_gate
from extproc.render.options import EXAMPLE_CILIUM_SERVICE, RenderError, RenderMode, RenderOptions

__all__ = [
    "TARGETS",
    "RenderError",
    "RenderMode",
    "RenderOptions",
    "modes",
    "notes",
    "render",
    "render_all",
    "supports",
    "unsupported",
]

TARGETS = ("istio", "cilium", "envoy", "k8s", "monitoring")
# Targets whose files do not depend on the mode.
_MODELESS = ("k8s", "monitoring")

# The modes each target renders in, its default first. cilium-envoy has no composite
# filter, which gated mode needs (see extproc/render/cilium.py).
MODES: dict[str, tuple[RenderMode, ...]] = {
    "cilium": (RenderMode.ALWAYS,),
}
_BOTH = (RenderMode.GATED, RenderMode.ALWAYS)


def modes(target: str) -> tuple[RenderMode, ...]:
    """The modes `target` renders in; the first is its default."""
    return MODES.get(target, _BOTH)


def render(target: str, options: RenderOptions) -> dict[str, str]:
    """The files of `target` in `options.mode`, by path relative to `deploy/`.

    The k8s and monitoring files depend on neither the mode nor the transport (the server
    listens on both); the others carry them in the file name (`always-http.yaml`).
    """
    if not supports(target, options):
        raise RenderError(unsupported(target, options))
    mode = options.mode
    name = str(mode) if options.transport == GRPC else f"{mode}-{options.transport}"
    match target:
        case "istio":
            docs = {f"istio/{name}.yaml": istio.render_envoy_filters(options)}
        case "cilium":
            docs = {
                f"cilium/{name}.yaml": [cilium.render_envoy_config(options, clusterwide=False)],
                f"cilium/{name}-clusterwide.yaml": [
                    cilium.render_envoy_config(options, clusterwide=True)
                ],
            }
        case "envoy":
            docs = {f"envoy/{name}.yaml": [envoy_bootstrap.render_bootstrap(options)]}
        case "k8s":
            docs = {f"k8s/{name}": [doc] for name, doc in k8s.render_manifests(options).items()}
        case "monitoring":
            files = monitoring.render_monitoring(options).items()
            docs = {f"monitoring/{name}": [doc] for name, doc in files}
        case _:
            raise RenderError(f"unknown target {target!r} (known: {', '.join(TARGETS)})")
    example = target == "cilium" and options.cilium_service == EXAMPLE_CILIUM_SERVICE
    return {
        path: _yaml(path, target, mode, options.transport, content, example=example)
        for path, content in docs.items()
    }


def supports(target: str, options: RenderOptions) -> bool:
    """Whether `target` can render `options` (`unsupported` says why not)."""
    return not unsupported(target, options)


def unsupported(target: str, options: RenderOptions) -> str:
    """Why `target` cannot render `options`, or "": only Istio's proxies have Istio's SDS;
    cilium-envoy has no tracer."""
    if options.extproc_mtls == MESH_IDENTITY and target in ("cilium", "envoy"):
        return (
            f"--extproc-mtls {MESH_IDENTITY}: the {target} target's Envoy has no Istio SDS; "
            "give a directory inside the proxy instead"
        )
    if options.tracer is not None and target == "cilium":
        return cilium.NO_TRACER
    return ""


def render_all(options: RenderOptions) -> dict[str, str]:
    """Every target in every mode and transport: the whole `deploy/` directory.

    Without a --cilium-service, the cilium files are rendered for EXAMPLE_CILIUM_SERVICE
    and say so in their header.
    """
    if options.cilium_service is None:
        options = replace(options, cilium_service=EXAMPLE_CILIUM_SERVICE)
    files: dict[str, str] = {}
    for target in filter(lambda t: supports(t, options), TARGETS):
        for transport in TRANSPORTS if target != "k8s" else (GRPC,):
            for mode in modes(target):
                files.update(render(target, replace(options, mode=mode, transport=transport)))
    return files


def notes(target: str, options: RenderOptions) -> list[str]:
    """What gated mode cannot gate under this policy, for the operator (empty: nothing)."""
    if options.mode is not RenderMode.GATED or target in _MODELESS:
        return []
    contexts = (
        [(c, d) for c, d, _ in istio.CONTEXTS if istio.rendered(c, options.istio)]
        if target == "istio"
        else [("listener", options.direction)]
    )
    gates = ((context, request_gate(options.policy, direction)) for context, direction in contexts)
    return [f"{context}: {gate.note}" for context, gate in gates if gate.note]


class _Dumper(yaml.SafeDumper):
    """Block style, no anchors (a repeated dict is written out again), multi-line text as `|`."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def _yaml(
    path: str,
    target: str,
    mode: RenderMode,
    transport: str,
    documents: list[dict[str, Any]],
    *,
    example: bool = False,
) -> str:
    mode_flag = "" if target in _MODELESS else f" --mode {mode}"
    if transport != GRPC and target not in _MODELESS:
        mode_flag += f" --transport {transport}"
    header = (
        f"# deploy/{path}: rendered by `extproc render {target}{mode_flag}`.\n"
        "# Do not edit: change the options or extproc/render, then run `make deploy`.\n"
    )
    if example:
        header += (
            f"# EXAMPLE: for the placeholder Service {EXAMPLE_CILIUM_SERVICE}; render yours with\n"
            "# `extproc render cilium --cilium-service NAMESPACE/NAME:PORT`.\n"
        )
    body = "---\n".join(
        yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
        for doc in documents
    )
    return header + body
