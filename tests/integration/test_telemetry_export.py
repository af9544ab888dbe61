"""meshxl's OTLP exporters (export.py): settings from OTEL_*, HTTP/protobuf on loopback."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from meshxl.telemetry import tracing
from meshxl.telemetry.export import (
    ExportSettings,
    GrpcSpanExporter,
    HttpSpanExporter,
    otlp_exporter,
)
from meshxl.telemetry.otlp import ExportTraceServiceRequest, ExportTraceServiceResponse
from tests.harness.clock import scaled


def spans(count: int = 2) -> list[ReadableSpan]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "export-test"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    for n in range(count):
        with provider.get_tracer("t").start_as_current_span(f"span-{n}"):
            pass
    provider.shutdown()
    return list(memory.get_finished_spans())


def test_settings_follow_the_opentelemetry_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ENDPOINT", "TRACES_ENDPOINT", "HEADERS", "TRACES_HEADERS", "TIMEOUT",
                 "COMPRESSION", "INSECURE", "CERTIFICATE"):
        monkeypatch.delenv(f"OTEL_EXPORTER_OTLP_{name}", raising=False)
    assert ExportSettings.from_env("grpc").endpoint == "http://localhost:4317"
    assert ExportSettings.from_env("http/protobuf").endpoint == "http://localhost:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "Api-Key=a%3Db, x=1")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "only=traces")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "3")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    http = ExportSettings.from_env("http/protobuf")
    assert http.endpoint == "http://collector:4318/v1/traces"
    assert (http.headers, http.timeout, http.gzip) == ({"only": "traces"}, 3.0, True)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
    assert ExportSettings.from_env("grpc").headers == {"api-key": "a=b", "x": "1"}
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://other:9/custom")
    assert ExportSettings.from_env("http/protobuf").endpoint == "http://other:9/custom"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "brotli")
    with pytest.raises(ValueError, match="brotli"):
        ExportSettings.from_env("grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_TIMEOUT 'soon'"):
        ExportSettings.from_env("grpc")


def test_bad_settings_are_one_line_errors_not_tracebacks(tmp_path: Path) -> None:
    """setup_tracing's callers turn ValueError into one line and exit 1."""
    missing = tmp_path / "ca.pem"
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_CERTIFICATE .*ca.pem"):
        GrpcSpanExporter(ExportSettings("https://collector:4317", certificate=str(missing)))


def test_protocols(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    assert isinstance(otlp_exporter("grpc"), GrpcSpanExporter)
    assert isinstance(otlp_exporter("http/protobuf"), HttpSpanExporter)
    with pytest.raises(ValueError, match="http/json"):
        otlp_exporter("http/json")
    # setup_tracing picks it from the environment without importing opentelemetry.proto.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    exporter = tracing._otlp_exporter()
    assert isinstance(exporter, HttpSpanExporter)
    assert exporter.settings.endpoint == "http://127.0.0.1:9/v1/traces"


async def test_http_exporter_retries_a_busy_collector_then_delivers(tmp_path: Path) -> None:
    received: list[Any] = []
    answers = [503, 200]

    async def traces(request: web.Request) -> web.Response:
        body = await request.read()  # aiohttp undoes the Content-Encoding
        received.append((request.headers.get("Content-Type"),
                         request.headers.get("Content-Encoding"),
                         request.headers.get("Api-Key"),
                         ExportTraceServiceRequest.FromString(body)))
        status = answers.pop(0)
        return web.Response(status=status, body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        exporter = HttpSpanExporter(ExportSettings(
            endpoint=f"http://127.0.0.1:{port}/v1/traces", headers={"api-key": "k"},
            timeout=10, gzip=True))
        result = await asyncio.to_thread(exporter.export, spans(2))
        exporter.shutdown()
    finally:
        await runner.cleanup()
    assert result is SpanExportResult.SUCCESS
    assert len(received) == 2  # the 503, then the delivery
    content_type, encoding, key, request = received[-1]
    assert (content_type, encoding, key) == ("application/x-protobuf", "gzip", "k")
    names = sorted(s.name for rs in request.resource_spans for ss in rs.scope_spans
                   for s in ss.spans)
    assert names == ["span-0", "span-1"]


def test_exporters_give_up_within_their_timeout() -> None:
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for exporter in (GrpcSpanExporter(ExportSettings(f"http://127.0.0.1:{port}", timeout=1.5)),
                     HttpSpanExporter(ExportSettings(f"http://127.0.0.1:{port}/v1/traces",
                                                     timeout=1.5))):
        started = time.monotonic()
        assert exporter.export(spans(1)) is SpanExportResult.FAILURE
        assert time.monotonic() - started < scaled(10)  # its 1.5 s timeout, not hanging
        exporter.shutdown()
