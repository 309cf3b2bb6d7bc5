"""argv → configuration → one of the commands. No logic of its own beyond that."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path
from typing import Any, BinaryIO

from extproc.accesslog import Reading, Unread, diagnose_text
from extproc.accesslog.summary import MAX_LINE, Summary
from extproc.admission import StreamLimits
from extproc.annotate import diagnosis_headers
from extproc.config import (
    Direction,
    Policy,
    PolicyError,
    ServeConfig,
    TlsFiles,
    load_policy,
    read_reveal_token,
)
from extproc.diagnosis import Diagnosis, Evidence, classify
from extproc.flags import UnknownFlagError, parse_flags
from extproc.logs import configure_logging
from extproc.metrics import MAX_CLUSTER_LABEL_LIMIT

# `--metrics-cluster-label` without a number: enough for a namespace's services, and at
# most (the catalogue's reasons) x 51 series.
DEFAULT_CLUSTER_LABEL_LIMIT = 50


class ConfigError(ValueError):
    """Command-line arguments that do not fit together."""


def _policy(path: str | None, *, read_secrets: bool = True) -> Policy:
    return load_policy(path, read_secrets=read_secrets) if path else Policy()


def _tls_files(args: argparse.Namespace) -> TlsFiles | None:
    if not (args.tls_cert or args.tls_key or args.client_ca):
        return None
    if not (args.tls_cert and args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together (and --client-ca needs both)")
    ca = Path(args.client_ca) if args.client_ca else None
    return TlsFiles(Path(args.tls_cert), Path(args.tls_key), ca)


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The serve command's arguments as a ServeConfig; the policy file is checked here too."""
    if args.config:
        load_policy(args.config)  # fail before binding anything
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    listen = None if args.listen == "none" else args.listen
    if listen is None and not args.http_listen:
        raise ConfigError("--listen none leaves nothing to serve: give --http-listen too")
    for address in (listen, args.http_listen):
        if (
            args.workers > 1
            and address
            and not address.startswith("unix:")
            and address.endswith(":0")
        ):
            raise ConfigError(
                "--workers needs a fixed port: with port 0 each worker would get its own"
            )
    try:
        StreamLimits(args.max_streams, args.stream_idle_timeout, args.max_message_bytes)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.http_max_connections < 1:
        raise ConfigError(
            f"--http-max-connections must be at least 1, got {args.http_max_connections}"
        )
    if args.metrics_cluster_label is not None and not (
        1 <= args.metrics_cluster_label <= MAX_CLUSTER_LABEL_LIMIT
    ):
        raise ConfigError(
            f"--metrics-cluster-label must be 1 to {MAX_CLUSTER_LABEL_LIMIT}, "
            f"got {args.metrics_cluster_label}"
        )
    ui_token = _ui_token(args)
    return ServeConfig(
        ui_listen=args.ui_listen,
        ui_token=ui_token,
        ui_recovered_after=args.ui_recovered_after,
        ui_prometheus=_ui_prometheus(args),
        ui_trace_url=_ui_trace_url(args),
        ui_docs_url=_ui_docs_url(args),
        listen=listen,
        http_listen=args.http_listen,
        http_max_connections=args.http_max_connections,
        policy_path=Path(args.config) if args.config else None,
        grace=args.grace,
        tls=_tls_files(args),
        metrics_listen=args.metrics_listen,
        metrics_cluster_label=args.metrics_cluster_label or 0,
        health_listen=args.health_listen,
        max_streams=args.max_streams,
        stream_idle_timeout=args.stream_idle_timeout,
        max_message_bytes=args.max_message_bytes,
        workers=args.workers,
        envoy_admin=_envoy_admin(args.envoy_admin),
    )


def _ui_token(args: argparse.Namespace) -> bytes:
    """The page's token, read and checked before anything binds; refuses a non-loopback
    --ui-listen without one, and --ui-listen with --workers (each worker would keep its own
    table behind one port)."""
    from extproc.page import PageError, check_listen

    if not args.ui_listen:
        if args.ui_token_file:
            raise ConfigError("--ui-token-file needs --ui-listen")
        return b""
    if args.workers > 1:
        raise ConfigError("--ui-listen serves one process's failures: use it with --workers 1")
    if args.ui_recovered_after <= 0:
        raise ConfigError(f"--ui-recovered-after must be positive, got {args.ui_recovered_after}")
    token = b""
    if args.ui_token_file:
        try:
            token = read_reveal_token(args.ui_token_file)
        except ValueError as exc:
            raise ConfigError(f"--ui-token-file: {exc}") from None
    try:
        check_listen(args.ui_listen, token)
    except PageError as exc:
        raise ConfigError(str(exc)) from None
    return token


def _ui_prometheus(args: argparse.Namespace) -> str | None:
    from extproc.mesh_view import MeshViewError, prometheus_url

    if args.ui_prometheus is None:
        return None
    if not args.ui_listen:
        raise ConfigError("--ui-prometheus needs --ui-listen")
    try:
        return prometheus_url(args.ui_prometheus)
    except MeshViewError as exc:
        raise ConfigError(str(exc)) from None


