"""The OTLP/gRPC receiver and meshxl's OTLP exporters, against the SDK's file exporter,
on loopback. Nothing here imports ``opentelemetry.proto``: meshxl does not depend on
which copy of it is installed (xds-protos ships an older one at the same paths)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.json.file.trace_exporter import FileSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, StatusCode

from meshxl.telemetry import names
from meshxl.telemetry.export import ExportSettings, GrpcSpanExporter
from meshxl.telemetry.otlp import (
    EXPORT_METHOD,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from meshxl.telemetry.receiver import TraceReceiver, proto_to_otlp_json, serve_receiver

WAIT = 5.0
EXPORT = EXPORT_METHOD
SPAN_KIND_SERVER, STATUS_CODE_OK = 2, 1


def export_stub(channel: grpc.aio.Channel) -> Any:
    return channel.unary_unary(EXPORT, request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=ExportTraceServiceResponse.FromString)


def sdk_spans() -> list[ReadableSpan]:
    """A small trace with every field kind the format has to get right."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "receiver-test",
                                                        names.COMPONENT: "test"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("meshxl.test", "1.0")
    with tracer.start_as_current_span("meshxl.failover", kind=SpanKind.SERVER,
                                      attributes={names.CLUSTER: "shop", names.NODES: 3,
                                                  "ratio": 0.5, "ok": True,
                                                  "members": ["a", "b"]}) as root:
        with tracer.start_as_current_span("meshxl.failover.push",
                                          kind=SpanKind.CLIENT) as child:
            child.add_event("sent", {names.VERSION: "7"})
        with tracer.start_as_current_span(
                "meshxl.failover.takeover", links=[Link(root.get_span_context(), {"n": 1})],
        ) as takeover:
            takeover.set_status(StatusCode.ERROR, "fenced")
    provider.shutdown()
    return list(memory.get_finished_spans())


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def spans_of(line: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for rs in line["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"]]


@pytest.fixture
async def receiver(tmp_path: Path) -> AsyncIterator[TraceReceiver]:
    r = TraceReceiver(tmp_path / "envoy" / "traces.jsonl")
    assert await r.start() == r.port
    yield r
    await r.stop()


@pytest.mark.parametrize("gzip", [False, True])
async def test_receiver_writes_what_file_span_exporter_writes(tmp_path: Path,
                                                              receiver: TraceReceiver,
                                                              gzip: bool) -> None:
    spans = sdk_spans()
    written = tmp_path / "sdk.jsonl"
    exporter = FileSpanExporter(written)
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    exporter.shutdown()

    otlp = GrpcSpanExporter(ExportSettings(endpoint=f"http://127.0.0.1:{receiver.port}",
                                           timeout=5, gzip=gzip))
    try:
        # The gRPC exporter blocks; the receiver needs this event loop to answer.
        assert await asyncio.to_thread(otlp.export, spans) is SpanExportResult.SUCCESS
    finally:
        otlp.shutdown()

    [expected] = read_lines(written)
    [received] = read_lines(receiver.path)
    assert (receiver.exports, receiver.spans) == (1, 3)
    # The whole line agrees (resource, scope, ids, times, events, links, status) ...
    assert received == expected
    # ... and in particular the parts readers rely on are in OTLP/JSON form.
    by_name = {s["name"]: s for s in spans_of(received)}
    root = by_name["meshxl.failover"]
    takeover = by_name["meshxl.failover.takeover"]
    context = spans[-1].get_span_context()
    assert context is not None
    assert root["traceId"] == trace.format_trace_id(context.trace_id)
    assert by_name["meshxl.failover.push"]["parentSpanId"] == root["spanId"]
    assert takeover["links"][0] == {**takeover["links"][0], "traceId": root["traceId"],
                                    "spanId": root["spanId"]}
    assert [root["kind"], by_name["meshxl.failover.push"]["kind"], takeover["kind"]] == [2, 3, 1]
    assert takeover["status"] == {"code": 2, "message": "fenced"}
    assert isinstance(root["startTimeUnixNano"], str) and int(root["startTimeUnixNano"]) > 0
    attributes = {a["key"]: a["value"] for a in root["attributes"]}
    assert attributes[names.NODES] == {"intValue": "3"}
    assert attributes["ok"] == {"boolValue": True}


