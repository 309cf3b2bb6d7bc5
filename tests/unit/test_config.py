"""The policy file: parsed once, validated in full, errors that say where."""

from __future__ import annotations

import pytest

from extproc.config import (
    MAX_POLICY_BYTES,
    Action,
    Direction,
    Mode,
    Policy,
    PolicyError,
    load_policy,
    policy_from_mapping,
)


def write(tmp_path, text: str, name: str = "policy.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


class TestDefaults:
    def test_empty_file_is_the_default_policy(self, tmp_path):
        """An empty policy file gives the built-in defaults."""
        policy = load_policy(write(tmp_path, ""))
        assert policy == Policy(source=str(tmp_path / "policy.yaml"))

    def test_defaults_are_safe(self):
        """Defaults enforce, strip echoes and edge forwarding headers, and only report underscores."""
        policy = Policy()
        assert policy.mode is Mode.ENFORCE
        assert policy.echoed_envoy_headers is Action.STRIP
        assert policy.forwarding_headers is Action.STRIP
        assert policy.underscore_headers is Action.REPORT
        assert policy.direction is Direction.AUTO
        assert dict(policy.host_rewrites) == {}


class TestFullPolicy:
    def test_every_key(self, tmp_path):
        """Every documented key is read into the frozen policy."""
        path = write(
            tmp_path,
            """
mode: report
host_rewrites:
  Shop.Example.com: shop.default.svc.cluster.local:8080
strip_host_port: true
echoed_envoy_headers: keep
forwarding_headers: report
underscore_headers: rewrite
direction: outbound
trusted_hops: 2
""",
        )
        policy = load_policy(path)
        assert policy.mode is Mode.REPORT
        assert dict(policy.host_rewrites) == {
            "shop.example.com": "shop.default.svc.cluster.local:8080"
        }
        assert policy.strip_host_port is True
        assert policy.echoed_envoy_headers is Action.KEEP
        assert policy.forwarding_headers is Action.REPORT
        assert policy.underscore_headers is Action.REWRITE
        assert policy.direction is Direction.OUTBOUND
        assert policy.trusted_hops == 2

    def test_policy_is_frozen(self):
        """The policy cannot change under a running server."""
        policy = Policy()
        with pytest.raises(AttributeError):
            policy.mode = Mode.REPORT  # type: ignore[misc]
        with pytest.raises(TypeError):
            policy.host_rewrites["a"] = "b"  # type: ignore[index]

    def test_example_policy_in_the_repo_is_valid(self):
        """The example policy shipped with the project loads."""
        policy = load_policy("examples/policy.yaml")
        assert policy.host_rewrites


class TestErrors:
    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("mode: enforce\nmodes: report\n", "policy.yaml:2: unknown key 'modes'"),
            (
                "mode: strict\n",
                "policy.yaml:1: mode: expected one of enforce, report, got 'strict'",
            ),
            ("strip_host_port: yes please\n", "strip_host_port: expected true or false"),
            ("echoed_envoy_headers: rewrite\n", "expected one of keep, report, strip"),
            (
                "host_rewrites: [a, b]\n",
                "host_rewrites: expected a map from Host to authority, got list",
            ),
            ("host_rewrites:\n  a.example:80: b\n", "is not a host name (give it without a port"),
            ("host_rewrites:\n  a.example: 'b c'\n", "'b c' is not an authority"),
            ("host_rewrites:\n  a.example: 'b\\r\\nx: y'\n", "is not an authority"),
            ("host_rewrites:\n  A.example: b\n  a.example: c\n", "listed twice"),
            ("- mode\n", "expected a map of policy keys at the top level, got list"),
            ("mode: [\n", "policy.yaml:2: not valid YAML"),
            ("trusted_hops: -1\n", "trusted_hops: expected a whole number from 0 to 16"),
            ("trusted_hops: 17\n", "trusted_hops: expected a whole number from 0 to 16"),
            ("trusted_hops: true\n", "trusted_hops: expected a whole number from 0 to 16"),
            ("trusted_hops: '1'\n", "trusted_hops: expected a whole number from 0 to 16"),
        ],
    )
    def test_message_names_file_line_and_key(self, tmp_path, text, message):
        """A broken policy is refused with the file, the line where known, the key and what was expected."""
        with pytest.raises(PolicyError) as err:
            load_policy(write(tmp_path, text))
        assert message in str(err.value)
        assert str(tmp_path / "policy.yaml") in str(err.value)

    def test_missing_file(self, tmp_path):
        """A missing file names itself."""
        with pytest.raises(PolicyError, match="cannot read the policy file"):
            load_policy(tmp_path / "nope.yaml")

    def test_not_utf8(self, tmp_path):
        """A file that is not UTF-8 is refused, not half-read."""
        path = tmp_path / "p.yaml"
        path.write_bytes(b"mode: \xff\n")
        with pytest.raises(PolicyError, match="not UTF-8"):
            load_policy(path)

    def test_mapping_without_file(self):
        """policy_from_mapping names the source it was given."""
        with pytest.raises(PolicyError, match=r"^inline: unknown key 'x'"):
            policy_from_mapping({"x": 1}, source="inline")


class TestPolicyFileSize:
    def test_a_file_over_the_cap_is_refused_before_it_is_parsed(self, tmp_path):
        """A policy file larger than MAX_POLICY_BYTES (a wrong mount) gets an error naming the cap."""
        path = write(tmp_path, "# padding\n" * (MAX_POLICY_BYTES // 10 + 1) + "mode: report\n")
        with pytest.raises(PolicyError, match=f"larger than {MAX_POLICY_BYTES} bytes"):
            load_policy(path)

    def test_a_file_at_the_cap_is_read(self, tmp_path):
        """Up to the cap the file is read as before."""
        body = "mode: report\n"
        path = write(tmp_path, body + "#" * (MAX_POLICY_BYTES - len(body) - 1) + "\n")
        assert load_policy(path).mode is Mode.REPORT


class TestServeArguments:
    def parse(self, *argv: str):
        from extproc.cli import build_parser, serve_config

        return serve_config(build_parser().parse_args(["serve", *argv]))

    def test_workers_need_a_fixed_port(self):
        """--workers with port 0 is refused: each worker would bind a different port."""
        from extproc.cli import ConfigError

        with pytest.raises(ConfigError, match="--workers needs a fixed port"):
            self.parse("--listen", "127.0.0.1:0", "--workers", "2")

    def test_tls_key_without_cert(self):
        """--tls-key alone is refused with the flags named."""
        from extproc.cli import ConfigError

        with pytest.raises(ConfigError, match="--tls-cert and --tls-key go together"):
            self.parse("--tls-key", "k.pem")

    def test_unix_socket_per_worker(self):
        """On a Unix socket each worker gets its own path; on TCP they share the address."""
        from extproc.workers import worker_listen

        assert self.parse("--listen", "unix:/run/x.sock", "--workers", "2").workers == 2
        assert worker_listen("unix:/run/x.sock", 1, 2) == "unix:/run/x.sock.1"
        assert worker_listen("unix:/run/x.sock", 0, 1) == "unix:/run/x.sock"
        assert worker_listen("0.0.0.0:50051", 1, 2) == "0.0.0.0:50051"