def _ui_trace_url(args: argparse.Namespace) -> str:
    """`--ui-trace-url`: an http(s) URL holding `{trace_id}` once, where the page links
    each sample's trace id; no quotes, spaces or other braces (it becomes a link)."""
    from extproc.page import MAX_UI_URL

    template: str | None = args.ui_trace_url
    if template is None:
        return ""
    if not args.ui_listen:
        raise ConfigError("--ui-trace-url needs --ui-listen")
    rest = template.replace("{trace_id}", "", 1)
    if (
        not template.startswith(("https://", "http://"))
        or "{trace_id}" not in template
        or len(template) > MAX_UI_URL
        or any(c in rest for c in "{}\"'<> ")
        or not template.isprintable()
    ):
        raise ConfigError(
            "--ui-trace-url: expected an http(s) URL holding {trace_id} once, e.g. "
            f"'https://jaeger.example/trace/{{trace_id}}', got {template!r}"
        )
    return template


def _ui_docs_url(args: argparse.Namespace) -> str:
    """`--ui-docs-url`: the documentation site the page links each row's reason into
    (`URL/reasons/#reason-CODE`); by default the Documentation Project-URL of the installed
    package, when it names one. "" (none known): the page says where the entry is instead.
    An http(s) URL with a host and no query or fragment (the page appends a path and a
    fragment), and nothing that could leave a link's attribute."""
    from urllib.parse import urlsplit

    from extproc.page import MAX_UI_URL
    from extproc.published import published_documentation_url

    url: str | None = args.ui_docs_url
    if url is not None and not args.ui_listen:
        raise ConfigError("--ui-docs-url needs --ui-listen")
    source = "--ui-docs-url"
    if url is None:
        if not args.ui_listen:
            return ""
        url, source = published_documentation_url(), "the package's Documentation Project-URL"
        if url is None:
            return ""
    try:
        parts = urlsplit(url)
        well_formed = bool(parts.hostname)
    except ValueError:
        well_formed = False
    if (
        not url.startswith(("https://", "http://"))
        or not well_formed
        or len(url) > MAX_UI_URL
        or not (url.isascii() and url.isprintable())
        or any(c in url for c in "?#{}\"'<>` ")
    ):
        raise ConfigError(
            f"{source}: expected an http(s) URL of the documentation site, with a host and "
            f"no query, fragment, quote, space or angle bracket, e.g. "
            f"'https://docs.example/extproc-doctor/', got {url!r}"
        )
    return url.rstrip("/") + "/"


def _envoy_admin(url: str | None) -> str | None:
    from extproc.envoy_admin import AdminUrlError, admin_base_url

    try:
        return admin_base_url(url) if url else None
    except AdminUrlError as exc:
        raise ConfigError(str(exc)) from None


def _serve(args: argparse.Namespace) -> int:
    config = serve_config(args)
    if config.workers == 1:
        from extproc.process import run_server

        return run_server(config)
    from extproc.workers import Supervisor

    return Supervisor(config, args.log_level or "info").run()


def _evidence_from_flags(args: argparse.Namespace) -> Evidence:
    flags = parse_flags(args.flags)
    return Evidence(
        status=args.status,
        flags=flags,
        code_details=args.details,
        transport_failure_reason=args.tfr,
        cluster=args.cluster,
        route=args.route,
        host=args.host,
        has_attributes=bool(flags or args.details or args.tfr),
    )


def _report(diagnosis: Diagnosis | None, as_json: bool, reading: Reading | None = None) -> str:
    """One diagnosis, as text or JSON; with a reading, how the text was read and what it lacked."""
    read: dict[str, object] = {}
    if reading is not None:
        read = {"read_as": reading.form, "used": list(reading.used)}
        if reading.missing:
            read["missing_fields"] = list(reading.missing)
        if reading.unknown_flags:
            read["unknown_flags"] = list(reading.unknown_flags)
    if as_json:
        if diagnosis is None:
            return json.dumps({"reason": None, **read})
        data = dict(diagnosis.evidence)
        return json.dumps(
            {"reason": diagnosis.reason, "hint": diagnosis.hint, "evidence": data, **read}
        )
    lines = [_how_read(reading)] if reading is not None else []
    if reading is not None and not reading.is_log:
        lines.append("no failure evidence found (no status, response flags or code details)")
    elif diagnosis is None:
        lines.append("no failure: Envoy delivered this response as the upstream sent it")
    else:
        evidence = " ".join(f"{k}={v}" for k, v in diagnosis.evidence)
        header = "\n".join(f"{name}: {value}" for name, value in diagnosis_headers(diagnosis))
        lines += [
            f"reason:   {diagnosis.reason}",
            f"hint:     {diagnosis.hint}",
            f"evidence: {evidence}",
            header,
        ]
    if reading is not None and reading.missing and (diagnosis is not None or not reading.is_log):
        lines.append(_advice(reading.missing))
    return "\n".join(lines)


