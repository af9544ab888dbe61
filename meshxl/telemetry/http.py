"""W3C trace context through meshxl's HTTP servers and clients.

The OpenTelemetry aiohttp instrumentations do the work for aiohttp: the server
middleware continues an incoming ``traceparent`` in a SERVER span, the client trace
config makes a CLIENT span per request and injects its ``traceparent``.
:func:`server_spans` does the same for the statesync sidecar's own HTTP server. So a
request from a client through Envoy, the app and its statesync sidecar is one trace.

Without an explicit ``tracer_provider`` the spans go to the global provider that
:func:`meshxl.telemetry.tracing.setup_tracing` installs, whether it is installed
before or after the app or session is created: until then the tracer is a proxy that
binds to the global provider on first use after it is set.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import aiohttp
from aiohttp.typedefs import Middleware
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.aiohttp_client import create_trace_config
from opentelemetry.instrumentation.aiohttp_server import (
    AioHttpServerInstrumentor,
    create_aiohttp_middleware,
)

_init_lock = threading.Lock()
_server_state_ready = False


def _init_server_instrumentation() -> None:
    """Initialise the aiohttp-server instrumentation's module state, without its patch.

    Its middleware reads module globals (excluded URLs, request metrics, semantic
    convention mode) that only ``AioHttpServerInstrumentor.instrument()`` sets; the
    same call also replaces ``web.Application`` process-wide with a subclass that adds
    the middleware to every app. We want the middleware on our apps only, so the patch
    is undone at once (the globals stay). If something else (``opentelemetry-
    instrument``) has instrumented aiohttp already, the globals are set: leave it be.
    """
    global _server_state_ready
    with _init_lock:
        if _server_state_ready:
            return
        instrumentor = AioHttpServerInstrumentor()
        if not instrumentor.is_instrumented_by_opentelemetry:
            with warnings.catch_warnings():  # aiohttp frowns on subclassing Application
                warnings.simplefilter("ignore", DeprecationWarning)
                instrumentor.instrument(skip_dep_check=True)
            instrumentor.uninstrument()
        _server_state_ready = True


def server_middleware(
    tracer_provider: trace.TracerProvider | None = None,
) -> Middleware:
    """A middleware making one SERVER span per request, continuing its ``traceparent``.

    Put it first in ``web.Application(middlewares=[...])`` so the span covers the other
    middlewares. Do not combine with ``AioHttpServerInstrumentor().instrument()``,
    which adds the same middleware to every app (two spans per request).
    """
    _init_server_instrumentation()
    # A tracer of our own (a proxy until a global provider is set) rather than the
    # instrumentation's module-wide one, so each app binds to the provider current
    # when it serves its first request.
    provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
    middleware: Middleware = create_aiohttp_middleware(tracer_provider=provider)
    return middleware


def client_trace_configs(
    tracer_provider: trace.TracerProvider | None = None,
) -> list[aiohttp.TraceConfig]:
    """``trace_configs`` for ``aiohttp.ClientSession``: CLIENT spans and ``traceparent``."""
    return [create_trace_config(tracer_provider=tracer_provider)]


class _Route(Protocol):
    pattern: str


class _Request(Protocol):
    method: str
    path: str
    headers: Mapping[str, str]
    """By lower-case name."""
    route: _Route | None


class _Response(Protocol):
    status: int


def server_spans(
    tracer_provider: trace.TracerProvider | None = None,
) -> Callable[[Any, Callable[[Any], Awaitable[Any]]], Awaitable[Any]]:
    """For a server that is not aiohttp's (the sidecar's): ``wrap(request, answer)``
    runs ``answer(request)`` in a SERVER span named ``METHOD route``, continuing the
    request's ``traceparent``, with HTTP semantic-convention attributes; an answer of
    500 or more marks the span an error."""
    provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
    tracer = provider.get_tracer("meshxl.http.server")

    async def wrap(request: _Request,
                   answer: Callable[[_Request], Awaitable[_Response]]) -> _Response:
        route = request.route.pattern if request.route is not None else request.path
        attributes = {"http.request.method": request.method, "url.path": request.path,
                      "http.route": route, "url.scheme": "http"}
        with tracer.start_as_current_span(
                f"{request.method} {route}", kind=trace.SpanKind.SERVER,
                context=propagate.extract(request.headers), attributes=attributes) as span:
            response = await answer(request)
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                span.set_status(trace.Status(trace.StatusCode.ERROR))
            return response

    return wrap
