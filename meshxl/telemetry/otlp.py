"""OTLP trace messages from descriptors meshxl owns, in a private descriptor pool.

xds-protos installs an older copy of the OpenTelemetry protos (``opentelemetry/proto/...``,
from before ``InstrumentationLibrary`` became ``InstrumentationScope`` and
``instrumentation_library_spans`` became ``scope_spans``) at the same paths as
opentelemetry-proto; which copy is on disk depends on the order an installer happened to
write them. The receiver decodes with the descriptors in ``otlp_trace.binpb`` (taken from
opentelemetry-proto by ``scripts/otlp_descriptors.py``) instead, registered in a pool of
its own, so it reads Envoy's spans whichever copy is installed and never conflicts with
the default pool that Envoy's generated modules use. meshxl's own OTLP exporters
(``export.py``) encode with the same descriptors.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from importlib import resources
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from opentelemetry.exporter.otlp.json.common.trace_encoder import (
    encode_spans as _json_encode_spans,
)
from opentelemetry.sdk.trace import ReadableSpan

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


_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def request_from_otlp_json(data: dict[str, Any]) -> Any:
    """An ``ExportTraceServiceRequest`` from OTLP/JSON (hex ids; the inverse of the
    receiver's ``proto_to_otlp_json``)."""
    for rs in data.get("resourceSpans", ()):
        for ss in rs.get("scopeSpans", ()):
            for span in ss.get("spans", ()):
                _base64_ids(span)
                for link in span.get("links", ()):
                    _base64_ids(link)
    return json_format.ParseDict(data, ExportTraceServiceRequest())


def _base64_ids(data: dict[str, Any]) -> None:
    for name in _ID_FIELDS:
        if data.get(name):
            data[name] = base64.b64encode(bytes.fromhex(data[name])).decode()


def encode_spans(spans: Sequence[ReadableSpan]) -> bytes:
    """The SDK's spans as a serialized ``ExportTraceServiceRequest``.

    The SDK's own OTLP/JSON encoder (opentelemetry-exporter-otlp-json-common, which
    needs no generated protobuf modules) maps spans to OTLP; the bytes come from the
    descriptors above, so the result does not depend on the installed opentelemetry/proto.
    """
    data = _json_encode_spans(spans).to_dict()
    return bytes(request_from_otlp_json(data).SerializeToString())