def _how_read(reading: Reading) -> str:
    used = ", ".join(reading.used) or "nothing"
    form = "searched for evidence" if reading.form == "scan" else f"{reading.form} format"
    unknown = f"; unknown flags left out: {','.join(reading.unknown_flags)}"
    return f"read as:  {form}; used {used}{unknown if reading.unknown_flags else ''}"


def _advice(missing: Iterable[str]) -> str:
    """Which access-log fields to add, and Istio's format that has them all."""
    from extproc.accesslog import ISTIO_ACCESS_LOG_FORMAT

    return (
        f"for a precise reason, log {', '.join(missing)}; in Istio, set "
        "meshConfig.accessLogFormat to (or remove it for) the default format:\n"
        f"  accessLogFormat: '{ISTIO_ACCESS_LOG_FORMAT}'"
    )


def _summary_report(summary: Summary, as_json: bool) -> str:
    """The whole-log summary: failures by reason and cluster, most frequent first."""
    if as_json:
        return json.dumps(summary.as_dict())
    unread = ", ".join(f"{error} {n}" for error, n in summary.unread.most_common())
    head = (
        f"{summary.lines} lines: {summary.failures} failures, {summary.successes} not failures, "
        f"{summary.not_log} without evidence"
        + (f", {summary.truncated} cut at {MAX_LINE} bytes" if summary.truncated else "")
        + (f", {summary.unread.total()} unreadable ({unread})" if summary.unread else "")
    )
    out = [head]
    if summary.forms:
        out.append("read as: " + ", ".join(f"{f} {n}" for f, n in summary.forms.most_common()))
    for g in summary.ranked():
        where = g.cluster or "-"
        dr = f" dr={g.destination_rule}" if g.destination_rule else ""
        seen = f" first {g.first_seen} last {g.last_seen}" if g.first_seen else ""
        out += [f"\n{g.count:>7}  {g.reason}  cluster={where}{dr}{seen}", f"         {g.hint}"]
    if summary.missing:
        out.append("\n" + _advice(m for m, _ in summary.missing.most_common()))
    return "\n".join(out)


class _Progress:
    """A one-line progress note on stderr, only when stderr is a terminal."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self._next = 0.0

    def __call__(self, read: int, lines: int) -> None:
        now = time.monotonic()
        if self.enabled and now >= self._next:
            self._next = now + 0.5
            print(f"\rread {read / 1e6:.1f} MB, {lines} lines", end="", file=sys.stderr)

    def done(self) -> None:
        if self.enabled and self._next:
            print("\r\033[K", end="", file=sys.stderr)


# `curl -v` output starts with its `*`, `>` or `<` lines: read it whole, as one text.
_CURL_START = (b"* ", b"> ", b"< ", b"*   ")
_PASTE_LIMIT = 1024 * 1024


def _diagnose_stream(stream: BinaryIO, as_json: bool) -> int:
    """A whole log, or a paste, as bytes: a summary, or one report for one line or `curl -v`."""
    from extproc.accesslog.summary import lines_of, summarise

    head = stream.peek(4096)[:4096] if hasattr(stream, "peek") else b""
    if head.lstrip().startswith(_CURL_START):
        return _diagnose_one(stream.read(_PASTE_LIMIT).decode("utf-8", errors="replace"), as_json)
    progress = _Progress()
    summary = summarise(lines_of(stream, progress))
    progress.done()
    if summary.single is not None and summary.lines <= 1 + summary.not_log:
        reading, diagnosis = summary.single
        print(_report(diagnosis, as_json, reading))
        return 0
    print(_summary_report(summary, as_json))
    return 0


def _diagnose_one(text: str, as_json: bool) -> int:
    """One text, one report; 1 when the text could not be read at all."""
    result = diagnose_text(text)
    if isinstance(result, Unread):
        if as_json:
            print(json.dumps({"reason": None, "unread": result.error}))
        else:
            print(f"could not read this text ({result.error}); nothing diagnosed")
        return 1
    print(_report(result.diagnosis, as_json, result.reading))
    return 0


def _diagnose(args: argparse.Namespace) -> int:
    try:
        return _diagnose_text(args)
    except BrokenPipeError:  # `| head`: the reader has seen enough
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (stays open until exit)
        return 0


_EVIDENCE_OPTIONS = ("flags", "details", "tfr", "cluster", "route", "host")


def _diagnose_text(args: argparse.Namespace) -> int:
    """TEXT, `-` or piped stdin (like grep and jq), or the evidence options."""
    given = args.status is not None or any(getattr(args, name) for name in _EVIDENCE_OPTIONS)
    if args.line is None and given:
        try:
            print(_report(classify(_evidence_from_flags(args)), args.json))
        except UnknownFlagError as exc:
            print(f"extproc diagnose: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.line is None and (sys.stdin is None or sys.stdin.isatty()):
        args.print_help(sys.stderr)
        return 2
    if args.line is None or args.line == "-":
        return _diagnose_stream(sys.stdin.buffer, args.json)
    # Several lines (`"$(cat log)"`) are a log, read line by line, never one failure
    # pieced together from different lines; surrogates from argv become their bytes.
    text = args.line.encode("utf-8", "surrogateescape")
    if b"\n" in text.strip():
        return _diagnose_stream(io.BufferedReader(io.BytesIO(text)), args.json)
    return _diagnose_one(args.line, args.json)


def _missing_extra(command: str, exc: ImportError) -> int:
    """The command's optional dependencies are not installed: say which extra brings them."""
    print(
        f"extproc {command} needs the {command} extra "
        f"(pip install 'extproc-doctor[{command}]'): {exc}",
        file=sys.stderr,
    )
    return 2


