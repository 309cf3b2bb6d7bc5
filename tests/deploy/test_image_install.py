"""The Dockerfile's install steps, replayed into a fresh virtual environment (Docker cannot run here).

The build stage's COPY lines pick the files, its RUN line installs them (with the image's
paths replaced by temporary ones), and the final stage's ENTRYPOINT and CMD start the
server, which must answer the gRPC health check. pip's cache is used; the image disables it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parents[2]
VENV, SRC = "/opt/extproc", "/src"


def stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (instruction, arguments), continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    found: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        instruction, _, rest = line.strip().partition(" ")
        if instruction == "FROM":
            found.append([])
        found[-1].append((instruction, rest.strip()))
    return found


def test_dockerfile_shape():
    """Two stages on a slim Python; the final one runs as a non-root user."""
    build, final = stages()
    assert all("slim" in stage[0][1] for stage in (build, final))
    (user,) = [args for instruction, args in final if instruction == "USER"]
    assert not user.startswith(("0", "root"))


def test_image_installs_and_serves(tmp_path):
    """The server installed as the image installs it starts, answers health, stops on SIGTERM, and carries no Envoy."""
    build, final = stages()
    src, venv = tmp_path / "src", tmp_path / "venv"
    for instruction, args in build:
        if instruction == "COPY" and not args.startswith("--from"):
            *sources, dest = args.split()
            for source in sources:
                target = (
                    src / Path(dest).relative_to(SRC) if not dest.endswith("/") else src / source
                )
                copy = shutil.copytree if (ROOT / source).is_dir() else shutil.copy
                target.parent.mkdir(parents=True, exist_ok=True)
                copy(ROOT / source, target)
        elif instruction == "RUN":
            command = args.replace(VENV, str(venv)).replace(SRC, str(src))
            env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
            env.pop("VIRTUAL_ENV", None)
            subprocess.run(
                ["sh", "-c", command], check=True, env=env, timeout=300, capture_output=True
            )
    assert not (venv / "bin" / "envoy").exists()
    assert not list((venv / "lib").glob("python*/site-packages/envoy_data_plane"))

    entrypoint = json.loads(next(a for i, a in final if i == "ENTRYPOINT"))
    cmd = json.loads(next(a for i, a in final if i == "CMD"))
    cmd[cmd.index("--listen") + 1] = "127.0.0.1:0"
    argv = [str(venv / "bin" / entrypoint[0]), *entrypoint[1:], *cmd]
    assert_serves_health(argv, tmp_path)


def assert_serves_health(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
    """`argv` (an `extproc serve` on port 0) answers the gRPC health check SERVING and
    exits 0 on SIGTERM; the process is always stopped."""
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
    try:
        port = serving_port(proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=10
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def serving_port(proc: subprocess.Popen[str]) -> int:
    """The port from the server's `serving` log line (it listens on port 0)."""
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("{") and json.loads(line).get("event") == "serving":
            return int(json.loads(line)["port"])
    tail = "".join(seen[-20:])
    raise AssertionError(
        f"`{shlex.join(proc.args)}` exited ({proc.wait()}) before serving:\n{tail}"
    )
