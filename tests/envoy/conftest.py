"""Real-Envoy fixtures: a recording ext_proc server, and the lab with it in its path."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest

from extproc.config import Policy
from extproc.lab import DEMO_POLICY, BackgroundServer, Lab
from extproc.server import ExtProcServer

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
    """The lab with the recording server as its ext_proc server, shared by the session."""
    with Lab(("127.0.0.1", recorder.port), tmp_path_factory.mktemp("lab")) as lab:
        yield lab


@pytest.fixture
def doctor_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[Policy], Lab]]:
    """A factory: the lab with the real server under a given policy; all torn down after."""
    with ExitStack() as stack:

        def start(policy: Policy) -> Lab:
            server = stack.enter_context(BackgroundServer(ExtProcServer(policy)))
            workdir = tmp_path_factory.mktemp("doctor-lab")
            return stack.enter_context(Lab(("127.0.0.1", server.port), workdir))

        yield start


@pytest.fixture(scope="module")
def demo_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The lab with the real server under the demo policy, shared by a module."""
    with (
        BackgroundServer(ExtProcServer(DEMO_POLICY)) as server,
        Lab(("127.0.0.1", server.port), tmp_path_factory.mktemp("demo-lab")) as lab,
    ):
        yield lab