def _demo(args: argparse.Namespace) -> int:
    try:
        from extproc.lab.demo import run_demo
    except ImportError as exc:
        return _missing_extra("demo", exc)
    from extproc.lab.demo import list_scenarios
    from extproc.lab.scenarios import find_scenarios

    if args.list:
        print(list_scenarios())
        return 0
    try:
        chosen = find_scenarios(args.scenario) if args.scenario else None
    except KeyError as exc:
        raise ConfigError(exc.args[0]) from None
    policy = _policy(args.config) if args.config else None
    # The live page beside the demo while it stays up (`make run` prints its URL).
    ui_listen = None if args.once or args.ui_listen == "none" else args.ui_listen
    if ui_listen:
        from extproc.page import PageError, check_listen

        try:
            check_listen(ui_listen, b"")  # loopback only: the demo takes no token
        except PageError as exc:
            raise ConfigError(str(exc)) from None
    try:
        return int(run_demo(policy, stay=not args.once, scenarios=chosen,
                            transport=args.transport, ui_listen=ui_listen))  # fmt: skip
    except OSError as exc:
        print(f"extproc demo: {exc} (another port: --ui-listen 127.0.0.1:PORT, or none)",
              file=sys.stderr)  # fmt: skip
        return 1


# Which `render` targets each option applies to (by argparse dest; the flag named in the
# refusal). An option given to a target it does not apply to is refused (exit 2), never
# ignored: `render istio --upstream X` would otherwise print manifests that never use X.
# `render all` takes every option (each reaches the targets it applies to). --output-dir,
# the one option not listed, applies to every target.
_MESH = ("istio", "cilium", "envoy")
RENDER_OPTION_TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mode": ("--mode", _MESH),
    "config": ("--config", (*_MESH, "k8s")),
    "namespace": ("--namespace", ("istio", "cilium", "k8s", "monitoring")),
    "image": ("--image", ("k8s",)),
    "extproc_address": ("--extproc-address", _MESH),
    "extproc_tls_ca": ("--extproc-tls-ca", (*_MESH, "k8s")),
    "extproc_mtls": ("--extproc-mtls", (*_MESH, "k8s")),
    "transport": ("--transport", _MESH),
    "cilium_service": ("--cilium-service", ("cilium",)),
    "cilium_direction": ("--cilium-direction", ("cilium",)),
    "clusterwide": ("--clusterwide", ("cilium",)),
    "istio_root_namespace": ("--istio-root-namespace", ("istio",)),
    "istio_namespace": ("--istio-namespace", ("istio",)),
    "istio_selector": ("--istio-selector", ("istio",)),
    "istio_gateway_selector": ("--istio-gateway-selector", ("istio",)),
    "istio_only": ("--istio-only", ("istio",)),
    "istio_priority": ("--istio-priority", ("istio",)),
    "istio_proxy_version": ("--istio-proxy-version", ("istio",)),
    "envoy_listen": ("--envoy-listen", ("envoy",)),
    "upstream": ("--upstream", ("envoy",)),
    "direction": ("--direction", ("envoy",)),
    "tracing_zipkin": ("--tracing-zipkin", ("envoy",)),
    "tracing_otlp": ("--tracing-otlp", ("envoy",)),
    "no_trace_tags": ("--no-trace-tags", ("istio", "envoy")),
    "runbook_url": ("--runbook-url", ("monitoring",)),
}
# What those options default to when not given (argparse leaves them None or False, so a
# given option can be told from a default one).
RENDER_DEFAULTS = {
    "namespace": "extproc-doctor",
    "cilium_direction": "edge",
    "envoy_listen": "0.0.0.0:10000",
    "upstream": "127.0.0.1:8080",
    "direction": "edge",
    "transport": "grpc",
}


def foreign_options(args: argparse.Namespace) -> list[str]:
    """The options given that do not apply to `args.target`, each saying where it does."""
    if args.target == "all":
        return []
    return [
        f"{flag} does not apply to render {args.target} (only to {', '.join(targets)})"
        for dest, (flag, targets) in RENDER_OPTION_TARGETS.items()
        if args.target not in targets and getattr(args, dest) not in (None, False)
    ]


