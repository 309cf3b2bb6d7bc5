"""The lab's failure scenarios as data: which Host to ask for, and what the doctor should say.

Each Host selects one virtual host of the lab's client sidecar (see `topology.py`), set
up to fail in one way a mesh fails. The demo walks this table; the integration tests
parametrize over it.
"""

from __future__ import annotations

from dataclasses import dataclass

from extproc.config import Policy, policy_from_mapping

# The demo's policy: the defaults, plus one Host rewrite for the reverse-proxy case.
DEMO_POLICY: Policy = policy_from_mapping(
    {"host_rewrites": {"store.example.com": "echo.demo"}}, source="<demo policy>"
)


@dataclass(frozen=True, slots=True)
class Scenario:
    """One request through the lab and the reason code it should be diagnosed with."""

    name: str
    host: str
    path: str
    # None: the request succeeds and needs no diagnosis.
    expected_reason: str | None
    description: str
    headers: tuple[tuple[str, str], ...] = ()
    # Under DEMO_POLICY: the x-extproc-actions members (tokens with their ;report flag).
    expected_actions: tuple[str, ...] = ()
    expected_status: int | None = None


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("clean", "echo.demo", "/", None, "a healthy plaintext service answers"),
    Scenario(
        "refused", "refused.demo", "/", "upstream_refused",
        "the service is called on a port where nothing listens",
    ),
    Scenario(
        "not_tls", "not-tls.demo", "/", "upstream_not_tls",
        "the sidecar originates mesh TLS to a plaintext port",
    ),
    Scenario(
        "requires_mtls", "mtls.demo", "/", "upstream_requires_mtls",
        "plaintext to a STRICT-mTLS server (a DestinationRule with tls.mode DISABLE)",
    ),
    Scenario(
        "san_mismatch", "san.demo", "/", "upstream_san_mismatch",
        "the server presents .../sa/web where the client expects .../sa/api",
    ),
    Scenario(
        "untrusted", "untrusted.demo", "/", "upstream_cert_untrusted",
        "the server's certificate comes from another mesh's root CA",
    ),
    Scenario(
        "expired", "expired.demo", "/", "upstream_cert_expired",
        "the server's certificate expired yesterday",
    ),
    Scenario(
        "no_route", "api.demo", "/other", "no_route",
        "the virtual host routes only /api/",
    ),
    Scenario(
        "host_not_in_mesh", "shop.example.com", "/", "host_not_in_mesh",
        "an external Host matches no mesh service and falls to the passthrough route",
    ),
    Scenario(
        "app_error", "app-error.demo", "/", "upstream_app_error",
        "the application itself answers 503",
    ),
)  # fmt: skip

# Request hygiene under DEMO_POLICY: what the server changes on the way in.
HYGIENE_SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "host_rewrite", "store.example.com", "/", None,
        "a reverse proxy forwarded the external Host; host_rewrites maps it to echo.demo",
        expected_actions=("rewrite-host",), expected_status=200,
    ),
    Scenario(
        "echoed_headers", "echo.demo", "/", None,
        "an app echoed inbound-only x-envoy headers and sent an underscore header",
        headers=(
            ("x-envoy-peer-metadata-id", "sidecar~10.0.0.9~reviews-v1.default~default.svc.cluster.local"),
            ("x-envoy-attempt-count", "3"),
            ("x_user_id", "42"),
        ),
        expected_actions=("strip-echoed-envoy-headers", "strip-underscore-headers;report"),
        expected_status=200,
    ),
)  # fmt: skip
