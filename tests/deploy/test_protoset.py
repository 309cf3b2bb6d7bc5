"""protos/extproc.protoset: what a client without reflection (ghz --protoset) needs, and no more stale than the installed descriptors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

ROOT = Path(__file__).resolve().parents[2]
PROTOSET = ROOT / "protos" / "extproc.protoset"


def pool() -> descriptor_pool.DescriptorPool:
    """A fresh pool holding only the protoset's files: nothing borrowed from installed packages."""
    files = descriptor_pb2.FileDescriptorSet.FromString(PROTOSET.read_bytes())
    fresh = descriptor_pool.DescriptorPool()
    for file in files.file:
        fresh.Add(file)
    return fresh


def builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "build_protoset", ROOT / "protos" / "build_protoset.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TestProtoset:
    def test_describes_process(self):
        """The set has ExternalProcessor/Process, a bidirectional stream of ProcessingRequest/Response."""
        method = (
            pool()
            .FindServiceByName("envoy.service.ext_proc.v3.ExternalProcessor")
            .FindMethodByName("Process")
        )
        assert method.input_type.full_name == "envoy.service.ext_proc.v3.ProcessingRequest"
        assert method.output_type.full_name == "envoy.service.ext_proc.v3.ProcessingResponse"
        assert method.client_streaming and method.server_streaming

    def test_describes_health_and_reflection(self):
        """Health and reflection are in it too: a probe or grpcurl needs them without reflection."""
        fresh = pool()
        assert fresh.FindServiceByName("grpc.health.v1.Health").FindMethodByName("Check")
        assert fresh.FindServiceByName("grpc.reflection.v1alpha.ServerReflection")

    def test_ghz_data_parses_against_it(self):
        """bench/ghz/process.json parses, message by message, with only the protoset's descriptors."""
        request_type = pool().FindMessageTypeByName("envoy.service.ext_proc.v3.ProcessingRequest")
        message_class = message_factory.GetMessageClass(request_type)
        data = json.loads((ROOT / "bench" / "ghz" / "process.json").read_text())
        parsed = [json_format.ParseDict(item, message_class()) for item in data]
        assert [m.WhichOneof("request") for m in parsed] == ["request_headers", "response_headers"]

    def test_checked_in_file_is_fresh(self):
        """The file equals a build from the installed descriptors; `make protos` refreshes it."""
        assert PROTOSET.read_bytes() == builder().build(), "run `make protos`"
