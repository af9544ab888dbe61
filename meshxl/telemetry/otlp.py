"""OTLP trace messages from descriptors meshxl owns, in a private descriptor pool.

xds-protos installs an older copy of the OpenTelemetry protos (``opentelemetry/proto/...``,
from before ``InstrumentationLibrary`` became ``InstrumentationScope`` and
``instrumentation_library_spans`` became ``scope_spans``) at the same paths as
opentelemetry-proto; which copy is on disk depends on the order an installer happened to
write them. The receiver decodes with the descriptors in ``otlp_trace.binpb`` (taken from
opentelemetry-proto by ``scripts/otlp_descriptors.py``) instead, registered in a pool of
its own, so it reads Envoy's spans whichever copy is installed and never conflicts with
the default pool that Envoy's and the SDK's generated modules use.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

TRACE_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
EXPORT_METHOD = f"/{TRACE_SERVICE}/Export"


def _pool() -> descriptor_pool.DescriptorPool:
    data = resources.files(__package__).joinpath("otlp_trace.binpb").read_bytes()
    pool = descriptor_pool.DescriptorPool()
    for proto in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        pool.Add(proto)
    return pool


POOL = _pool()


def _message(name: str) -> Any:
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(name))


ExportTraceServiceRequest: Any = _message(
    "opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest")
ExportTraceServiceResponse: Any = _message(
    "opentelemetry.proto.collector.trace.v1.ExportTraceServiceResponse")
