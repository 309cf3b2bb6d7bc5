"""The `k8s` target: the server itself, and a kustomization tying it together.

Choices that matter to a mesh operator:
- The Service is headless, its port named `grpc` with `appProtocol: grpc`: the mesh
  treats it as HTTP/2, and Envoy's STRICT_DNS cluster resolves the name to every ready
  pod, so streams spread over the replicas the autoscaler adds.
- The pod stays out of the mesh's data plane: the label `sidecar.istio.io/inject: "false"`
  (the injector prefers the label over the annotation: istio/istio pkg/kube/inject/
  inject.go:223-226 at 86c9f01f) and `istio.io/dataplane-mode: none` (istio-cni's default
  ambient enablement selectors skip it even in an ambient namespace: manifests/charts/
  istio-cni/values.yaml:58-66). Proxies reach it through their own ext_proc cluster, which
  a sidecar's STRICT PeerAuthentication would refuse, and a sidecar's inbound listener
  would run the doctor's own filter on the doctor's streams.
- The Service is visible to its own namespace only in Istio's registry
  (`networking.istio.io/exportTo: "."`, read in pilot/pkg/serviceregistry/kube/
  conversion.go:84): no proxy needs an Istio cluster for it, the ext_proc cluster reaches
  it by DNS, so the mesh pushes no config for it to every proxy.
- Scale: the HorizontalPodAutoscaler owns the replica count (the Deployment sets none, or
  every apply would reset it), the PodDisruptionBudget keeps one pod through voluntary
  disruptions, and topology spread puts replicas on different nodes and zones.
- Stopping: a preStop sleep of PRE_STOP_SECONDS keeps serving while Envoys stop sending
  (see PRE_STOP_SECONDS), then SIGTERM drains (`--grace`).
- `--workers` keeps its metrics files in a temporary directory: `/tmp` is an emptyDir,
  the root filesystem stays read-only.
- Probes use the gRPC health service, which turns NOT_SERVING while the server drains,
  so the pod leaves DNS before it stops; the grace period outlasts the server's drain.
  They use a plaintext health-only port, because kubelet gRPC probes cannot speak TLS
  and the ext_proc port speaks TLS when Envoy is told to verify it (`--extproc-tls-ca`).
- With `--extproc-tls-ca` or `--extproc-mtls` the server serves TLS from the Secret
  `extproc-doctor-tls` (type kubernetes.io/tls, e.g. from cert-manager); rotated files are
  picked up without a restart. With `--extproc-mtls DIR` it requires client certificates
  from the Secret's `ca.crt` (the issuer that signs the proxies' certificates too); with
  `--extproc-mtls istio` from the mesh root istiod writes into every namespace (ConfigMap
  `istio-ca-root-cert`, key `root-cert.pem`: pilot/pkg/serviceregistry/kube/controller/
  namespacecontroller.go:165-174, pkg/config/constants/constants.go:93).
- A NetworkPolicy admits only the mesh's proxies to the ext_proc ports (`_network_policy`),
  and `cilium-networkpolicy.yaml`, applied besides on Cilium, admits cilium-envoy.
- Prometheus metrics on the named port `metrics`, with the usual scrape annotations.
"""

from __future__ import annotations

from typing import Any

import yaml

from extproc.filter_config import MESH_IDENTITY, MTLS_CA
from extproc.render.options import GRPC_PORT, HTTP_PORT, NAME, POLICY_FILE, RenderOptions

API_VERSION = "kustomize.config.k8s.io/v1beta1"
POLICY_DIR = "/etc/extproc-doctor"
TLS_DIR = "/etc/extproc-doctor-tls"
TLS_SECRET = f"{NAME}-tls"
HEALTH_PORT = 50052
METRICS_PORT = 9090
# The live page (`serve --ui-listen`): on the pod's loopback, so only `kubectl
# port-forward` reaches it (the kubelet's runtime dials localhost:PORT inside the pod's
# network namespace: containerd 25e3270 pkg/cri/server/sandbox_portforward_linux.go);
# a Deployment port, never a Service's (docs/page.md).
UI_PORT = 9902
DRAIN_SECONDS = 10
# How long Envoys may still open streams to a pod after it starts terminating. Its
# EndpointSlice entry goes at once, but the headless name is answered from DNS: the
# Corefile Kubernetes installs sets the kubernetes plugin's TTL to 30 s (kubernetes/
# kubernetes#76238; the plugin's own default is 5 s) and its `cache 30` keeps answers that
# long, and a STRICT_DNS cluster re-resolves every dns_refresh_rate (Envoy's default 5 s).
# 35 s, plus propagation. Streams already open finish within the drain that follows.
PRE_STOP_SECONDS = 40
# Where `--workers` keeps prometheus-client's multiprocess files (tempfile: TMPDIR or /tmp).
TMP_DIR = "/tmp"  # noqa: S108 - an emptyDir of the pod's own, not a shared /tmp
TMP_SIZE = "64Mi"
ISTIO_CA_CONFIGMAP = "istio-ca-root-cert"
ISTIO_CA_DIR = "/etc/istio-ca"
LABELS = {"app.kubernetes.io/name": NAME}
# Labels that keep the pod out of Istio's data plane (see the module docstring).
OUT_OF_MESH = {"sidecar.istio.io/inject": "false", "istio.io/dataplane-mode": "none"}
# Every pod Istio injected carries this label, sidecars (injection-template.yaml:37) and
# gateways (gateway-injection-template.yaml:5, in manifests/charts/istio-control/
# istio-discovery/files/ at istio/istio 86c9f01f).
MESH_PROXY_LABEL = "service.istio.io/canonical-name"
CILIUM_POLICY_FILE = "cilium-networkpolicy.yaml"

