"""argv → configuration → one of the commands. No logic of its own beyond that."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from extproc.annotate import diagnosis_headers
from extproc.config import Policy, PolicyError, ServeConfig, TlsFiles, load_policy
from extproc.diagnosis import Diagnosis, Evidence, classify
from extproc.flags import UnknownFlagError, parse_flags
from extproc.metrics import MAX_CLUSTER_LABEL_LIMIT

# `--metrics-cluster-label` without a number: enough for a namespace's services, and at
# most (the catalogue's reasons) x 51 series.
DEFAULT_CLUSTER_LABEL_LIMIT = 50


class ConfigError(ValueError):
    """Command-line arguments that do not fit together."""


def configure_logging(level: str = "info") -> None:
    """One JSON object per line on stderr, as log shippers expect."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def _policy(path: str | None) -> Policy:
    return load_policy(path) if path else Policy()


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
    if args.workers > 1 and not args.listen.startswith("unix:") and args.listen.endswith(":0"):
        raise ConfigError("--workers needs a fixed port: with port 0 each worker would get its own")
    if args.max_streams < 1:
        raise ConfigError(f"--max-streams must be at least 1, got {args.max_streams}")
    if args.metrics_cluster_label is not None and not (
        1 <= args.metrics_cluster_label <= MAX_CLUSTER_LABEL_LIMIT
    ):
        raise ConfigError(
            f"--metrics-cluster-label must be 1 to {MAX_CLUSTER_LABEL_LIMIT}, "
            f"got {args.metrics_cluster_label}"
        )
    return ServeConfig(
        listen=args.listen,
        policy_path=Path(args.config) if args.config else None,
        grace=args.grace,
        tls=_tls_files(args),
        metrics_listen=args.metrics_listen,
        metrics_cluster_label=args.metrics_cluster_label or 0,
        health_listen=args.health_listen,
        max_streams=args.max_streams,
        workers=args.workers,
        envoy_admin=_envoy_admin(args.envoy_admin),
    )


def _envoy_admin(url: str | None) -> str | None:
    from extproc.envoy_admin import AdminUrlError, admin_base_url

    try:
        return admin_base_url(url) if url else None
    except AdminUrlError as exc:
        raise ConfigError(str(exc)) from None


def run_server(config: ServeConfig) -> int:
    """One server process until it is told to stop; 1 when it cannot start."""
    from extproc.server import run
    from extproc.tls import TlsError

    try:
        run(config)
    except (OSError, TlsError) as exc:
        print(f"extproc serve: {exc}", file=sys.stderr)
        return 1
    return 0


def _serve(args: argparse.Namespace) -> int:
    config = serve_config(args)
    if config.workers == 1:
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


def _report(diagnosis: Diagnosis | None, as_json: bool) -> str:
    if diagnosis is None:
        if as_json:
            return json.dumps({"reason": None})
        return "no failure: Envoy delivered this response as the upstream sent it"
    if as_json:
        return json.dumps(
            {
                "reason": diagnosis.reason,
                "hint": diagnosis.hint,
                "evidence": dict(diagnosis.evidence),
            }
        )
    evidence = " ".join(f"{k}={v}" for k, v in diagnosis.evidence)
    header = "\n".join(f"{name}: {value}" for name, value in diagnosis_headers(diagnosis))
    return (
        f"reason:   {diagnosis.reason}\nhint:     {diagnosis.hint}\nevidence: {evidence}\n{header}"
    )


def _diagnose(args: argparse.Namespace) -> int:
    from extproc.accesslog import AccessLogError, parse_access_log_line

    if args.line is None:
        try:
            print(_report(classify(_evidence_from_flags(args)), args.json))
        except UnknownFlagError as exc:
            print(f"extproc diagnose: {exc}", file=sys.stderr)
            return 2
        return 0
    lines = sys.stdin if args.line == "-" else [args.line]
    status = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            evidence = parse_access_log_line(line)
        except (AccessLogError, UnknownFlagError) as exc:
            print(f"extproc diagnose: line {number}: {exc}", file=sys.stderr)
            status = 2
            continue
        print(_report(classify(evidence), args.json))
    return status


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
    return int(run_demo(policy, stay=not args.once, scenarios=chosen))