def _render(args: argparse.Namespace) -> int:
    """Refuse options foreign to the target, fill in the defaults, render."""
    refused = foreign_options(args)
    if refused:
        for message in refused:
            print(f"extproc render: {message}", file=sys.stderr)
        return 2
    for dest, default in RENDER_DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    return _render_targets(args)


def _render_targets(args: argparse.Namespace) -> int:
    try:
        from extproc.render import (
            TARGETS,
            RenderError,
            RenderMode,
            RenderOptions,
            modes,
            notes,
            render,
            render_all,
            supports,
            unsupported,
        )
    except ImportError as exc:
        return _missing_extra("render", exc)
    text = Path(args.config).read_text(encoding="utf-8") if args.config else ""
    try:
        options = RenderOptions(
            namespace=args.namespace,
            **({"image": args.image} if args.image else {}),
            extproc_address=args.extproc_address,
            extproc_tls_ca=args.extproc_tls_ca,
            extproc_mtls=args.extproc_mtls,
            # The files a policy names (the reveal token) live where the server runs.
            policy=_policy(args.config, read_secrets=False),
            policy_text=text,
            cilium_service=args.cilium_service,
            cilium_direction=Direction(args.cilium_direction),
            envoy_listen=args.envoy_listen,
            upstream=args.upstream,
            direction=Direction(args.direction),
            transport=args.transport,
            istio=_istio_scope(args),
            tracing_zipkin=args.tracing_zipkin,
            tracing_otlp=args.tracing_otlp,
            trace_tags=not args.no_trace_tags,
            **({"runbook_url": args.runbook_url} if args.runbook_url else {}),
        )
        if args.output_dir:
            return _render_to(Path(args.output_dir), render_all(options), args.target)
        targets = [args.target] if args.target != "all" else list(TARGETS)
        for target in targets:
            mode = RenderMode(args.mode) if args.mode else modes(target)[0]
            if args.target == "all" and mode not in modes(target):
                print(f"extproc render {target}: skipped, it has no {mode} mode", file=sys.stderr)
                continue
            if args.target == "all" and not supports(target, options):
                why = unsupported(target, options)
                print(f"extproc render {target}: skipped: {why}", file=sys.stderr)
                continue
            if args.target == "all" and target == "cilium" and args.cilium_service is None:
                print(
                    f"extproc render {target}: skipped, it needs --cilium-service", file=sys.stderr
                )
                continue
            chosen = replace(options, mode=mode)
            files = render(target, chosen)  # refuses an impossible mode before any note
            for note in notes(target, chosen):
                print(f"extproc render {target}: gated mode: {note}", file=sys.stderr)
            for path, content in files.items():
                if args.clusterwide == path.endswith("-clusterwide.yaml"):
                    sys.stdout.write(f"---\n{content}")
    except RenderError as exc:
        print(f"extproc render: {exc}", file=sys.stderr)
        return 2
    return 0


def _istio_scope(args: argparse.Namespace) -> Any:
    """The `--istio-*` flags as an IstioScope (raises RenderError naming a bad flag)."""
    from extproc.render.options import IstioScope, label_pairs

    given: dict[str, Any] = {
        "root_namespace": args.istio_root_namespace,
        "namespace": args.istio_namespace,
        "workload_selector": label_pairs(args.istio_selector, "--istio-selector"),
        "gateway_selector": label_pairs(args.istio_gateway_selector, "--istio-gateway-selector"),
        "priority": args.istio_priority,
        "proxy_version": args.istio_proxy_version,
    }
    return IstioScope(
        sidecars=args.istio_only != "gateways",
        gateways=args.istio_only != "sidecars",
        **{key: value for key, value in given.items() if value not in (None, ())},
    )


def _render_to(out_dir: Path, files: dict[str, str], target: str) -> int:
    """Write the deploy/ layout (every mode) of `target` ("all": every target) under `out_dir`."""
    for path, content in files.items():
        if target in ("all", path.split("/")[0]):
            out = out_dir / path
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(content, encoding="utf-8")
    return 0


