"""Bounded work per message: every regular expression in the package, and a whole hostile
message through either adapter, cost time linear in the input.

Patterns are found, not listed: every module of `extproc` is imported and every compiled
pattern it holds at module level (alone, or in a tuple, list or dict) is collected. Each
must have adversarial inputs below, built to make a backtracking engine work hardest:
near-matches repeated with their terminator missing, runs that a bounded repeat almost
accepts, and a tail (`\\n"!`) that defeats any `$` at the end. A new pattern without
inputs fails `test_every_pattern_has_adversarial_inputs`, so none slips past.

Cost is compared between sizes n and 8n in the same run (tests/cost.py): about 8x is
linear, 64x quadratic; no absolute time is asserted. tests/unit/test_accesslog.py's
`TestLinearTime` checks something else, by structure: that the scanner's patterns bound
every repetition, so a match attempt costs a constant per position.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from google.protobuf import json_format

import extproc
from extproc import accesslog as accesslog_pkg
from extproc import annotate, authority, core, diagnosis
from extproc.accesslog import read_text, scan
from extproc.config import policy_from_mapping
from extproc.http_lane import HttpProcessor
from extproc.render import options
from extproc.server import StreamState, handle
from tests.conftest import request_headers, response_headers
from tests.cost import LINEAR_RATIO, growth

TAIL = '\n"!'

# Per pattern: the units whose repetition is hardest for it (see the module docstring).
ADVERSARIAL: dict[re.Pattern[str], tuple[str, ...]] = {
    accesslog_pkg._PREFIX: ("[pod/a", "2026-01-01T1:1", "2026-01-01T11+11 stdout "),
    scan._TIME: ("2026-01-01T00:00:0", "1111-11-11 11:11:11.1+1"),
    scan._STATUS_PATTERNS[0]: ("status = '", "code:'1"),
    scan._STATUS_PATTERNS[1]: ('HTTP/1.1" ', "HTTP/1"),
    scan._STATUS_PATTERNS[2]: (" 503 AB,AB,AB,AB,AB,AB,AB,AB,AB,", " 503  "),
    scan._TCP_STATUS: ('"- - -" ', '"- - -"   1'),
    scan._FLAGS_PATTERNS[0]: ("flags=", "flags='A,"),
    scan._FLAGS_PATTERNS[1]: ("503 AAAA,AAAA|", "111 A"),
    scan._FLAG_TOKEN: ("AB,", "ABCDEF,"),
    scan._DETAILS_PATTERNS[0]: ("code_details=a_{aaaa", "code_details: a"),
    scan._DETAILS_PATTERNS[1]: ("upstream_reset_before_response_started{a", "route_not_foun"),
    scan._DETAILS_PATTERNS[2]: ("rbac_access_denied_matched_policy[a",),
    scan._TFR_PATTERNS[0]: ("transport_failure_reason=aaaa ", "transport_failure_reason: a a"),
    scan._TFR_PATTERNS[1]: ("transport failure reason: ",),
    scan._TFR_PATTERNS[2]: ("TLS_error:OPENSSL_internal", "TLS_error:a "),
    scan._TFR_PATTERNS[3]: ("delayed connect error: aaaa", "immediate_connect_error:a"),
    scan._CLUSTER_PATTERNS[0]: ("outbound|1|a|", "inbound||"),
    scan._CLUSTER_PATTERNS[1]: ("InboundPassthroughClusterIpv", "BlackHoleCluste"),
    scan._CLUSTER_PATTERNS[2]: ("cluster=a", "upstream_cluster: '"),
    scan._ROUTE: ("route:", "route_name='a"),
    scan._HOST_PATTERNS[0]: ("host='", ":authority=a"),
    scan._LABELLED_FLAGS: ("response_flags=", "response_flag:'A,"),
    scan._REQUEST_LINE_FLAGS: ('HTTP/1.1" 503 AB,', "HTTP/1.1 503 "),
    scan._DOCTOR: (
        "x-extproc-diagnosis: a",
        '{"reason": "aaa", "hint": "a',
        '{"hint":"a",',
        '{"a":"b",',
        '{"hint":"a","reason":"',
    ),
    scan._HOST_PATTERNS[1]: ("> Host: a\n", "> Host:"),
    scan._UPSTREAM_HOST: ("upstream_host=a", "upstream_address:"),
    scan._SERVICE_TIME: ("upstream_service_time=1", "x-envoy-upstream-service-time: nul"),
    scan._GRPC_STATUS: ("grpc-status=", "grpc_status: '1"),
    scan._GRPC_ERROR: ("rpc error: code = Unavailable ", "14 UNAVAILABLE", "UNAVAILABLE: upstrea"),
    scan._DR: ('dr=\\"a', "/destination-rule/a"),
    scan._DR_NS: ("/namespaces/aaa/destination-rule", "/namespaces/a/destination-rule/"),
    scan._RESET_BODY: (
        "upstream connect error or disconnect/reset before headers. reset reason: a",
        "upstream connect error or disconnect/reset before headers",
    ),
    scan._BODY_DETAILS[0][0]: ("no healthy upstrea",),
    scan._BODY_DETAILS[1][0]: ("upstream request timeou",),
    scan._BODY_DETAILS[2][0]: ("RBAC: access denie",),
    scan._BODY_DETAILS[3][0]: ("fault filter abor",),
    annotate._TOKEN: ("A", "a:/"),
    annotate._KEY: ("a", "a*."),
    annotate._PLAIN_TEXT: (" ", "a~"),
    authority._NAME: ("a.", "a-", "a" * 62 + "-."),
    authority._PORT: ("1",),
    authority._SIMPLE: ("a.", "a-", "a:1"),
    diagnosis._ISTIO_POLICY: (
        "rbac_access_denied_matched_policy[ns[a]-policy[a",
        "rbac_access_denied_matched_policy[ns[",
    ),
    diagnosis._DESTINATION_RULE: ("/destination-rule/a", "/destination-rule/"),
    diagnosis._DESTINATION_RULE_NS: ("/namespaces/a", "/namespaces/a/destination-rule"),
    options._LABEL: ("a-", "a"),
    options._LABEL_NAME: ("a-", "a."),
    options._LABEL_PREFIX: ("a-", "a."),
}


def _patterns_in(value: object, name: str, depth: int = 0) -> Iterator[tuple[str, re.Pattern[str]]]:
    if isinstance(value, re.Pattern):
        yield name, value
    elif depth < 3 and isinstance(value, tuple | list | set | frozenset):
        for i, item in enumerate(value):
            yield from _patterns_in(item, f"{name}[{i}]", depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for key, item in value.items():
            yield from _patterns_in(item, f"{name}[{key!r}]", depth + 1)


def package_patterns() -> dict[re.Pattern[str], str]:
    """Every compiled pattern held at module level anywhere in `extproc`, with a name."""
    found: dict[re.Pattern[str], str] = {}
    modules = pkgutil.walk_packages(extproc.__path__, "extproc.")
    for info in sorted(modules, key=lambda m: m.name):
        if info.name.endswith("__main__"):  # runs the CLI when imported
            continue
        module = importlib.import_module(info.name)
        for attr, value in sorted(vars(module).items()):
            for name, pattern in _patterns_in(value, f"{info.name}.{attr}"):
                found.setdefault(pattern, name)
    return found


PATTERNS = package_patterns()


def _search_all(pattern: re.Pattern[str]) -> Callable[[str], object]:
    """Every way the package uses a pattern: searching (all matches) and a full match."""
    return lambda text: (sum(1 for _ in pattern.finditer(text)), pattern.fullmatch(text))


class TestEveryPatternIsCovered:
    def test_every_pattern_has_adversarial_inputs(self) -> None:
        """No compiled pattern in the package lacks adversarial inputs here."""
        missing = sorted(name for pattern, name in PATTERNS.items() if pattern not in ADVERSARIAL)
        assert not missing, f"add adversarial inputs to ADVERSARIAL for {missing}"

    def test_discovery_sees_every_module(self) -> None:
        """Discovery finds the patterns of the scanner, the authority parser and annotate."""
        assert set(scan.PATTERNS) <= set(PATTERNS)
        assert {authority._SIMPLE, annotate._TOKEN, diagnosis._DESTINATION_RULE} <= set(PATTERNS)

    def test_no_stale_inputs(self) -> None:
        """Every pattern with inputs here is still in the package."""
        assert set(ADVERSARIAL) <= set(PATTERNS)


CASES = [
    pytest.param(pattern, unit, id=f"{name}:{unit[:24]!r}")
    for pattern, name in PATTERNS.items()
    for unit in ADVERSARIAL.get(pattern, ())
]


class TestEveryPatternIsLinear:
    @pytest.mark.parametrize(("pattern", "unit"), CASES)
    def test_cost_grows_linearly(self, pattern: re.Pattern[str], unit: str) -> None:
        """Searching 8x the adversarial text costs about 8x, not 64x."""
        n, ratio = growth(_search_all(pattern), lambda n: unit * (n // len(unit) + 1) + TAIL)
        assert ratio < LINEAR_RATIO, f"{ratio:.1f}x for 8x the input at n={n}"


# Transport failure reasons that made the old `_TLS_PARTS` regex quadratic: marks with
# library and function but no end, on a line that a newline ends before the text does.
HOSTILE_TFR = ("TLS_error:a:b:c ", "TLS error:|1:a:b:", "TLS_error:|TLS_error:|")


class TestTlsReason:
    @pytest.mark.parametrize("unit", HOSTILE_TFR)
    def test_tls_reason_is_linear(self, unit: str) -> None:
        """The TLS reason parser costs linear time on repeated marks with no end."""
        n, ratio = growth(diagnosis.tls_reason, lambda n: unit * (n // len(unit)) + TAIL)
        assert ratio < LINEAR_RATIO, f"{ratio:.1f}x for 8x the input at n={n}"

    @pytest.mark.parametrize("unit", HOSTILE_TFR)
    def test_diagnose_line_is_linear(self, unit: str) -> None:
        """`extproc diagnose` reads a hostile Istio JSON line (a JSON string may hold a
        newline) in linear time: format, scan and classification."""

        def line(n: int) -> str:
            tfr = unit * (n // len(unit)) + TAIL
            fields = {"response_code": 503, "response_flags": "UF",
                      "response_code_details": "upstream_reset_before_response_started{" + tfr,
                      "upstream_transport_failure_reason": tfr}  # fmt: skip
            return json.dumps(fields)

        n, ratio = growth(lambda text: diagnosis.classify(read_text(text).evidence), line)
        assert ratio < LINEAR_RATIO, f"{ratio:.1f}x for 8x the input at n={n}"


POLICY = policy_from_mapping({"response_annotations": "on"})


def hostile_attributes(size: int) -> dict[str, object]:
    """Every text attribute the core reads, each about `size` characters of near-matches."""

    def fill(unit: str, tail: str = TAIL) -> str:
        return unit * (size // len(unit)) + tail

    return {
        "response.code": 503,
        "response.flags": 32,
        "response.code_details": "upstream_reset_before_response_started{"
        + fill("TLS_error:a:b:c "),
        "upstream.transport_failure_reason": fill("TLS_error:a:b:c "),
        "xds.cluster_name": fill("outbound|1|a|"),
        "upstream.address": fill("[::1]:"),
        "xds.route_name": fill("route="),
        "xds.cluster_metadata": fill("/namespaces/a", "/destination-rule/"),
        "request.host": fill("a."),
    }


def _grpc(size: int) -> Callable[[], object]:
    message = response_headers([(":status", "503")], hostile_attributes(size))
    return lambda: handle(POLICY, message, StreamState())


def _http(size: int) -> Callable[[], object]:
    message = response_headers([(":status", "503")], hostile_attributes(size))
    body = json_format.MessageToJson(message, preserving_proto_field_name=True).encode()
    processor = HttpProcessor(POLICY)
    return lambda: processor.answer(body)


class TestWholeMessage:
    """A whole hostile ProcessingRequest through the core, by either adapter."""

    @pytest.mark.parametrize("adapter", [_grpc, _http], ids=["grpc", "http"])
    def test_hostile_message_cost_is_linear(
        self, adapter: Callable[[int], Callable[[], object]]
    ) -> None:
        """A response_headers message of 8x the hostile attributes costs about 8x, not 64x."""
        n, ratio = growth(lambda run: run(), adapter, n=1024)
        assert ratio < LINEAR_RATIO, f"{ratio:.1f}x for 8x the message at n={n}"

    def test_hostile_request_headers_cost_is_linear(self) -> None:
        """A request_headers message with a hostile Host, TE and underscore names costs
        about 8x at 8x the size, with every header rule and the Host rewrite on."""
        policy = policy_from_mapping({"host_rewrites": {"a.example": "b.example"},
                                      "strip_host_port": True, "underscore_headers": "rewrite"})  # fmt: skip

        def build(n: int) -> Callable[[], object]:
            pairs = [(":authority", "a." * (n // 2) + ":1"), ("te", " " * n + "trailers"),
                     *((f"x_{i}", "v") for i in range(n // 64))]  # fmt: skip
            message = request_headers(pairs)
            return lambda: handle(policy, message, StreamState())

        n, ratio = growth(lambda run: run(), build, n=1024)
        assert ratio < LINEAR_RATIO, f"{ratio:.1f}x for 8x the message at n={n}"

    def test_hostile_message_is_still_diagnosed(self) -> None:
        """The cut values still give a diagnosis: the cap bounds work, it does not drop the answer."""
        response = handle(
            POLICY,
            response_headers([(":status", "503")], hostile_attributes(200_000)),
            StreamState(),
        )
        assert response is not None
        diagnosis_header = next(
            o.header.raw_value
            for o in response.response_headers.response.header_mutation.set_headers
            if o.header.key == "x-extproc-diagnosis"
        )
        # An unknown BoringSSL reason is a TLS protocol failure (issue 19: no TLS error
        # falls to upstream_failure).
        assert diagnosis_header.startswith(b"tls_protocol_error;")


class TestCaps:
    """Each text attribute the core reads has a cap, and Envoy's strings fit far inside it."""

    def test_every_text_attribute_read_has_a_cap(self) -> None:
        """The details and every completion attribute are in TEXT_CAPS."""
        read = {core.DETAILS_ATTRIBUTE, core.PEER_ATTRIBUTE, *(key for _, key in core.COMPLETION)}
        assert read == set(core.TEXT_CAPS)

    def test_values_are_cut_before_the_core_reads_them(self) -> None:
        """Attributes ten times their cap reach the evidence the classifier sees cut to the cap."""

        class Long:
            def number(self, key: str, limit: int) -> int | None:
                return 32 if key == core.FLAGS_ATTRIBUTE else None

            def text(self, key: str) -> str:
                return "x" * 10 * core.TEXT_CAPS[key]

        seen: list[diagnosis.Evidence] = []

        class Spy:
            def enrich(self, ev: diagnosis.Evidence) -> diagnosis.Evidence:
                seen.append(ev)
                return ev

        core.response_phase(POLICY, {":status": b"503"}, Long(), core.NOTHING_CARRIED,
                            cluster_tls=Spy())  # fmt: skip
        fields = {"code_details": core.DETAILS_ATTRIBUTE, **dict(core.COMPLETION)}
        lengths = {field: len(getattr(seen[0], field)) for field in fields}
        assert lengths == {field: core.TEXT_CAPS[key] for field, key in fields.items()}

    def test_recorded_envoy_strings_fit_with_room(self) -> None:
        """Every string Envoy 1.40 produced in docs/signatures.md (transport failure
        reasons, code details) is under an eighth of the transport failure reason's cap,
        and every cluster name under a quarter of the name cap: a cut never touches one."""
        text = (Path(__file__).parents[2] / "docs" / "signatures.md").read_text()
        spans = re.findall(r"`([^`]+)`", text.replace("\\|", "|"))
        clusters = [s for s in spans if s.startswith(("outbound|", "inbound|"))]
        assert len(spans) > 100 and clusters
        assert max(map(len, spans)) <= core.MAX_TRANSPORT_FAILURE_REASON // 8
        assert max(map(len, clusters)) <= core.MAX_NAME // 4
