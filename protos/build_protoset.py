"""Write protos/extproc.protoset: the server's gRPC services as one FileDescriptorSet.

`ghz --protoset protos/extproc.protoset` (or grpcurl) then calls a server that offers no
reflection, such as a TLS-only or locked-down deployment. The descriptors are the
installed ones (xds-protos, grpcio-health-checking, grpcio-reflection), each file after
the files it imports, so the set is self-contained. `make protos` runs this; a test fails
when the checked-in file differs from a fresh build.
"""

from __future__ import annotations

import sys
from pathlib import Path

from envoy.service.ext_proc.v3 import external_processor_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

PROTOSET = Path(__file__).with_name("extproc.protoset")
SERVICES = (external_processor_pb2, health_pb2, reflection_pb2)


def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    """The services' files and everything they import, dependencies first."""
    ordered: list[FileDescriptor] = []

    def add(file: FileDescriptor) -> None:
        if file in ordered:
            return
        for dependency in file.dependencies:
            add(dependency)
        ordered.append(file)

    for module in SERVICES:
        add(module.DESCRIPTOR)
    result = descriptor_pb2.FileDescriptorSet()
    for file in ordered:
        file.CopyToProto(result.file.add())
    return result


def build() -> bytes:
    return descriptor_set().SerializeToString(deterministic=True)


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTOSET
    out.write_bytes(build())