def _add_render_parser(sub: Any) -> None:
    render = sub.add_parser(
        "render",
        help="print deployment manifests: Istio EnvoyFilter, Cilium, plain Envoy, Kubernetes, "
        "monitoring (Prometheus rules, Grafana dashboard)",
        description="Print the deployment manifests for TARGET. An option marked [targets] "
        "applies to those only: given to another target, it is refused (exit 2).",
        **_examples(
            "extproc render k8s --image registry.example.com/extproc-doctor:0.1.0 > doctor.yaml",
            "extproc render istio --istio-namespace shop --config policy.yaml",
            "extproc render cilium --cilium-service default/httpbin:8000",
            "extproc render envoy --upstream 127.0.0.1:8080 > envoy.yaml",
            "extproc render monitoring --runbook-url https://wiki.example/extproc-doctor",
        ),
    )
    render.add_argument("target", choices=["istio", "cilium", "envoy", "k8s", "monitoring", "all"])
    render.add_argument(
        "--mode",
        choices=["gated", "always"],
        help="gated: Envoy matchers send only failing responses and requests the policy "
        "acts on; always: every request (default: gated; cilium: always, the only mode "
        "its Envoy supports)",
    )
    render.add_argument(
        "--config", metavar="POLICY.yaml", help="the policy: gated matchers and the ConfigMap"
    )
    render.add_argument(
        "--namespace",
        help="the server's namespace (default: extproc-doctor)",
    )
    render.add_argument("--image", help="the server's image (default: extproc-doctor:VERSION)")
    render.add_argument(
        "--extproc-address",
        metavar="HOST:PORT",
        help="where Envoy reaches the server (default: the Service's DNS name, "
        "or 127.0.0.1:50051 for the envoy target)",
    )
    render.add_argument(
        "--extproc-tls-ca",
        metavar="PEM",
        help="speak TLS to the server, verified with this CA file (a path inside the proxy); "
        "Envoy presents no certificate: prefer --extproc-mtls",
    )
    render.add_argument(
        "--extproc-mtls",
        metavar="DIR|istio",
        help="mutual TLS to the server: DIR inside the proxy holds ca.crt, tls.crt, tls.key "
        "(a cert-manager Secret's layout); istio: the proxy's mesh certificate and root by "
        "SDS (istio and k8s targets). The Deployment then requires client certificates",
    )
    render.add_argument(
        "--cilium-service",
        default=None,
        metavar="NAMESPACE/NAME:PORT",
        help="cilium (required): the Service port whose traffic passes the doctor; only "
        "that port is redirected to the listener",
    )
    render.add_argument(
        "--cilium-direction",
        choices=["edge", "outbound"],
        help="cilium: where the Service's clients are. edge (default): anywhere, so the edge "
        "rules apply and annotations are hidden; outbound: only pods of the cluster "
        "(the Service is not reachable from outside)",
    )
    # The old spelling, from when outbound was the default: now the default itself.
    render.add_argument(
        "--cilium-edge", dest="cilium_direction", action="store_const", const="edge",
        help=argparse.SUPPRESS,
    )  # fmt: skip
    render.add_argument(
        "--clusterwide",
        action="store_true",
        help="cilium: print the CiliumClusterwideEnvoyConfig instead",
    )
    _add_istio_flags(render)
    render.add_argument(
        "--envoy-listen",
        metavar="HOST:PORT",
        help="envoy: the listener (default: 0.0.0.0:10000)",
    )
    render.add_argument(
        "--upstream",
        metavar="HOST:PORT",
        help="envoy: the upstream (default: 127.0.0.1:8080)",
    )
    render.add_argument(
        "--direction",
        choices=["edge", "outbound", "inbound"],
        help="envoy: where the Envoy sits, which decides the header rules (default: edge)",
    )
    render.add_argument(
        "--transport",
        choices=["grpc", "http"],
        help="how Envoy calls the server: gRPC, or ext_proc's http_service (JSON over "
        "HTTP/1.1, two single-phase filters; Envoy >= 1.37, marked work in progress by "
        "Envoy) (default: grpc)",
    )
    render.add_argument(
        "--tracing-zipkin",
        metavar="HOST:PORT",
        help="envoy: trace every request to this Zipkin collector (JSON v2 over HTTP, "
        "/api/v2/spans), the diagnosis as span tags",
    )
    render.add_argument(
        "--tracing-otlp",
        metavar="HOST:PORT",
        help="envoy: trace every request to this OpenTelemetry collector (OTLP/gRPC), the "
        "diagnosis as span tags",
    )
    render.add_argument(
        "--no-trace-tags",
        action="store_true",
        help="put no diagnosis on spans (istio: leave the HCM's tracing as the mesh builds "
        "it; use it where the mesh traces nothing)",
    )
    render.add_argument(
        "--runbook-url",
        metavar="URL",
        help="monitoring: the document the alerts' runbook links point into (its "
        "'Alert: NAME' headings, as in docs/monitoring.md; default: the monitoring page of "
        "the documentation URL in the package's metadata; without one, no runbook_url: "
        "each alert names the page in a runbook annotation)",
    )
    render.add_argument(
        "--output-dir",
        metavar="DIR",
        help="write every mode's files in the deploy/ layout under DIR instead of printing",
    )
    for action in render._actions:  # --help says what the refusal enforces
        if action.dest in RENDER_OPTION_TARGETS and action.help != argparse.SUPPRESS:
            action.help = f"{action.help} [{', '.join(RENDER_OPTION_TARGETS[action.dest][1])}]"
    render.set_defaults(func=_render)


