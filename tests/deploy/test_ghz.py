"""The ghz load-test files: real ProcessingRequest messages, and what the server makes of them."""

from __future__ import annotations

import json
from pathlib import Path

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.json_format import ParseDict

from extproc.config import Exposure, Policy
from extproc.filter_config import REQUEST_ATTRIBUTES, RESPONSE_ATTRIBUTES
from extproc.server import SERVICE_NAME, StreamState, handle

ATTRIBUTES = "envoy.filters.http.ext_proc"
GHZ = Path(__file__).resolve().parents[2] / "bench" / "ghz"


def messages() -> list[pb.ProcessingRequest]:
    """The data file: ghz sends the list, in order, on one stream."""
    return [
        ParseDict(m, pb.ProcessingRequest()) for m in json.loads((GHZ / "process.json").read_text())
    ]


class TestGhzFiles:
    def test_config_calls_process(self):
        """The config names the ext_proc Process method on the server's default port."""
        config = json.loads((GHZ / "ghz.json").read_text())
        assert config["call"] == f"{SERVICE_NAME}.Process"
        assert config["host"].endswith(":50051")

    def test_data_is_a_clean_request_then_a_failing_response(self):
        """The stream is request_headers, then response_headers, with only attributes Envoy is asked for."""
        request, response = messages()
        assert request.WhichOneof("request") == "request_headers"
        assert response.WhichOneof("request") == "response_headers"
        for message, asked in ((request, REQUEST_ATTRIBUTES), (response, RESPONSE_ATTRIBUTES)):
            (sent,) = message.attributes.values()
            assert set(sent.fields) <= set(asked)
        # On the plaintext connection of the recorded data Envoy sends no peer certificate,
        # and no `upstream.tls_version` where no TLS connection was made (a refused port:
        # seen with Envoy 1.40); every other asked attribute is there.
        missing = set(RESPONSE_ATTRIBUTES) - set(response.attributes[ATTRIBUTES].fields)
        assert missing == {"connection.uri_san_peer_certificate", "upstream.tls_version"}

    def test_server_cleans_nothing_and_diagnoses_the_refusal(self):
        """The clean request needs no change; the response is diagnosed as Envoy 1.40's refused port."""
        request, response = messages()
        state = StreamState()
        assert not handle(Policy(), request, state).request_headers.HasField("response")
        answer = handle(Policy(response_annotations=Exposure.ON), response, state)
        headers = {
            o.header.key: o.header.raw_value.decode()
            for o in answer.response_headers.response.header_mutation.set_headers
        }
        assert headers["x-extproc-diagnosis"].startswith("upstream_refused;status=503")
