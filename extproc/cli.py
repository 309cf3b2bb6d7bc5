"""argv → configuration → one of the commands. No logic of its own beyond that."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence

import structlog

from extproc.annotate import diagnosis_headers
from extproc.config import Policy, PolicyError, load_policy
from extproc.diagnosis import Diagnosis, Evidence, classify
from extproc.flags import UnknownFlagError, parse_flags


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


def _serve(args: argparse.Namespace) -> int:
    from extproc.server import serve

    policy = _policy(args.config)
    try:
        asyncio.run(serve(policy, args.listen, args.grace))
    except OSError as exc:
        print(f"extproc serve: {exc}", file=sys.stderr)
        return 1
    return 0


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


def _demo(args: argparse.Namespace) -> int:
    try:
        from extproc.lab.demo import run_demo
    except ImportError as exc:
        print(
            f"extproc demo needs the demo extra (pip install 'extproc-doctor[demo]'): {exc}",
            file=sys.stderr,
        )
        return 2
    return int(run_demo(_policy(args.config) if args.config else None, stay=not args.once))


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
        help="address to listen on (default: %(default)s)",
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
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level or ("error" if args.command == "demo" else "info"))
    try:
        return int(args.func(args))
    except PolicyError as exc:
        print(f"extproc {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
