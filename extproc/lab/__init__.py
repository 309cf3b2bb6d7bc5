"""A local lab with a real Envoy that fails the way a service mesh fails.

Shared by `extproc demo` and the real-Envoy integration tests: `Lab` runs one Envoy that
plays a client sidecar (with the ext_proc filter) and the mesh servers it calls, and
`SCENARIOS` lists the Hosts that make it fail, each with the reason the doctor should give.
"""

from extproc.lab.background import BackgroundServer
from extproc.lab.certs import CertFiles, CertificateAuthority, IssuedCert
from extproc.lab.envoy import (
    EnvoyError,
    EnvoyProcess,
    free_port,
    free_ports,
    validate,
    wait_for_port,
)
from extproc.lab.scenarios import DEMO_POLICY, HYGIENE_SCENARIOS, SCENARIOS, Scenario
from extproc.lab.topology import Lab, Response, spiffe_id
from extproc.lab.upstreams import HttpUpstream, echo_upstream, status_upstream

__all__ = [
    "DEMO_POLICY",
    "HYGIENE_SCENARIOS",
    "SCENARIOS",
    "BackgroundServer",
    "CertFiles",
    "CertificateAuthority",
    "EnvoyError",
    "EnvoyProcess",
    "HttpUpstream",
    "IssuedCert",
    "Lab",
    "Response",
    "Scenario",
    "echo_upstream",
    "free_port",
    "free_ports",
    "spiffe_id",
    "status_upstream",
    "validate",
    "wait_for_port",
]
