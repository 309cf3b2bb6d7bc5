"""The command line a new user meets: --version, examples in every --help, and render
options refused where they do not apply (never silently ignored)."""

from __future__ import annotations

import argparse
import shlex
from importlib.metadata import version

import pytest
import yaml

from extproc.cli import RENDER_OPTION_TARGETS, build_parser, main

TARGETS = ("istio", "cilium", "envoy", "k8s", "monitoring")
# Each render option with a value that differs from its default, so that a target the
# option applies to renders something else with it (an option that changes nothing where
# the table says it applies would be a wrong row).
SAMPLES: dict[str, list[str]] = {
    "--mode": ["--mode", "always"],
    "--config": ["--config", "POLICY"],
    "--namespace": ["--namespace", "doctor"],
    "--image": ["--image", "registry.example.com/doctor:9"],
    "--extproc-address": ["--extproc-address", "10.0.0.1:7000"],
    "--extproc-tls-ca": ["--extproc-tls-ca", "/etc/doctor/ca.pem"],
    "--extproc-mtls": ["--extproc-mtls", "/etc/doctor-mtls"],
    "--transport": ["--transport", "http"],
    "--cilium-service": ["--cilium-service", "shop/cart:8080"],
    "--cilium-direction": ["--cilium-direction", "outbound"],
    "--clusterwide": ["--clusterwide"],
    "--istio-root-namespace": ["--istio-root-namespace", "mesh-root"],
    "--istio-namespace": ["--istio-namespace", "shop"],
    "--istio-selector": ["--istio-selector", "app=cart"],
    "--istio-gateway-selector": ["--istio-gateway-selector", "istio=edge"],
    "--istio-only": ["--istio-only", "sidecars"],
    "--istio-priority": ["--istio-priority", "7"],
    "--istio-proxy-version": ["--istio-proxy-version", "^1\\.2[0-9].*"],
    "--envoy-listen": ["--envoy-listen", "127.0.0.1:10001"],
    "--upstream": ["--upstream", "10.0.0.2:9090"],
    "--direction": ["--direction", "inbound"],
    "--runbook-url": ["--runbook-url", "https://wiki.example/doctor"],
    "--tracing-zipkin": ["--tracing-zipkin", "127.0.0.1:9411"],
    "--tracing-otlp": ["--tracing-otlp", "127.0.0.1:4317"],
    "--no-trace-tags": ["--no-trace-tags"],
}
# cilium renders always mode only, its default: --mode always is accepted and changes nothing.
# The plain Envoy traces only with --tracing-*: alone, --no-trace-tags has no tags to leave
# out there (tests/deploy/test_traces_e2e.py renders it with a tracer).
SAME_AS_DEFAULT = {("--mode", "cilium"), ("--no-trace-tags", "envoy")}
# Each target rendered with no option, once per run.
BASELINE: dict[str, str] = {}


def render_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    return parser._subparsers._group_actions[0].choices["render"]  # argparse keeps them here


def run(argv: list[str]) -> int:
    """The command as `extproc` runs it, minus main()'s logging set-up."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


def rendered(capsys, target: str, extra: list[str]) -> str:
    """What `extproc render TARGET` prints with `extra` (cilium always gets a Service)."""
    base = ["--cilium-service", "default/web:80"] if target == "cilium" else []
    if "--cilium-service" in extra:
        base = []
    assert run(["render", target, *base, *extra]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


class TestVersion:
    def test_prints_the_installed_version(self, capsys):
        """`extproc --version` prints the package's version from its metadata and exits 0."""
        with pytest.raises(SystemExit) as exit_:
            main(["--version"])
        assert exit_.value.code == 0
        assert capsys.readouterr().out.strip() == f"extproc {version('extproc-doctor')}"


class TestHelp:
    @pytest.mark.parametrize("command", [[], ["serve"], ["diagnose"], ["demo"], ["render"]])
    def test_every_help_ends_with_examples_that_parse(self, capsys, command):
        """Each --help shows example command lines, and each one parses as written."""
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        text = capsys.readouterr().out
        examples = text.split("examples:\n", 1)[1].strip().splitlines()
        assert examples
        for line in examples:
            # The `extproc ...` part of a shell line: before a redirect or after a pipe.
            words = shlex.split(line.split(" | ")[-1].split(" > ")[0])
            assert words[0] == "extproc"
            if words[1:] != ["COMMAND", "--help"]:
                build_parser().parse_args(words[1:])


class TestRenderOptionTable:
    def test_every_option_is_classified(self):
        """Every render option is in the table, so a new one must say which targets it serves."""
        flags = {
            action.option_strings[-1]
            for action in render_parser()._actions
            if action.option_strings and action.help != argparse.SUPPRESS
        }
        assert flags - {"--help", "--output-dir"} == {f for f, _ in RENDER_OPTION_TARGETS.values()}
        assert set(SAMPLES) == {f for f, _ in RENDER_OPTION_TARGETS.values()}

    @pytest.mark.parametrize(
        ("flag", "target"),
        [
            (flag, target)
            for flag, targets in RENDER_OPTION_TARGETS.values()
            for target in TARGETS
            if target not in targets
        ],
    )
    def test_foreign_option_is_refused(self, capsys, flag, target):
        """An option given to a target it does not apply to exits 2 naming the option and
        where it applies, and prints no manifest."""
        argv = ["render", target, *SAMPLES[flag]]
        assert run(argv) == 2
        out = capsys.readouterr()
        assert out.out == ""
        assert f"{flag} does not apply to render {target}" in out.err

    @pytest.mark.parametrize(
        ("flag", "target"),
        [
            (flag, target)
            for flag, targets in RENDER_OPTION_TARGETS.values()
            for target in targets
            if (flag, target) not in SAME_AS_DEFAULT
        ],
    )
    def test_option_changes_what_its_targets_render(self, capsys, tmp_path, flag, target):
        """Where the table says an option applies, it changes the rendered manifests."""
        policy = tmp_path / "policy.yaml"
        policy.write_text("mode: report\nhost_rewrites: {shop.example: web.default.svc}\n")
        extra = [str(policy) if word == "POLICY" else word for word in SAMPLES[flag]]
        if target not in BASELINE:
            BASELINE[target] = rendered(capsys, target, [])
        without = BASELINE[target]
        with_option = rendered(capsys, target, extra)
        assert [d for d in yaml.safe_load_all(with_option)] != [
            d for d in yaml.safe_load_all(without)
        ]

    def test_all_takes_every_option(self, capsys):
        """`render all` takes options of several targets at once: each reaches its own."""
        argv = ["render", "all", "--mode", "always", "--upstream", "10.0.0.2:9090"]
        assert run([*argv, "--istio-namespace", "shop", "--image", "r.example/d:1"]) == 0
        out = capsys.readouterr().out
        assert "10.0.0.2" in out and "namespace: shop" in out and "r.example/d:1" in out
