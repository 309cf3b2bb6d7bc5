"""A local mesh lab with real Envoys that fails the way a service mesh fails.

Shared by `extproc demo` and the real-Envoy integration tests: a `Topology` describes a
client sidecar, server sidecars (STRICT, PERMISSIVE) and apps; `Lab` runs it (two Envoy
processes, a mesh CA's certificates, the apps); `SCENARIOS` lists the requests that make
it fail, each with the reason the doctor should give.
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
from extproc.lab.scenarios import (
    ALL_SCENARIOS,
    DEMO_POLICY,
    EDGE_SCENARIOS,
    MESH,
    MESH_INCIDENTS,
    SCENARIOS,
    Scenario,
    find_scenarios,
)
from extproc.lab.topology import (
    App,
    Cert,
    Destination,
    Lab,
    Mode,
    Response,
    Route,
    Tls,
    Topology,
    Workload,
    spiffe_id,
)
from extproc.lab.upstreams import HttpUpstream, echo_upstream, status_upstream

__all__ = [
    "ALL_SCENARIOS",
    "DEMO_POLICY",
    "EDGE_SCENARIOS",
    "MESH",
    "MESH_INCIDENTS",
    "SCENARIOS",
    "App",
    "BackgroundServer",
    "Cert",
    "CertFiles",
    "CertificateAuthority",
    "Destination",
    "EnvoyError",
    "EnvoyProcess",
    "HttpUpstream",
    "IssuedCert",
    "Lab",
    "Mode",
    "Response",
    "Route",
    "Scenario",
    "Tls",
    "Topology",
    "Workload",
    "echo_upstream",
    "find_scenarios",
    "free_port",
    "free_ports",
    "spiffe_id",
    "status_upstream",
    "validate",
    "wait_for_port",
]
