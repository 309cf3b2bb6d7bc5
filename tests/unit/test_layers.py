"""The architecture, enforced: the decision logic never sees grpc or protobuf."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "extproc"
PURE_MODULES = [
    "core.py",
    "admission.py",
    "config.py",
    "headers.py",
    "diagnosis.py",
    "flags.py",
    "closes.py",
    "annotate.py",
    "accesslog/__init__.py",
    "accesslog/formats.py",
    "accesslog/scan.py",
    "accesslog/summary.py",
    "filter_config.py",
    "failures.py",
]
FORBIDDEN = (
    "grpc",
    "grpc_health",
    "grpc_reflection",
    "google.protobuf",
    "envoy",
    "envoy_data_plane",
)


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


class TestPureDecisionLogic:
    @pytest.mark.parametrize("module", PURE_MODULES)
    def test_no_grpc_or_protobuf_imports(self, module):
        """Rules, catalogue, annotations and config import neither grpc, protobuf nor Envoy's API."""
        imported = imported_modules(PACKAGE / module)
        bad = sorted(m for m in imported if m.split(".")[0] in FORBIDDEN or m.startswith(FORBIDDEN))
        assert bad == []

    def test_only_the_adapter_touches_ext_proc_messages(self):
        """Of the package's own modules, only the gRPC door (server.py, and wire.py, which
        reads its messages off the wire) imports the ext_proc protobufs; only it uses wire."""
        users = sorted(
            str(p.relative_to(PACKAGE))
            for p in PACKAGE.rglob("*.py")
            if any(m.startswith("envoy.service.ext_proc") for m in imported_modules(p))
        )
        assert users == ["server.py", "wire.py"]
        wire_users = sorted(
            str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
            if "extproc.wire" in imported_modules(p)
        )  # fmt: skip
        assert wire_users == ["server.py"]

    def test_core_knows_no_wire_format(self):
        """The core takes and returns plain data: no protobuf, no JSON, no HTTP parser.

        Each adapter owns its codec; the core is what both share.
        """
        imported = imported_modules(PACKAGE / "core.py")
        wire = ("json", "orjson", "msgspec", "httptools", "grpc", "google", "envoy", "asyncio")
        assert sorted(m for m in imported if m.split(".")[0] in wire) == []

    def test_adapters_share_the_core(self):
        """Each adapter calls the core for both phases instead of deciding itself."""
        for adapter in ("server.py", "http_lane.py"):
            path = PACKAGE / adapter
            tree = ast.parse(path.read_text(encoding="utf-8"))
            called = {
                node.func.attr
                for node in ast.walk(tree)
                if isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "core"
            }
            # The request phase: on_request, or request_phase (names first, then on_request).
            assert "response_phase" in called and called & {"on_request", "request_phase"}, adapter
            # The response phase's steps (triage, needs_answer, on_response) stay in the core.
            assert not called & {"triage", "needs_answer", "on_response"}, adapter
            imported = imported_modules(path)
            assert "extproc.headers" not in imported or adapter == "server.py"
            assert "extproc.diagnosis" not in imported or adapter == "server.py"


DOORS = {"extproc.server", "extproc.http_lane", "extproc.page"}


class TestOneModulePerDoor:
    """The process starts the doors; each door knows its protocol and the core, not the others."""

    @pytest.mark.parametrize("door", sorted(DOORS))
    def test_a_door_imports_no_other_door_nor_the_process(self, door):
        """gRPC, the HTTP lane and the page import neither each other nor extproc.process."""
        path = ROOT / (door.replace(".", "/") + ".py")
        imported = imported_modules(path)
        assert not imported & (DOORS - {door}), door
        assert "extproc.process" not in imported, door

    def test_the_process_starts_every_door(self):
        """extproc.process is where the three doors meet."""
        assert imported_modules(ROOT / "extproc" / "process.py") >= DOORS

    def test_the_command_line_and_the_workers_do_not_import_each_other(self):
        """cli builds the config and hands it over; workers runs the process, not the CLI."""
        assert "extproc.cli" not in imported_modules(ROOT / "extproc" / "workers.py")
        cli = ast.parse((ROOT / "extproc" / "cli.py").read_text(encoding="utf-8"))
        top_level = {
            node.module for node in cli.body if isinstance(node, ast.ImportFrom) and node.module
        }
        assert "extproc.workers" not in top_level


class TestServeLoadsNoRenderer:
    """A server process never loads the renderers (typed Envoy config: some 20 MiB each)."""

    def test_serve_config_and_doors_import_no_render_module(self):
        """Building serve's config (the page on, so its docs URL is looked up) and importing
        the process and its doors leaves extproc.render unloaded."""
        code = (
            "import sys\n"
            "from extproc import cli, process, workers\n"
            "args = cli.build_parser().parse_args(['serve', '--ui-listen', '127.0.0.1:0'])\n"
            "cli.serve_config(args)\n"
            "print(sorted(m for m in sys.modules if m.startswith('extproc.render')))\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, cwd=ROOT)  # fmt: skip
        assert out.stdout.strip() == "[]"
