"""extproc-doctor: an Envoy ext_proc server that cleans mesh-hostile request headers
and explains upstream failures in the response itself."""

from extproc.config import Policy, PolicyError, load_policy, policy_from_mapping
from extproc.diagnosis import Diagnosis, Evidence, classify
from extproc.headers import RequestDecision, decide

__all__ = [
    "Diagnosis",
    "Evidence",
    "Policy",
    "PolicyError",
    "RequestDecision",
    "classify",
    "decide",
    "load_policy",
    "policy_from_mapping",
]
