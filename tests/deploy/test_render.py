"""`extproc render`: deploy/ matches it, its Envoy parts are typed, its Kubernetes objects are valid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from extproc.cli import build_parser
from extproc.config import Action, Direction, Policy
from extproc.filter_config import DIRECTION_METADATA, RESPONSE_ATTRIBUTES, SAMPLE_ATTRIBUTES
from extproc.render import (
    TARGETS,
    RenderError,
    RenderMode,
    RenderOptions,
    cilium,
    modes,
    render,
    render_all,
)
from extproc.render.envoy_config import HttpFilter, typed
from extproc.render.istio import render_envoy_filters
from extproc.render.k8s import CILIUM_POLICY_FILE, LABELS, render_manifests

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
# The oldest Kubernetes the manifests promise to fit (gRPC probes are GA since 1.27).
KUBERNETES = "1.30"
VARIANTS = [
    RenderOptions(),
    RenderOptions(extproc_mtls="/etc/x"),
    RenderOptions(extproc_mtls="istio"),
]
VARIANT_IDS = ["plaintext", "mtls-dir", "mtls-istio"]
BUILT_IN_KINDS = [
    n
    for n in render_manifests(RenderOptions())
    if n not in ("kustomization.yaml", CILIUM_POLICY_FILE)
]


class TestDeployDirectory:
    def test_deploy_matches_render(self):
        """deploy/ holds exactly what `extproc render all` produces now; `make deploy` refreshes it."""
        expected = render_all(RenderOptions())
        actual = {
            str(p.relative_to(DEPLOY)): p.read_text(encoding="utf-8")
            for p in DEPLOY.rglob("*")
            if p.is_file()
        }
        assert sorted(actual) == sorted(expected), "run `make deploy`"
        stale = [path for path in expected if actual[path] != expected[path]]
        assert stale == [], f"stale, run `make deploy`: {stale}"

    def test_every_target_in_its_modes(self):
        """Each target renders in each of its modes, and every mesh manifest asks for the diagnosis attributes."""
        for target in TARGETS:
            for mode in modes(target):
                files = render(target, RenderOptions(mode=mode, cilium_service="a/b:80"))
                assert files
                if target not in ("k8s", "monitoring"):
                    for text in files.values():
                        assert all(a in text for a in RESPONSE_ATTRIBUTES)
                        assert "failure_mode_allow: true" in text


class TestSampleAttributes:
    def test_only_the_gated_diagnose_filter_asks(self):
        """The request's sample attributes are asked for by gated mode's diagnose filter
        alone, over either transport: it runs on failing responses only; a filter that sees
        every response does not (its request phase has them)."""
        wanted = [a for a, _ in SAMPLE_ATTRIBUTES]

        def asked(mode: RenderMode, transport: str) -> list[list[str]]:
            options = RenderOptions(mode=mode, transport=transport)
            name = f"envoy/{mode}.yaml" if transport == "grpc" else f"envoy/{mode}-{transport}.yaml"
            text = render("envoy", options)[name]
            return [
                f["typed_config"]["response_attributes"] for f in _ext_proc(yaml.safe_load(text))
            ]

        for mode, transport in [(RenderMode.ALWAYS, "grpc"), (RenderMode.ALWAYS, "http")]:
            assert not [a for f in asked(mode, transport) for a in f if a in wanted]
        for transport in ("grpc", "http"):
            gated = asked(RenderMode.GATED, transport)
            assert [f[-len(wanted) :] for f in gated if set(wanted) <= set(f)] == [wanted]


def _ext_proc(tree: object) -> list[dict]:
    """Every ext_proc HTTP filter in a rendered tree, however deep (composite filters)."""
    found: list[dict] = []
    if isinstance(tree, dict):
        config = tree.get("typed_config")
        if isinstance(config, dict) and "response_attributes" in config:
            found.append(tree)
        for value in tree.values():
            found += _ext_proc(value)
    elif isinstance(tree, list):
        for value in tree:
            found += _ext_proc(value)
    return found


class TestTypedEnvoyParts:
    def test_misspelt_field_fails_at_render_time(self):
        """A wrong field name in an Envoy object is a RenderError naming it, not a broken proxy later."""
        with pytest.raises(RenderError, match="failure_mode_alow"):
            typed(HttpFilter, {"name": "x", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
                "failure_mode_alow": True,
            }})  # fmt: skip

    def test_unknown_type_fails_at_render_time(self):
        """An @type that Envoy's API does not have is refused."""
        with pytest.raises(RenderError, match="Nope"):
            typed(
                HttpFilter,
                {"name": "x", "typed_config": {"@type": "type.googleapis.com/envoy.Nope"}},
            )

    def test_always_mode_has_no_matchers(self):
        """Always mode is the plain ext_proc filter: every request reaches the server."""
        text = render("envoy", RenderOptions(mode=RenderMode.ALWAYS))["envoy/always.yaml"]
        assert "ExternalProcessor" in text
        assert "composite" not in text

    def test_unstatable_rule_makes_gated_mode_send_everything(self):
        """A stripping underscore rule cannot be matched by Envoy, so gated mode renders the plain filter."""
        options = RenderOptions(policy=Policy(underscore_headers=Action.STRIP))
        assert "composite" not in render("envoy", options)["envoy/gated.yaml"]

    def test_server_start_up_never_imports_envoy_data_plane(self):
        """`extproc serve`'s import path stays free of envoy-data-plane and pydantic."""
        code = (
            "import sys, extproc.cli, extproc.process; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'envoy_data_plane', 'pydantic', 'betterproto2'}))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == "[]"


class TestOptions:
    @pytest.mark.parametrize(
        ("field", "value", "message"),
        [
            ("namespace", "Bad_NS", "--namespace"),
            ("extproc_address", "nohost", "--extproc-address"),
            ("upstream", "host:99999", "--upstream"),
            ("cilium_service", "my-service:80", "--cilium-service"),
            ("image", "two words", "--image"),
        ],
    )
    def test_bad_option_names_itself(self, field, value, message):
        """A bad option fails with the flag's name."""
        with pytest.raises(RenderError, match=message):
            RenderOptions(**{field: value})


def container_args(options: RenderOptions) -> list[str]:
    pod = render_manifests(options)["deployment.yaml"]["spec"]["template"]["spec"]
    return list(pod["containers"][0]["args"])


class TestServerMtls:
    def test_directory_mtls_requires_client_certificates(self):
        """--extproc-mtls DIR: the server serves the Secret's certificate and requires client
        certificates from the Secret's ca.crt; --extproc-tls-ca alone requires none."""
        args = container_args(RenderOptions(extproc_mtls="/etc/extproc-client"))
        assert args[args.index("--tls-cert") + 1] == "/etc/extproc-doctor-tls/tls.crt"
        assert args[args.index("--client-ca") + 1] == "/etc/extproc-doctor-tls/ca.crt"
        assert "--client-ca" not in container_args(RenderOptions(extproc_tls_ca="/ca.pem"))

    def test_istio_mtls_trusts_the_mesh_root(self):
        """--extproc-mtls istio: client certificates must chain to the root istiod publishes."""
        options = RenderOptions(extproc_mtls="istio")
        pod = render_manifests(options)["deployment.yaml"]["spec"]["template"]["spec"]
        args = container_args(options)
        assert args[args.index("--client-ca") + 1] == "/etc/istio-ca/root-cert.pem"
        assert {"name": "istio-ca", "configMap": {"name": "istio-ca-root-cert"}} in pod["volumes"]

    @pytest.mark.parametrize("target", ["istio", "cilium", "envoy"])
    def test_envoy_presents_the_client_certificate(self, target):
        """Every target's ext_proc cluster presents the directory's certificate and verifies the
        server against its CA."""
        options = RenderOptions(
            mode=RenderMode.ALWAYS, extproc_mtls="/etc/extproc-client/", cilium_service="a/b:80"
        )
        (text,) = render(target, options).values() if target != "cilium" else [
            render(target, options)["cilium/always.yaml"]]  # fmt: skip
        contexts = [
            c["common_tls_context"]
            for c in find(list(yaml.safe_load_all(text)), "common_tls_context", parent=True)
        ]
        assert contexts
        for context in contexts:  # Istio: the sidecars' cluster and the gateways'
            (certificate,) = context["tls_certificates"]
            assert certificate["certificate_chain"]["filename"] == "/etc/extproc-client/tls.crt"
            assert certificate["private_key"]["filename"] == "/etc/extproc-client/tls.key"
            trusted = context["validation_context"]["trusted_ca"]["filename"]
            assert trusted == "/etc/extproc-client/ca.crt"

    def test_istio_cluster_uses_the_proxy_mesh_identity(self):
        """--extproc-mtls istio: the cluster takes istio-agent's `default` certificate and
        `ROOTCA` by SDS over `sds-grpc`, as Istio's own clusters do; nothing is mounted."""
        options = RenderOptions(extproc_mtls="istio")
        contexts = [
            c["common_tls_context"]
            for c in find(render_envoy_filters(options), "common_tls_context", parent=True)
        ]
        assert len(contexts) == 2  # the sidecars' cluster and the gateways'
        for context in contexts:
            (certificate,) = context["tls_certificate_sds_secret_configs"]
            root = context["combined_validation_context"]["validation_context_sds_secret_config"]
            assert (certificate["name"], root["name"]) == ("default", "ROOTCA")
            for secret in (certificate, root):
                (service,) = secret["sds_config"]["api_config_source"]["grpc_services"]
                assert service["envoy_grpc"]["cluster_name"] == "sds-grpc"
            assert "tls_certificates" not in context

    def test_istio_identity_is_refused_where_no_istio_agent_runs(self, capsys):
        """Plain Envoy and cilium-envoy have no Istio SDS: the render says so; `all` skips them."""
        with pytest.raises(RenderError, match="no Istio SDS"):
            render("envoy", RenderOptions(extproc_mtls="istio"))
        files = render_all(RenderOptions(extproc_mtls="istio"))
        assert {path.split("/")[0] for path in files} == {"istio", "k8s", "monitoring"}

    def test_command_skips_targets_without_istio_sds(self, capsys):
        """`render all --extproc-mtls istio` prints the Istio and k8s files and says what it skipped."""
        assert run(["render", "all", "--extproc-mtls", "istio"]) == 0
        out, err = capsys.readouterr()
        assert "kind: EnvoyFilter" in out and "--client-ca" in out
        assert (
            "render envoy: skipped: --extproc-mtls istio: the envoy target's Envoy has no Istio SDS"
            in err
        )
        assert "render cilium: skipped" in err

    @pytest.mark.parametrize(
        ("fields", "message"),
        [
            ({"extproc_mtls": "relative/dir"}, "--extproc-mtls: expected an absolute directory"),
            ({"extproc_mtls": "/"}, "--extproc-mtls: expected an absolute directory"),
            ({"extproc_mtls": "/d", "extproc_tls_ca": "/ca.pem"}, "not both"),
        ],
    )
    def test_bad_mtls_option_names_itself(self, fields, message):
        """A wrong --extproc-mtls is refused with a message that names it."""
        with pytest.raises(RenderError, match=message):
            RenderOptions(**fields)


def find(document: Any, key: str, *, parent: bool = False) -> list[Any]:
    """Every value under `key` anywhere in `document` (with `parent`: the dicts holding it)."""
    found: list[Any] = []
    if isinstance(document, dict):
        if key in document:
            found.append(document if parent else document[key])
        for value in document.values():
            found += find(value, key, parent=parent)
    elif isinstance(document, list):
        for value in document:
            found += find(value, key, parent=parent)
    return found


class TestNetworkPolicy:
    def policy(self) -> dict[str, Any]:
        return render_manifests(RenderOptions())["networkpolicy.yaml"]

    def test_ext_proc_ports_admit_only_istio_proxies(self):
        """gRPC and the HTTP lane admit pods Istio injected (any namespace) and nothing else."""
        spec = self.policy()["spec"]
        assert spec["podSelector"]["matchLabels"] == LABELS
        assert spec["policyTypes"] == ["Ingress"]
        lanes = [
            rule for rule in spec["ingress"] if {p["port"] for p in rule["ports"]} & {50051, 50080}
        ]
        (rule,) = lanes
        assert {p["port"] for p in rule["ports"]} == {50051, 50080}
        (peer,) = rule["from"]
        assert peer["namespaceSelector"] == {}
        assert peer["podSelector"] == {
            "matchExpressions": [{"key": "service.istio.io/canonical-name", "operator": "Exists"}]
        }

    def test_health_port_is_left_to_the_node(self):
        """No rule opens the health port: kubelet probes come from the node, which NetworkPolicy
        admits; metrics are open to any pod (Prometheus)."""
        ports = {p["port"] for rule in self.policy()["spec"]["ingress"] for p in rule["ports"]}
        assert 50052 not in ports
        assert 9090 in ports

    def test_cilium_policy_admits_the_nodes_envoy(self):
        """On Cilium, cilium-envoy (hostNetwork) reaches the ext_proc ports as host or remote-node."""
        policy = render_manifests(RenderOptions())[CILIUM_POLICY_FILE]
        assert policy["kind"] == "CiliumNetworkPolicy"
        (rule,) = policy["spec"]["ingress"]
        assert rule["fromEntities"] == ["host", "remote-node"]
        ports = {p["port"] for p in rule["toPorts"][0]["ports"]}
        assert ports == {"50051", "50080"}


class TestKubernetes:
    @pytest.mark.parametrize("options", VARIANTS, ids=VARIANT_IDS)
    @pytest.mark.parametrize("name", BUILT_IN_KINDS)
    def test_schema_valid(self, name, options):
        """Each Kubernetes object passes the API schema, strictly (no unknown fields), with
        and without TLS."""
        manifest = render_manifests(options)[name]
        kubernetes_validate.validate(manifest, KUBERNETES, strict=True)

    def test_kustomization_lists_every_file(self):
        """The kustomization names every rendered resource file but Cilium's policy (its CRD
        may be absent), and sets the namespace."""
        manifests = render_manifests(RenderOptions(namespace="doctor"))
        kustomization = manifests.pop("kustomization.yaml")
        manifests.pop(CILIUM_POLICY_FILE)
        assert kustomization["resources"] == list(manifests)
        assert kustomization["namespace"] == "doctor"

    def test_the_autoscaler_owns_the_replica_count(self):
        """The Deployment sets no replicas beside the HPA, or every apply would reset the scale."""
        manifests = render_manifests(RenderOptions())
        assert "replicas" not in manifests["deployment.yaml"]["spec"]
        assert manifests["horizontalpodautoscaler.yaml"]["spec"]["minReplicas"] >= 2
        assert manifests["poddisruptionbudget.yaml"]["spec"]["minAvailable"] == 1

    def test_replicas_spread_over_nodes_and_zones(self):
        """Topology spread keeps replicas on different nodes and zones where it can."""
        pod = render_manifests(RenderOptions())["deployment.yaml"]["spec"]["template"]["spec"]
        spread = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
        assert set(spread) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
        for constraint in spread.values():
            assert constraint["labelSelector"]["matchLabels"] == LABELS
            assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"

    def test_pre_stop_outlasts_dns_and_grace_outlasts_both(self):
        """The pod keeps serving while Envoys' DNS may still name it (Kubernetes' Corefile:
        TTL and cache 30 s; Envoy's dns_refresh_rate 5 s), then drains, all within the grace
        period."""
        pod = render_manifests(RenderOptions())["deployment.yaml"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        args = container["args"]
        drain = int(args[args.index("--grace") + 1])
        assert pre_stop >= 30 + 5
        assert pod["terminationGracePeriodSeconds"] > pre_stop + drain

    def test_pod_stays_out_of_the_mesh_by_label(self):
        """Sidecar injection is off by the label (which wins over the annotation), and ambient
        capture by istio.io/dataplane-mode: none."""
        template = render_manifests(RenderOptions())["deployment.yaml"]["spec"]["template"]
        labels = template["metadata"]["labels"]
        assert labels["sidecar.istio.io/inject"] == "false"
        assert labels["istio.io/dataplane-mode"] == "none"

    def test_service_exported_to_its_own_namespace(self):
        """Istio's registry shows the Service to its own namespace only."""
        service = render_manifests(RenderOptions())["service.yaml"]
        assert service["metadata"]["annotations"] == {"networking.istio.io/exportTo": "."}

    def test_workers_have_a_writable_temporary_directory(self):
        """`--workers` writes its metrics files under tempfile's directory (TMPDIR unset: /tmp):
        an emptyDir there, while the root filesystem stays read-only."""
        import inspect

        from extproc import workers

        assert "tempfile.TemporaryDirectory(" in inspect.getsource(workers)
        pod = render_manifests(RenderOptions())["deployment.yaml"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert "env" not in container  # no TMPDIR: tempfile uses /tmp
        (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        volume = next(v for v in pod["volumes"] if v["name"] == tmp["name"])
        assert "sizeLimit" in volume["emptyDir"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True

    def test_deployment_hardening(self):
        """Non-root, read-only root filesystem, requests and limits, gRPC probes on the health port."""
        pod = render_manifests(RenderOptions())["deployment.yaml"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert set(container["resources"]) == {"requests", "limits"}
        assert container["readinessProbe"]["grpc"]["port"] == ports["health"]
        assert container["livenessProbe"]["grpc"]["port"] == ports["health"]
        assert f"0.0.0.0:{ports['health']}" in container["args"]
        assert f"0.0.0.0:{ports['metrics']}" in container["args"]

    def test_live_page_on_loopback_in_the_deployment_only(self):
        """The Deployment serves the live page on the pod's loopback and names its port (for
        kubectl port-forward); no Service or NetworkPolicy opens it."""
        manifests = render_manifests(RenderOptions())
        (container,) = manifests["deployment.yaml"]["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        args = container["args"]
        assert args[args.index("--ui-listen") + 1] == f"127.0.0.1:{ports['ui']}"
        service_ports = [p["port"] for p in manifests["service.yaml"]["spec"]["ports"]]
        assert ports["ui"] not in service_ports
        assert str(ports["ui"]) not in str(manifests["networkpolicy.yaml"])

    def test_tls_to_the_server_mounts_the_secret(self):
        """With --extproc-tls-ca the server serves TLS from the mounted Secret; probes stay plaintext."""
        options = RenderOptions(extproc_tls_ca="/etc/certs/extproc-ca.pem")
        pod = render_manifests(options)["deployment.yaml"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        args = container["args"]
        assert args[args.index("--tls-cert") + 1].endswith("/tls.crt")
        assert args[args.index("--tls-key") + 1].endswith("/tls.key")
        assert {"name": "tls", "secret": {"secretName": "extproc-doctor-tls"}} in pod["volumes"]
        assert "--tls-cert" not in render_manifests(RenderOptions())["deployment.yaml"]["spec"][
            "template"]["spec"]["containers"][0]["args"]  # fmt: skip

    def test_service_is_grpc(self):
        """The Service port is named grpc with appProtocol grpc, so a mesh speaks HTTP/2 to it;
        the HTTP lane's port is named http, appProtocol http (HTTP/1.1)."""
        ports = render_manifests(RenderOptions())["service.yaml"]["spec"]["ports"]
        by_name = {p["name"]: p for p in ports}
        assert set(by_name) == {"grpc", "http"}
        assert by_name["grpc"]["appProtocol"] == "grpc"
        assert (by_name["http"]["port"], by_name["http"]["appProtocol"]) == (50080, "http")

    def test_configmap_carries_the_policy_file(self, tmp_path):
        """A policy file given to render lands verbatim in the ConfigMap, and parses back."""
        from extproc.config import load_policy

        policy_file = tmp_path / "policy.yaml"
        policy_file.write_text("# ours\nmode: report\n")
        options = RenderOptions(
            policy=load_policy(policy_file), policy_text=policy_file.read_text()
        )
        data = render_manifests(options)["configmap.yaml"]["data"]["policy.yaml"]
        assert data == "# ours\nmode: report\n"

    def test_default_configmap_is_the_built_in_policy(self):
        """Without a policy file the ConfigMap spells out the built-in defaults."""
        from extproc.config import policy_from_mapping

        text = render_manifests(RenderOptions())["configmap.yaml"]["data"]["policy.yaml"]
        assert policy_from_mapping(yaml.safe_load(text)) == Policy(source="<policy>")


def run(argv: list[str]) -> int:
    """The command as `extproc` runs it, minus main()'s logging set-up (global, and render logs nothing)."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


class TestCommand:
    def test_prints_yaml_documents(self, capsys):
        """`extproc render istio` prints the EnvoyFilters (sidecars', gateways') as YAML."""
        assert run(["render", "istio", "--mode", "always"]) == 0
        docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
        assert [d["kind"] for d in docs] == ["EnvoyFilter", "EnvoyFilter"]

    def test_clusterwide_variant(self, capsys):
        """--clusterwide prints the CiliumClusterwideEnvoyConfig."""
        assert run(["render", "cilium", "--clusterwide", "--cilium-service", "a/b:80"]) == 0
        (doc,) = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
        assert doc["kind"] == "CiliumClusterwideEnvoyConfig"

    def test_output_dir_writes_the_deploy_layout(self, tmp_path):
        """--output-dir writes every mode's files in the layout of deploy/."""
        assert run(["render", "all", "--output-dir", str(tmp_path)]) == 0
        written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
        assert written == sorted(render_all(RenderOptions()))

    def test_gated_note_on_stderr(self, capsys):
        """When gated mode cannot gate a rule, render says so on stderr."""
        assert run(["render", "envoy"]) == 0
        assert "underscore_headers only reports" in capsys.readouterr().err

    def test_cilium_defaults_to_always(self, capsys):
        """`render cilium` without --mode renders always mode, the only one cilium-envoy supports."""
        assert run(["render", "cilium", "--cilium-service", "a/b:80"]) == 0
        (doc,) = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
        assert "composite" not in yaml.safe_dump(doc)
        assert "ExternalProcessor" in yaml.safe_dump(doc)

    def test_cilium_gated_is_refused(self, capsys):
        """`render cilium --mode gated` exits 2 saying why (no composite filter) and what to use."""
        assert run(["render", "cilium", "--mode", "gated", "--cilium-service", "a/b:80"]) == 2
        err = capsys.readouterr().err
        assert "envoy.filters.http.composite" in err
        assert "--mode always" in err

    def test_cilium_needs_its_service(self, capsys):
        """`render cilium` without --cilium-service exits 2 and says what to give, not a placeholder."""
        assert run(["render", "cilium"]) == 2
        assert "--cilium-service is required" in capsys.readouterr().err

    def test_all_without_service_skips_cilium(self, capsys):
        """`render all` without --cilium-service prints the other targets and says why cilium is not."""
        assert run(["render", "all", "--mode", "always"]) == 0
        out = capsys.readouterr()
        kinds = {d["kind"] for d in yaml.safe_load_all(out.out) if d and "kind" in d}
        assert "EnvoyFilter" in kinds and "CiliumEnvoyConfig" not in kinds
        assert "needs --cilium-service" in out.err

    def test_istio_scope_flags(self, capsys):
        """The --istio-* flags scope the EnvoyFilters: namespace, sidecar selector, priority, one kind."""
        argv = ["render", "istio", "--istio-namespace", "shop", "--istio-selector", "app=cart"]
        assert run([*argv, "--istio-only", "sidecars", "--istio-priority", "10"]) == 0
        (doc,) = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
        assert doc["metadata"]["namespace"] == "shop"
        assert doc["spec"]["workloadSelector"] == {"labels": {"app": "cart"}}
        assert doc["spec"]["priority"] == 10

    @pytest.mark.parametrize(
        ("flag", "value"),
        [
            ("--istio-selector", "app"),
            ("--istio-selector", "app=has space"),
            ("--istio-selector", f"app={'v' * 64}"),
            ("--istio-gateway-selector", "=x"),
            ("--istio-proxy-version", "1" * 1025),
            ("--istio-namespace", "Bad_NS"),
            ("--istio-proxy-version", "(unclosed"),
            ("--istio-priority", str(2**31)),
        ],
    )
    def test_bad_istio_flag_exits_2(self, capsys, flag, value):
        """A bad --istio-* value exits 2 and names the flag."""
        assert run(["render", "istio", flag, value]) == 2
        assert flag in capsys.readouterr().err

    def test_all_gated_skips_cilium(self, capsys):
        """`render all --mode gated` prints the other targets and says cilium was skipped."""
        assert run(["render", "all", "--mode", "gated"]) == 0
        out = capsys.readouterr()
        kinds = {d["kind"] for d in yaml.safe_load_all(out.out) if d and "kind" in d}
        assert "EnvoyFilter" in kinds
        assert not kinds & {"CiliumEnvoyConfig", "CiliumClusterwideEnvoyConfig"}
        assert "extproc render cilium: skipped" in out.err

    def test_direction_option_reaches_the_envoy_filter(self, capsys):
        """`render envoy --direction inbound` puts inbound in the filter's stream metadata."""
        assert run(["render", "envoy", "--mode", "always", "--direction", "inbound"]) == 0
        (doc,) = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
        assert directions_in(doc) == {"inbound"}

    def test_bad_option_exits_2(self, capsys):
        """A bad option exits 2 and names the flag."""
        assert run(["render", "k8s", "--namespace", "NO"]) == 2
        assert "--namespace" in capsys.readouterr().err


class TestIstioPlacement:
    @pytest.mark.parametrize("mode", list(RenderMode))
    def test_first_on_outbound_and_gateway_before_router_inbound(self, mode):
        """Outbound and gateway filters go first, ahead of Istio's metadata exchange; inbound ones before the router."""
        placement = {
            (patch["match"]["context"], patch["patch"]["operation"])
            for envoy_filter in render_envoy_filters(RenderOptions(mode=mode))
            for patch in envoy_filter["spec"]["configPatches"]
            if patch["applyTo"] == "HTTP_FILTER"
        }
        assert placement == {
            ("SIDECAR_OUTBOUND", "INSERT_FIRST"),
            ("GATEWAY", "INSERT_FIRST"),
            ("SIDECAR_INBOUND", "INSERT_BEFORE"),
        }


def directions_in(document: object) -> set[str]:
    """The `x-extproc-direction` values of every ext_proc filter in a document."""
    found: set[str] = set()
    if isinstance(document, dict):
        if "grpc_service" in document:
            metadata = document["grpc_service"].get("initial_metadata", [])
            found |= {m["value"] for m in metadata if m["key"] == DIRECTION_METADATA}
            assert metadata, "an ext_proc filter without a direction"
        for value in document.values():
            found |= directions_in(value)
    elif isinstance(document, list):
        for value in document:
            found |= directions_in(value)
    return found


class TestDirection:
    @pytest.mark.parametrize("mode", list(RenderMode))
    def test_istio_context_says_where_it_sits(self, mode):
        """Each EnvoyFilter context's filters carry their direction: the gateway is the edge."""
        by_context: dict[str, set[str]] = {}
        patches = [
            p
            for ef in render_envoy_filters(RenderOptions(mode=mode))
            for p in ef["spec"]["configPatches"]
        ]
        for patch in patches:
            if patch["applyTo"] == "HTTP_FILTER":
                context = patch["match"]["context"]
                by_context.setdefault(context, set()).update(directions_in(patch["patch"]["value"]))
        assert by_context == {
            "GATEWAY": {"edge"},
            "SIDECAR_OUTBOUND": {"outbound"},
            "SIDECAR_INBOUND": {"inbound"},
        }

    def test_cilium_is_the_edge_unless_declared_in_cluster(self):
        """A CEC's filter is the edge by default (a Service may be reachable from outside);
        --cilium-direction outbound declares in-cluster clients only."""
        default = RenderOptions(mode=RenderMode.ALWAYS, cilium_service="a/b:80")
        inside = RenderOptions(
            mode=RenderMode.ALWAYS, cilium_direction=Direction.OUTBOUND, cilium_service="a/b:80"
        )
        assert directions_in(cilium.render_envoy_config(default, clusterwide=False)) == {"edge"}
        assert directions_in(cilium.render_envoy_config(inside, clusterwide=False)) == {"outbound"}

    def test_cilium_has_no_inbound_place(self):
        """--cilium-direction inbound is refused: no sidecar's inbound side is in front of a Service."""
        with pytest.raises(RenderError, match="--cilium-direction"):
            RenderOptions(cilium_direction=Direction.INBOUND)

    def test_plain_envoy_defaults_to_edge(self):
        """The standalone bootstrap is the edge unless told otherwise."""
        for mode in RenderMode:
            text = render("envoy", RenderOptions(mode=mode))[f"envoy/{mode}.yaml"]
            assert directions_in(yaml.safe_load(text)) == {"edge"}

    def test_auto_is_not_a_rendered_direction(self):
        """--direction auto is refused: the manifest must say where the filter sits."""
        with pytest.raises(RenderError, match="--direction"):
            RenderOptions(direction=Direction.AUTO)


class TestCiliumNames:
    def test_every_resource_is_unique_to_its_cec(self):
        """Two Services' CECs share no resource name once Cilium has qualified them."""
        from .placement import cilium_bootstrap

        def names(service: str, clusterwide: bool) -> set[str]:
            options = RenderOptions(mode=RenderMode.ALWAYS, cilium_service=service)
            resources = cilium_bootstrap(
                cilium.render_envoy_config(options, clusterwide=clusterwide)
            )
            static = resources["static_resources"]
            return {r["name"] for r in static["listeners"] + static["clusters"]} - {
                "xds-grpc-cilium"
            }

        for clusterwide in (False, True):
            first = names("default/a:80", clusterwide)
            second = names("default/b:80", clusterwide)
            assert first & second == set()

    def test_filter_refers_to_its_own_cluster(self):
        """The ext_proc filter names the server cluster this CEC defines, as Cilium leaves it."""
        from .placement import cilium_bootstrap, qualified

        options = RenderOptions(mode=RenderMode.ALWAYS, cilium_service="shop/cart:8080")
        config = cilium.render_envoy_config(options, clusterwide=False)
        bootstrap = cilium_bootstrap(config)
        clusters = {c["name"] for c in bootstrap["static_resources"]["clusters"]}
        server = cilium.extproc_cluster_name(options, clusterwide=False)
        assert server == "shop/extproc-doctor-cart/extproc-doctor"
        assert qualified("shop", config["metadata"]["name"], server) == server
        assert server in clusters
        assert f"cluster_name: {server}" in yaml.safe_dump(config)