# File name -> builder, in the order kustomize and `kubectl apply` should see them.
_FILES = (
    "namespace.yaml",
    "serviceaccount.yaml",
    "configmap.yaml",
    "deployment.yaml",
    "service.yaml",
    "poddisruptionbudget.yaml",
    "horizontalpodautoscaler.yaml",
    "networkpolicy.yaml",
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
        "networkpolicy.yaml": _network_policy(options),
    }
    manifests = {name: built[name] for name in _FILES}
    # Not in the kustomization: it needs Cilium's CRDs. Policies add up, so on Cilium it
    # is applied besides networkpolicy.yaml.
    manifests[CILIUM_POLICY_FILE] = _cilium_network_policy(options)
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
    header = "# extproc-doctor policy; keys: docs/policy.md.\n"
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
            # No replicas: the HorizontalPodAutoscaler owns the count.
            "selector": {"matchLabels": dict(LABELS)},
            "template": {
                "metadata": {"labels": LABELS | OUT_OF_MESH, "annotations": scrape},
                "spec": _pod_spec(options),
            },
        }
    }


def _pod_spec(options: RenderOptions) -> dict[str, Any]:
    volumes: list[dict[str, Any]] = [
        {"name": "policy", "configMap": {"name": NAME}},
        {"name": "tmp", "emptyDir": {"sizeLimit": TMP_SIZE}},
    ]
    if options.server_tls:
        volumes.append({"name": "tls", "secret": {"secretName": TLS_SECRET}})
    if options.extproc_mtls == MESH_IDENTITY:
        volumes.append({"name": "istio-ca", "configMap": {"name": ISTIO_CA_CONFIGMAP}})
    spread = {"maxSkew": 1, "whenUnsatisfiable": "ScheduleAnyway",
              "labelSelector": {"matchLabels": dict(LABELS)}}  # fmt: skip
    return {
        "serviceAccountName": NAME,
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": PRE_STOP_SECONDS + DRAIN_SECONDS + 5,
        "topologySpreadConstraints": [
            spread | {"topologyKey": "kubernetes.io/hostname"},
            spread | {"topologyKey": "topology.kubernetes.io/zone"},
        ],
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
        "--ui-listen", f"127.0.0.1:{UI_PORT}",
        "--config", f"{POLICY_DIR}/{POLICY_FILE}",
        "--grace", str(DRAIN_SECONDS),
    ]  # fmt: skip
    if options.server_tls:
        args += ["--tls-cert", f"{TLS_DIR}/tls.crt", "--tls-key", f"{TLS_DIR}/tls.key"]
    if options.extproc_mtls == MESH_IDENTITY:
        args += ["--client-ca", f"{ISTIO_CA_DIR}/root-cert.pem"]
    elif options.extproc_mtls is not None:
        args += ["--client-ca", f"{TLS_DIR}/{MTLS_CA}"]
    return args


def _container(options: RenderOptions) -> dict[str, Any]:
    probe = {"grpc": {"port": HEALTH_PORT}}
    mounts = [
        {"name": "policy", "mountPath": POLICY_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": TMP_DIR},
    ]
    if options.server_tls:
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    if options.extproc_mtls == MESH_IDENTITY:
        mounts.append({"name": "istio-ca", "mountPath": ISTIO_CA_DIR, "readOnly": True})
    return {
        "name": "extproc",
        "image": options.image,
        "args": _args(options),
        "ports": [
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            {"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
            {"name": "ui", "containerPort": UI_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": probe | {"periodSeconds": 5},
        "lifecycle": {"preStop": {"sleep": {"seconds": PRE_STOP_SECONDS}}},
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
    service = _resource("v1", "Service", options)
    service["metadata"]["annotations"] = {"networking.istio.io/exportTo": "."}
    return service | {"spec": {"clusterIP": "None", "selector": dict(LABELS), "ports": ports}}


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


def _tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": port} for port in ports]


def _network_policy(options: RenderOptions) -> dict[str, Any]:
    """Ingress to the doctor: the ext_proc ports from Istio's proxies, metrics from any pod.

    "The mesh's proxies" are pods Istio injected, in any namespace (MESH_PROXY_LABEL). A
    label is no identity: any pod that sets it is admitted, which is what mTLS
    (`--extproc-mtls`) is for. The health port has no rule: kubelet probes come from the
    pod's node, which a NetworkPolicy always admits. Prometheus may live anywhere, so the
    metrics port admits every pod; narrow it to Prometheus's namespace where known.
    """
    proxies = {
        "namespaceSelector": {},
        "podSelector": {"matchExpressions": [{"key": MESH_PROXY_LABEL, "operator": "Exists"}]},
    }
    return _resource("networking.k8s.io/v1", "NetworkPolicy", options) | {
        "spec": {
            "podSelector": {"matchLabels": dict(LABELS)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [proxies], "ports": _tcp(GRPC_PORT, HTTP_PORT)},
                {"from": [{"namespaceSelector": {}}], "ports": _tcp(METRICS_PORT)},
            ],
        }
    }


def _cilium_network_policy(options: RenderOptions) -> dict[str, Any]:
    """On Cilium: admit cilium-envoy, which runs with hostNetwork, so no pod selector finds it.

    Its connections come from a node's address, Cilium's `host` (this node) and
    `remote-node` entities. Every process with the host network shares them.
    """
    ports = [{"port": str(port), "protocol": "TCP"} for port in (GRPC_PORT, HTTP_PORT)]
    return _resource("cilium.io/v2", "CiliumNetworkPolicy", options) | {
        "spec": {
            "endpointSelector": {"matchLabels": dict(LABELS)},
            "ingress": [{"fromEntities": ["host", "remote-node"], "toPorts": [{"ports": ports}]}],
        }
    }
