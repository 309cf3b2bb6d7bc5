"""The `k8s` target: the server itself, and a kustomization tying it together.

Choices that matter to a mesh operator:
- The Service is headless, its port named `grpc` with `appProtocol: grpc`: the mesh
  treats it as HTTP/2, and Envoy's STRICT_DNS cluster resolves the name to every ready
  pod, so streams spread over the replicas the autoscaler adds.
- The pod has no sidecar: proxies reach it through their own ext_proc cluster (plaintext
  or its own TLS), which a STRICT PeerAuthentication on a sidecar would refuse.
- Probes use the gRPC health service, which turns NOT_SERVING while the server drains,
  so the pod leaves DNS before it stops; the grace period outlasts the server's drain.
  They use a plaintext health-only port, because kubelet gRPC probes cannot speak TLS
  and the ext_proc port speaks TLS when Envoy is told to verify it (`--extproc-tls-ca`).
- With `--extproc-tls-ca` the server serves TLS from the Secret `extproc-doctor-tls`
  (type kubernetes.io/tls, e.g. from cert-manager); rotated files are picked up without
  a restart.
- Prometheus metrics on the named port `metrics`, with the usual scrape annotations.
"""

from __future__ import annotations

from typing import Any

import yaml

from extproc.render.options import GRPC_PORT, HTTP_PORT, NAME, POLICY_FILE, RenderOptions

API_VERSION = "kustomize.config.k8s.io/v1beta1"
POLICY_DIR = "/etc/extproc-doctor"
TLS_DIR = "/etc/extproc-doctor-tls"
TLS_SECRET = f"{NAME}-tls"
HEALTH_PORT = 50052
METRICS_PORT = 9090
DRAIN_SECONDS = 10
LABELS = {"app.kubernetes.io/name": NAME}

# File name -> builder, in the order kustomize and `kubectl apply` should see them.
_FILES = (
    "namespace.yaml",
    "serviceaccount.yaml",
    "configmap.yaml",
    "deployment.yaml",
    "service.yaml",
    "poddisruptionbudget.yaml",
    "horizontalpodautoscaler.yaml",
)


def render_manifests(options: RenderOptions) -> dict[str, dict[str, Any]]:
    """Each resource by its file name, then `kustomization.yaml`."""
    built = {
        "namespace.yaml": _namespace(options),
        "serviceaccount.yaml": _resource("v1", "ServiceAccount", options)
        | {"automountServiceAccountToken": False},
        "configmap.yaml": _resource("v1", "ConfigMap", options)
        | {"data": {POLICY_FILE: options.policy_text or default_policy_text(options)}},
        "deployment.yaml": _deployment(options),
        "service.yaml": _service(options),
        "poddisruptionbudget.yaml": _pdb(options),
        "horizontalpodautoscaler.yaml": _hpa(options),
    }
    manifests = {name: built[name] for name in _FILES}
    manifests["kustomization.yaml"] = {
        "apiVersion": API_VERSION,
        "kind": "Kustomization",
        "namespace": options.namespace,
        "resources": list(_FILES),
    }
    return manifests


def default_policy_text(options: RenderOptions) -> str:
    """The built-in policy written out, so an operator sees every key to change."""
    policy = options.policy
    values = {
        "mode": str(policy.mode),
        "host_rewrites": dict(policy.host_rewrites),
        "strip_host_port": policy.strip_host_port,
        "echoed_envoy_headers": str(policy.echoed_envoy_headers),
        "forwarding_headers": str(policy.forwarding_headers),
        "underscore_headers": str(policy.underscore_headers),
        "direction": str(policy.direction),
    }
    header = "# extproc-doctor policy; keys: README.md, Policy reference.\n"
    return header + yaml.safe_dump(values, sort_keys=False)


def _metadata(options: RenderOptions) -> dict[str, Any]:
    return {"name": NAME, "namespace": options.namespace, "labels": dict(LABELS)}


def _resource(api_version: str, kind: str, options: RenderOptions) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": kind, "metadata": _metadata(options)}


def _namespace(options: RenderOptions) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": options.namespace, "labels": dict(LABELS)},
    }


def _deployment(options: RenderOptions) -> dict[str, Any]:
    scrape = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(METRICS_PORT),
        "prometheus.io/path": "/metrics",
    }
    return _resource("apps/v1", "Deployment", options) | {
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": dict(LABELS)},
            "template": {
                "metadata": {
                    "labels": dict(LABELS),
                    "annotations": {"sidecar.istio.io/inject": "false", **scrape},
                },
                "spec": _pod_spec(options),
            },
        }
    }


def _pod_spec(options: RenderOptions) -> dict[str, Any]:
    volumes: list[dict[str, Any]] = [{"name": "policy", "configMap": {"name": NAME}}]
    if options.extproc_tls_ca:
        volumes.append({"name": "tls", "secret": {"secretName": TLS_SECRET}})
    return {
        "serviceAccountName": NAME,
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": DRAIN_SECONDS + 5,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(options)],
        "volumes": volumes,
    }


def _args(options: RenderOptions) -> list[str]:
    args = [
        "serve",
        "--listen", f"0.0.0.0:{GRPC_PORT}",
        "--http-listen", f"0.0.0.0:{HTTP_PORT}",
        "--health-listen", f"0.0.0.0:{HEALTH_PORT}",
        "--metrics-listen", f"0.0.0.0:{METRICS_PORT}",
        "--config", f"{POLICY_DIR}/{POLICY_FILE}",
        "--grace", str(DRAIN_SECONDS),
    ]  # fmt: skip
    if options.extproc_tls_ca:
        args += ["--tls-cert", f"{TLS_DIR}/tls.crt", "--tls-key", f"{TLS_DIR}/tls.key"]
    return args


def _container(options: RenderOptions) -> dict[str, Any]:
    probe = {"grpc": {"port": HEALTH_PORT}}
    mounts = [{"name": "policy", "mountPath": POLICY_DIR, "readOnly": True}]
    if options.extproc_tls_ca:
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    return {
        "name": "extproc",
        "image": options.image,
        "args": _args(options),
        "ports": [
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            {"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": probe | {"periodSeconds": 5},
        "livenessProbe": probe | {"periodSeconds": 10, "failureThreshold": 3},
        "resources": {
            "requests": {"cpu": "100m", "memory": "64Mi"},
            "limits": {"cpu": "1", "memory": "256Mi"},
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }


def _service(options: RenderOptions) -> dict[str, Any]:
    ports = [
        {
            "name": "grpc",
            "port": GRPC_PORT,
            "targetPort": "grpc",
            "protocol": "TCP",
            "appProtocol": "grpc",
        },
        # The HTTP lane (`--transport http` manifests): ext_proc's http_service over HTTP/1.1.
        {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP",
         "appProtocol": "http"},
    ]  # fmt: skip
    return _resource("v1", "Service", options) | {
        "spec": {"clusterIP": "None", "selector": dict(LABELS), "ports": ports}
    }


def _pdb(options: RenderOptions) -> dict[str, Any]:
    return _resource("policy/v1", "PodDisruptionBudget", options) | {
        "spec": {"minAvailable": 1, "selector": {"matchLabels": dict(LABELS)}}
    }


def _hpa(options: RenderOptions) -> dict[str, Any]:
    target = {"type": "Utilization", "averageUtilization": 70}
    return _resource("autoscaling/v2", "HorizontalPodAutoscaler", options) | {
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": NAME},
            "minReplicas": 2,
            "maxReplicas": 10,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": target}}],
        }
    }