def _render(args: argparse.Namespace) -> int:
    try:
        from extproc.render import (
            TARGETS,
            RenderError,
            RenderMode,
            RenderOptions,
            notes,
            render,
            render_all,
        )
    except ImportError as exc:
        return _missing_extra("render", exc)
    text = Path(args.config).read_text(encoding="utf-8") if args.config else ""
    try:
        options = RenderOptions(
            mode=RenderMode(args.mode),
            namespace=args.namespace,
            **({"image": args.image} if args.image else {}),
            extproc_address=args.extproc_address,
            extproc_tls_ca=args.extproc_tls_ca,
            policy=_policy(args.config),
            policy_text=text,
            cilium_service=args.cilium_service,
            envoy_listen=args.envoy_listen,
            upstream=args.upstream,
        )
        targets = [args.target] if args.target != "all" else list(TARGETS)
        for target in targets:
            for note in notes(target, options):
                print(f"extproc render {target}: gated mode: {note}", file=sys.stderr)
        if args.output_dir:
            files = render_all(options)
            for path, content in files.items():
                if path.split("/")[0] in targets:
                    out = Path(args.output_dir) / path
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(content, encoding="utf-8")
            return 0
        for target in targets:
            for path, content in render(target, options).items():
                if args.clusterwide == path.endswith("-clusterwide.yaml"):
                    sys.stdout.write(f"---\n{content}")
    except RenderError as exc:
        print(f"extproc render: {exc}", file=sys.stderr)
        return 2
    return 0


def _add_render_parser(sub: Any) -> None:
    render = sub.add_parser(
        "render",
        help="print deployment manifests: Istio EnvoyFilter, Cilium, plain Envoy, Kubernetes, "
        "monitoring (Prometheus rules, Grafana dashboard)",
    )
    render.add_argument("target", choices=["istio", "cilium", "envoy", "k8s", "monitoring", "all"])
    render.add_argument(
        "--mode",
        choices=["gated", "always"],
        default="gated",
        help="gated: Envoy matchers send only failing responses and requests the policy "
        "acts on; always: every request (default: %(default)s)",
    )
    render.add_argument(
        "--config", metavar="POLICY.yaml", help="the policy: gated matchers and the ConfigMap"
    )
    render.add_argument(
        "--namespace",
        default="extproc-doctor",
        help="the server's namespace (default: %(default)s)",
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
        help="speak TLS to the server, verified with this CA file (a path inside the proxy)",
    )
    render.add_argument(
        "--cilium-service",
        default="default/my-service:8080",
        metavar="NAMESPACE/NAME:PORT",
        help="cilium: the Service whose traffic passes the doctor (default: %(default)s)",
    )
    render.add_argument(
        "--clusterwide",
        action="store_true",
        help="cilium: print the CiliumClusterwideEnvoyConfig instead",
    )
    render.add_argument(
        "--envoy-listen",
        default="0.0.0.0:10000",
        metavar="HOST:PORT",
        help="envoy: the listener (default: %(default)s)",
    )
    render.add_argument(
        "--upstream",
        default="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="envoy: the upstream (default: %(default)s)",
    )
    render.add_argument(
        "--output-dir",
        metavar="DIR",
        help="write every mode's files in the deploy/ layout under DIR instead of printing",
    )
    render.set_defaults(func=_render)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="extproc",
        description="Envoy ext_proc server: cleans request headers, explains upstream failures.",
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="default: info; for demo, error (the table says it all)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the ext_proc gRPC server")
    serve.add_argument(
        "--listen",
        default="0.0.0.0:50051",
        metavar="HOST:PORT",
        help="address to listen on, or unix:/path/to/socket (default: %(default)s)",
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
        "--tls-cert", metavar="PEM", help="serve gRPC over TLS with this certificate chain"
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
        help="concurrent streams; beyond it new ones are refused at once (default: %(default)s)",
    )
    serve.add_argument(
        "--envoy-admin",
        metavar="URL",
        help="Envoy's admin address (http://127.0.0.1:15000): the clusters' TLS settings "
        "tell an SNI from an ALPN mismatch",
    )
    serve.set_defaults(func=_serve)

    diag = sub.add_parser(
        "diagnose", help="classify a failure from an Envoy access-log line or fields"
    )
    diag.add_argument("line", nargs="?", help="an access-log line; '-' reads lines from stdin")
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
    diag.set_defaults(func=_diagnose)

    demo = sub.add_parser(
        "demo", help="run a real Envoy, the server and failing upstreams; print the diagnoses"
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