def test_proto_to_otlp_json_uses_hex_ids_integer_enums_and_string_int64() -> None:
    request = ExportTraceServiceRequest()
    scope_spans = request.resource_spans.add().scope_spans.add()
    span = scope_spans.spans.add(
        trace_id=bytes(range(16)), span_id=b"\x00\x01\x02\x03\xfc\xfd\xfe\xff",
        parent_span_id=b"\xff" * 8, name="GET /session", kind=SPAN_KIND_SERVER,
        start_time_unix_nano=2**62, end_time_unix_nano=2**62 + 1)
    span.status.code = STATUS_CODE_OK
    span.links.add(trace_id=b"\xab" * 16, span_id=b"\xcd" * 8)
    attribute = span.attributes.add(key="blob")
    attribute.value.bytes_value = b"\x00\xff"
    [out] = spans_of(proto_to_otlp_json(request))
    assert out["traceId"] == "000102030405060708090a0b0c0d0e0f"
    assert out["spanId"] == "00010203fcfdfeff"
    assert out["parentSpanId"] == "ffffffffffffffff"
    assert out["links"] == [{"traceId": "ab" * 16, "spanId": "cd" * 8}]
    assert out["kind"] == 2
    assert out["status"] == {"code": 1}
    assert (out["startTimeUnixNano"], out["endTimeUnixNano"]) == (str(2**62), str(2**62 + 1))
    # Attribute bytes stay base64, as the OTLP/JSON mapping says (only ids are hex).
    assert out["attributes"] == [{"key": "blob", "value": {"bytesValue": "AP8="}}]


async def test_empty_and_undecodable_requests_leave_the_server_serving(
        receiver: TraceReceiver, caplog: pytest.LogCaptureFixture) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{receiver.port}") as channel:
        export = export_stub(channel)
        assert await export(ExportTraceServiceRequest()) == ExportTraceServiceResponse()
        raw = channel.unary_unary(EXPORT)  # no serializers: bytes as they are
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await raw(b"\xff\xff\xff garbage")
        # Loud, not silent: the sender gets a reason, the receiver's log an error.
        assert failed.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "ExportTraceServiceRequest" in (failed.value.details() or "")
        assert receiver.failures == 1
        assert any(r.levelname == "ERROR" and "could not be decoded" in r.getMessage()
                   for r in caplog.records)
        request = ExportTraceServiceRequest()
        request.resource_spans.add().scope_spans.add().spans.add(
            trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="after")
        await export(request)
    assert (receiver.exports, receiver.spans) == (1, 1)
    [line] = read_lines(receiver.path)
    assert [s["name"] for s in spans_of(line)] == ["after"]


def test_otlp_messages_come_from_descriptors_of_meshxl_own() -> None:
    """Not from whichever opentelemetry/proto copy is installed (xds-protos ships an older
    one, without scope_spans, at the same paths as opentelemetry-proto)."""
    from google.protobuf import descriptor_pool

    from meshxl.telemetry import otlp

    assert otlp.ExportTraceServiceRequest.DESCRIPTOR.file.pool is not descriptor_pool.Default()
    fields = otlp.POOL.FindMessageTypeByName("opentelemetry.proto.trace.v1.ResourceSpans")
    assert fields.fields_by_name["scope_spans"].number == 2


def test_envoy_spans_round_trip_through_the_wire_format() -> None:
    """A line Envoy's spans produced in a demo run: OTLP/JSON -> protobuf bytes -> the
    receiver's decoding -> the same OTLP/JSON."""
    import copy

    from meshxl.telemetry.otlp import request_from_otlp_json

    fixture = (Path(__file__).resolve().parents[1] / "unit" / "fixtures" / "traces"
               / "recorded-demo-ha.jsonl")
    envoy_lines = [line for line in read_lines(fixture)
                   if any(a["value"].get("stringValue") == "envoy"
                          for rs in line["resourceSpans"]
                          for a in rs["resource"]["attributes"])]
    assert envoy_lines
    for line in envoy_lines:
        wire = request_from_otlp_json(copy.deepcopy(line)).SerializeToString()
        assert proto_to_otlp_json(ExportTraceServiceRequest.FromString(wire)) == line


async def test_serve_receiver_appends_until_cancelled(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "traces.jsonl"
    path.write_text('{"resourceSpans":[]}\n')  # an earlier run's line is kept
    task = asyncio.create_task(serve_receiver(f"127.0.0.1:{port}", str(path)))
    request = ExportTraceServiceRequest()
    request.resource_spans.add().scope_spans.add().spans.add(
        trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="served")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await export_stub(channel)(request, wait_for_ready=True, timeout=WAIT)
    # The answer comes after the line is written and flushed.
    earlier, line = read_lines(path)
    assert earlier == {"resourceSpans": []}
    assert spans_of(line)[0]["name"] == "served"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