def _add_istio_flags(render: Any) -> None:
    render.add_argument(
        "--istio-root-namespace",
        metavar="NS",
        help="istio: the mesh's root namespace, meshConfig.rootNamespace (default: istio-system)",
    )
    render.add_argument(
        "--istio-namespace",
        metavar="NS",
        help="istio: apply to this namespace's workloads only (the EnvoyFilters go there; "
        "default: the root namespace, the whole mesh)",
    )
    render.add_argument(
        "--istio-selector",
        action="append",
        metavar="LABEL=VALUE",
        help="istio: apply to sidecars with these labels only (repeatable)",
    )
    render.add_argument(
        "--istio-gateway-selector",
        action="append",
        metavar="LABEL=VALUE",
        help="istio: the gateways that are the edge (repeatable; default: istio=ingressgateway; "
        "a Gateway API gateway: gateway.networking.k8s.io/gateway-name=NAME)",
    )
    render.add_argument(
        "--istio-only",
        choices=["sidecars", "gateways"],
        help="istio: render only the sidecars' or only the gateways' EnvoyFilter",
    )
    render.add_argument(
        "--istio-priority",
        type=int,
        help="istio: the EnvoyFilters' priority; a higher one applies later, so its "
        "INSERT_FIRST lands ahead of lower ones' (default: 1000)",
    )
    render.add_argument(
        "--istio-proxy-version",
        metavar="REGEX",
        help="istio: patch only proxies whose Istio version matches (default: 1.19 and later)",
    )


