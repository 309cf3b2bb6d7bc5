"""The package as a user gets it: `python -m build` makes an sdist and, from it, a wheel;
the wheel installs into a fresh virtual environment and works with no file of the
repository on the path (run from an empty directory, PYTHONPATH unset).

Like tests/deploy/test_image_install.py it uses pip's cache; the build backend comes from
the package index, as `python -m build` gets it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from .test_image_install import assert_serves_health

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parents[2]
# An Envoy access-log line in Istio's default format, as a user pastes it.
PASTED = (
    '[2026-11-21T12:29:51.572Z] "GET / HTTP/1.1" 503 UF '
    "upstream_reset_before_response_started{remote_connection_failure} - "
    '"delayed connect error: Connection refused" 0 91 0 - "-" "curl/8.5.0" "-" '
    '"orders.default.svc.cluster.local" "10.0.0.7:8080" '
    "outbound|8080||orders.default.svc.cluster.local - 10.96.0.9:8080 10.0.0.5:40000 - default"
)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    """(venv, environment, an empty working directory) with the built wheel installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    dist = tmp / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = dist.glob("extproc_doctor-*-py3-none-any.whl")
    (sdist,) = dist.glob("extproc_doctor-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
    assert any(n.endswith("/extproc/py.typed") for n in names)
    assert any(n.endswith("/docs/monitoring.md") for n in names)  # the runbooks it names

    venv = tmp / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", f"{wheel}[render]"],
        check=True,
        capture_output=True,
        env=env,
        timeout=600,
    )
    cwd = tmp / "elsewhere"
    cwd.mkdir()
    return venv, env, cwd


def extproc(installed, *args: str) -> subprocess.CompletedProcess[str]:
    venv, env, cwd = installed
    return subprocess.run(
        [str(venv / "bin" / "extproc"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


class TestWheel:
    def test_runs_from_the_venv_not_the_repository(self, installed):
        """The installed package is imported from the venv, typed (py.typed), and no path of
        the repository is on sys.path."""
        venv, env, cwd = installed
        probe = (
            "import sys, extproc, pathlib; p = pathlib.Path(extproc.__file__).parent; "
            "print(p); print((p / 'py.typed').exists()); print('\\n'.join(sys.path))"
        )
        out = subprocess.run(
            [str(venv / "bin" / "python"), "-c", probe],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        assert Path(out[0]).is_relative_to(venv)
        assert out[1] == "True"
        assert not [p for p in out[2:] if p and Path(p).resolve().is_relative_to(ROOT)]

    def test_page_files_in_the_wheel(self, installed):
        """The live page's HTML, script and style are package data, read from the venv."""
        venv, env, cwd = installed
        probe = (
            "from importlib import resources; import extproc.page as p; "
            "print(all(resources.files('extproc').joinpath('ui', n).is_file() "
            "for n, _ in p._STATIC.values()))"
        )
        out = subprocess.run(
            [str(venv / "bin" / "python"), "-c", probe],
            cwd=cwd, env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert out.stdout.strip() == "True"

    def test_version(self, installed):
        """`extproc --version` names the version the metadata has."""
        result = extproc(installed, "--version")
        assert result.returncode == 0
        assert result.stdout.strip() == "extproc 0.1.0"

    def test_render_istio(self, installed):
        """`extproc render istio` prints the two EnvoyFilters."""
        result = extproc(installed, "render", "istio")
        assert result.returncode == 0, result.stderr
        docs = [d for d in yaml.safe_load_all(result.stdout) if d]
        assert [d["kind"] for d in docs] == ["EnvoyFilter", "EnvoyFilter"]

    def test_render_monitoring_names_the_runbook_page(self, installed):
        """The installed metadata names no documentation URL, so the alerts link none and
        name docs/monitoring.md instead."""
        result = extproc(installed, "render", "monitoring")
        assert result.returncode == 0, result.stderr
        docs = [d for d in yaml.safe_load_all(result.stdout) if d]
        groups = [g for d in docs for g in (d.get("groups") or d.get("spec", {}).get("groups", []))]
        alerts = [r for g in groups for r in g["rules"] if "alert" in r]
        assert alerts
        for rule in alerts:
            assert "runbook_url" not in rule["annotations"]
            assert (
                f"docs/monitoring.md, heading 'Alert: {rule['alert']}'"
                in (rule["annotations"]["runbook"])
            )

    def test_diagnose_a_pasted_line(self, installed):
        """`extproc diagnose` reads a pasted access-log line and names the reason."""
        result = extproc(installed, "diagnose", PASTED)
        assert result.returncode == 0, result.stderr
        assert "reason:   upstream_refused" in result.stdout

    def test_serve_answers_health(self, installed):
        """`extproc serve` answers the gRPC health check SERVING and exits 0 on SIGTERM."""
        venv, env, cwd = installed
        argv = [str(venv / "bin" / "extproc"), "serve", "--listen", "127.0.0.1:0"]
        assert_serves_health(argv, cwd, env)
