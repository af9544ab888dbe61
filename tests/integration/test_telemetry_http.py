"""Trace context through real aiohttp servers and clients on loopback.

Most tests give the middleware and trace configs their own tracer provider, so they
never touch the process's global one (which can be set only once). The test of the
global path swaps OpenTelemetry's and ``setup_tracing``'s globals for its duration
(as OpenTelemetry's own test utilities do) and puts them back afterwards.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web, web_app
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from opentelemetry.util._once import Once

from meshxl.telemetry import tracing
from meshxl.telemetry.http import client_trace_configs, server_middleware

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT_ID = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"

BACK = web.AppKey("back", str)

Serve = Callable[[web.Application], Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start apps on free loopback ports; returns their base URLs."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> str:
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
def memory() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def chain_apps(provider: TracerProvider | None) -> tuple[web.Application, web.Application]:
    """``front`` answers by calling ``back`` with the traced client."""
    back = web.Application(middlewares=[server_middleware(provider)])
    back.router.add_get("/state", state)

    async def session(request: web.Request) -> web.Response:
        async with aiohttp.ClientSession(trace_configs=client_trace_configs(provider)) as s:
            async with s.get(request.app[BACK] + "/state") as answer:
                return web.json_response(await answer.json())

    front = web.Application(middlewares=[server_middleware(provider)])
    front.router.add_get("/session", session)
    return front, back


async def state(request: web.Request) -> web.Response:
    return web.json_response({"state": "kept"})


async def start_chain(serve: Serve, provider: TracerProvider | None) -> str:
    front, back = chain_apps(provider)
    front[BACK] = await serve(back)
    return await serve(front)


def by_kind(spans: tuple[ReadableSpan, ...]) -> dict[SpanKind, list[ReadableSpan]]:
    kinds: dict[SpanKind, list[ReadableSpan]] = {}
    for span in sorted(spans, key=lambda s: s.start_time or 0):
        kinds.setdefault(span.kind, []).append(span)
    return kinds


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


async def test_one_trace_from_client_through_two_servers(
        serve: Serve, memory: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = memory
    front = await start_chain(serve, provider)
    async with aiohttp.ClientSession(trace_configs=client_trace_configs(provider)) as s:
        async with s.get(front + "/session") as answer:
            assert await answer.json() == {"state": "kept"}

    spans = exporter.get_finished_spans()
    kinds = by_kind(spans)
    [client, front_client] = kinds[SpanKind.CLIENT]
    [front_server, back_server] = kinds[SpanKind.SERVER]
    assert len(spans) == 4
    assert {s.context.trace_id for s in spans if s.context} == {client.context.trace_id}
    assert client.parent is None
    assert parent_of(front_server) == span_id(client)
    assert parent_of(front_client) == span_id(front_server)
    assert parent_of(back_server) == span_id(front_client)
    assert front_server.parent is not None and front_server.parent.is_remote
    assert front_client.parent is not None and not front_client.parent.is_remote
    assert front_server.attributes and back_server.attributes
    assert "/session" in str(front_server.attributes.values())
    assert "/state" in str(back_server.attributes.values())
    # Only our apps are traced: the instrumentation's process-wide patch is not left on.
    assert web.Application is web_app.Application


async def test_incoming_traceparent_is_continued(
        serve: Serve, memory: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = memory
    front = await start_chain(serve, provider)
    async with aiohttp.ClientSession() as s:  # untraced: only the header, as Envoy sends it
        async with s.get(front + "/session", headers={"traceparent": TRACEPARENT}) as answer:
            assert answer.status == 200

    spans = exporter.get_finished_spans()
    [front_server, back_server] = by_kind(spans)[SpanKind.SERVER]
    assert {s.context.trace_id for s in spans if s.context} == {TRACE_ID}
    assert len(spans) == 3
    assert parent_of(front_server) == PARENT_ID
    assert parent_of(back_server) == span_id(by_kind(spans)[SpanKind.CLIENT][0])


@pytest.fixture
def fresh_global_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    """No global tracer provider for one test; the process's own is put back after."""
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER_SET_ONCE", Once())
    monkeypatch.setattr(tracing, "_provider", None)


@pytest.mark.usefixtures("fresh_global_provider")
@pytest.mark.parametrize("installed", ["before", "after"])
async def test_spans_go_to_the_provider_setup_tracing_installs(
        serve: Serve, tmp_path: Path, installed: str) -> None:
    trace_file = tmp_path / "traces.jsonl"
    if installed == "before":
        tracing.setup_tracing("test", trace_file=trace_file)
    front = await start_chain(serve, None)  # apps and their client made now
    configs = client_trace_configs()
    if installed == "after":
        tracing.setup_tracing("test", trace_file=trace_file)
    try:
        async with aiohttp.ClientSession(trace_configs=configs) as s:
            async with s.get(front + "/session") as answer:
                assert answer.status == 200
    finally:
        tracing.shutdown_tracing()

    spans = [span for line in trace_file.read_text().splitlines()
             for rs in json.loads(line)["resourceSpans"]
             for ss in rs["scopeSpans"] for span in ss["spans"]]
    assert sorted(s["kind"] for s in spans) == [2, 2, 3, 3]
    assert len({s["traceId"] for s in spans}) == 1