def _examples(*lines: str) -> dict[str, Any]:
    """A parser's epilog: example command lines, printed as written."""
    return {
        "epilog": "examples:\n" + "\n".join(f"  {line}" for line in lines),
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="extproc",
        description="Envoy ext_proc server: cleans request headers, explains upstream failures.",
        **_examples(
            "extproc serve --listen 0.0.0.0:50051",
            "kubectl logs deploy/web -c istio-proxy | extproc diagnose",
            "extproc render istio > doctor-istio.yaml",
            "extproc COMMAND --help",
        ),
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {version('extproc-doctor')}"
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="default: info; for demo, error (the table says it all)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="run the ext_proc server (gRPC, and HTTP if asked)",
        description="Run the ext_proc server until SIGTERM (SIGHUP reloads the policy).",
        **_examples(
            "extproc serve --listen 0.0.0.0:50051 --config policy.yaml --metrics-listen :9090",
            "extproc serve --listen unix:/run/extproc.sock --workers 2",
        ),
    )
    serve.add_argument(
        "--listen",
        default="0.0.0.0:50051",
        metavar="HOST:PORT",
        help="gRPC address, unix:/path/to/socket, or none for the HTTP lane alone "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--http-listen",
        metavar="HOST:PORT",
        help="also serve ext_proc's http_service protocol (JSON over HTTP/1.1; Envoy >= 1.37, "
        "work in progress in Envoy) here, or on unix:PATH; GET /ready answers probes",
    )
    serve.add_argument(
        "--http-max-connections",
        type=int,
        default=ServeConfig().http_max_connections,
        metavar="N",
        help="HTTP lane connections at once; beyond it a new one gets 503 and is closed "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--config", metavar="POLICY.yaml", help="policy file (default: built-in policy)"
    )
    serve.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on SIGTERM, how long in-flight streams may take to finish (default: %(default)s)",
    )
    serve.add_argument(
        "--tls-cert", metavar="PEM", help="serve gRPC (and the HTTP lane) over TLS with this chain"
    )
    serve.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    serve.add_argument(
        "--client-ca",
        metavar="PEM",
        help="require client certificates that chain to this CA (mTLS)",
    )
    serve.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics",
    )
    serve.add_argument(
        "--metrics-cluster-label",
        type=int,
        nargs="?",
        const=DEFAULT_CLUSTER_LABEL_LIMIT,
        metavar="MAX",
        help="label extproc_diagnoses_total with the upstream cluster, for the first MAX "
        f"distinct clusters (default {DEFAULT_CLUSTER_LABEL_LIMIT}); later ones count as "
        'cluster="other"',
    )
    serve.add_argument(
        "--health-listen",
        metavar="HOST:PORT",
        help="also serve grpc.health.v1 alone, in plaintext, here (kubelet probes cannot use TLS)",
    )
    serve.add_argument(
        "--ui-listen",
        metavar="HOST:PORT",
        help="serve the live page of failures here (off by default; docs use 127.0.0.1:9902); "
        "an address other than loopback needs --ui-token-file",
    )
    serve.add_argument(
        "--ui-token-file",
        metavar="PATH",
        help="the page's token (at least 16 visible ASCII characters): open /?token=... once "
        "(sets a cookie) or send Authorization: Bearer ...",
    )
    serve.add_argument(
        "--ui-recovered-after",
        type=float,
        default=ServeConfig().ui_recovered_after,
        metavar="SECONDS",
        help="a row with no failure for this long shows as recovered (default: %(default)s)",
    )
    serve.add_argument(
        "--ui-trace-url",
        metavar="TEMPLATE",
        help="the page links each sample's trace id (traceparent or x-b3-traceid) here, "
        "e.g. 'https://jaeger.example/trace/{trace_id}'",
    )
    serve.add_argument(
        "--ui-docs-url",
        metavar="URL",
        help="the page links each row's reason to its entry in this documentation site "
        "(URL/reasons/#reason-CODE); default: the package's Documentation Project-URL, if any",
    )
    serve.add_argument(
        "--ui-prometheus",
        metavar="URL",
        help="the page also shows the mesh-wide view: every replica's diagnoses summed by "
        "this Prometheus (the rules `extproc render monitoring` writes)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="server processes; TCP: all on the address (SO_REUSEPORT), unix:PATH: PATH.0 .. PATH.N-1",
    )
    serve.add_argument(
        "--max-streams",
        type=int,
        default=ServeConfig().max_streams,
        metavar="N",
        help="concurrent gRPC streams; at the limit a new one takes the place of a silent "
        "stream or of the busiest peer's idlest, else is refused at once (default: %(default)s)",
    )
    serve.add_argument(
        "--stream-idle-timeout",
        type=float,
        default=ServeConfig().stream_idle_timeout,
        metavar="SECONDS",
        help="close a gRPC stream with no message for this long: the longest an upstream may "
        "take to answer and still be annotated (default: %(default)s)",
    )
    serve.add_argument(
        "--max-message-bytes",
        type=int,
        default=ServeConfig().max_message_bytes,
        metavar="N",
        help="the largest ProcessingRequest; raise it with Envoy's max_request_headers_kb "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--envoy-admin",
        metavar="URL",
        help="Envoy's admin address (http://127.0.0.1:15000): the clusters' TLS settings "
        "tell an SNI from an ALPN mismatch",
    )
    serve.set_defaults(func=_serve)

    diag = sub.add_parser(
        "diagnose",
        help="explain a failure from an access-log line, a pasted error or a whole log",
        description="Explain a failure offline, from what Envoy or a client printed.",
        **_examples(
            "kubectl logs deploy/productpage -c istio-proxy --since=1h | extproc diagnose",
            "extproc diagnose 'rpc error: code = Unavailable desc = upstream connect error or "
            "disconnect/reset before headers. reset reason: connection termination'",
            "extproc diagnose --status 503 --flags UF --tfr 'TLS_error:|268435581:SSL "
            "routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED'",
        ),
    )
    diag.add_argument(
        "line",
        nargs="?",
        metavar="TEXT",
        help="an access-log line, local-reply body, gRPC error or curl -v output (several "
        "lines: a log, summarised); '-', or no TEXT with stdin not a terminal, reads a whole "
        "log (or a paste) from stdin and summarises it",
    )
    diag.add_argument("--status", type=int, help="HTTP status (%%RESPONSE_CODE%%)")
    diag.add_argument(
        "--flags", default="", help="response flags, e.g. UF,URX (%%RESPONSE_FLAGS%%)"
    )
    diag.add_argument(
        "--details", default="", help="response code details (%%RESPONSE_CODE_DETAILS%%)"
    )
    diag.add_argument("--tfr", default="", help="upstream transport failure reason")
    diag.add_argument("--cluster", default="", help="upstream cluster name")
    diag.add_argument("--route", default="", help="route name")
    diag.add_argument("--host", default="", help="the request's Host / :authority")
    diag.add_argument("--json", action="store_true", help="print JSON instead of text")
    diag.set_defaults(func=_diagnose, print_help=diag.print_help)

    demo = sub.add_parser(
        "demo",
        help="run a real Envoy, the server and failing upstreams; print the diagnoses",
        description="The mesh lab behind `make run` (needs the demo extra: a real Envoy).",
        **_examples("extproc demo --once", "extproc demo --scenario 4", "extproc demo --list"),
    )
    demo.add_argument(
        "--config", metavar="POLICY.yaml", help="policy file (default: the demo's own)"
    )
    demo.add_argument(
        "--once", action="store_true", help="exit after the table instead of staying up"
    )
    demo.add_argument(
        "--scenario",
        metavar="N|NAME",
        help="run only incident N (1-10) or the named edge case; see --list",
    )
    demo.add_argument("--list", action="store_true", help="list the scenarios and exit")
    demo.add_argument(
        "--transport",
        choices=["grpc", "http"],
        default="grpc",
        help="how the sidecar calls the server: gRPC or the HTTP lane (default: %(default)s)",
    )
    demo.add_argument(
        "--ui-listen",
        default="127.0.0.1:9902",
        metavar="HOST:PORT",
        help="serve the live page of the demo's failures here while it stays up, or none "
        "(default: %(default)s; loopback only)",
    )
    demo.set_defaults(func=_demo)
    _add_render_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level or ("error" if args.command == "demo" else "info"))
    try:
        return int(args.func(args))
    except (PolicyError, ConfigError) as exc:
        print(f"extproc {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
