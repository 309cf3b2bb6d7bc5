"""Real-Envoy fixtures: a recording ext_proc server, and the mesh lab with it in its path."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest

from extproc.config import Policy
from extproc.lab import DEMO_POLICY, MESH, BackgroundServer, Lab
from extproc.lab.demo import running_doctor

from .recording_server import RecordingServer


@pytest.fixture(scope="session")
def recorder() -> Iterator[RecordingServer]:
    """A running recording ext_proc server, shared by the session."""
    with RecordingServer() as server:
        yield server


@pytest.fixture(scope="session")
def recording_lab(
    recorder: RecordingServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Lab]:
    """The mesh lab with the recording server as its ext_proc server, shared by the session."""
    with Lab(("127.0.0.1", recorder.port), tmp_path_factory.mktemp("lab"), MESH) as lab:
        yield lab


@pytest.fixture
def doctor_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[Policy], Lab]]:
    """A factory: the lab with the real server under a given policy; all torn down after."""
    with ExitStack() as stack:

        def start(policy: Policy) -> Lab:
            workdir = tmp_path_factory.mktemp("doctor-lab")
            lab, _ = stack.enter_context(running_doctor(workdir, policy))
            return lab

        yield start


@pytest.fixture(scope="module")
def doctor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, BackgroundServer]]:
    """The lab and the real server under the demo policy, reading the client sidecar's admin."""
    with running_doctor(tmp_path_factory.mktemp("doctor"), DEMO_POLICY) as running:
        yield running


@pytest.fixture(scope="module")
def blind_doctor(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Lab, BackgroundServer]]:
    """The same, but the server is not told Envoy's admin address."""
    workdir = tmp_path_factory.mktemp("blind-doctor")
    with running_doctor(workdir, DEMO_POLICY, envoy_admin=False) as running:
        yield running
