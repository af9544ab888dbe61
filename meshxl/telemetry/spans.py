"""SERVER spans for an HTTP server that is not aiohttp's (the statesync sidecar's).

Apart from :mod:`.http` (the aiohttp instrumentations) so that the sidecar, which
imports nothing of aiohttp, loads only this, and only when spans go somewhere
(``docs/performance.md``, "Sidecar footprint").
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from opentelemetry import propagate, trace


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
