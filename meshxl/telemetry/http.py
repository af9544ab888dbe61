"""W3C trace context through meshxl's HTTP servers and clients.

The OpenTelemetry aiohttp instrumentations do the work for aiohttp: the server
middleware continues an incoming ``traceparent`` in a SERVER span, the client trace
config makes a CLIENT span per request and injects its ``traceparent``.
:func:`server_spans` (:mod:`.spans`, re-exported here) does the same for the statesync
sidecar's own HTTP server. So a
request from a client through Envoy, the app and its statesync sidecar is one trace.

Without an explicit ``tracer_provider`` the spans go to the global provider that
:func:`meshxl.telemetry.tracing.setup_tracing` installs, whether it is installed
before or after the app or session is created: until then the tracer is a proxy that
binds to the global provider on first use after it is set.
"""

from __future__ import annotations

import threading
import warnings

import aiohttp
from aiohttp.typedefs import Middleware
from opentelemetry import trace
from opentelemetry.instrumentation.aiohttp_client import create_trace_config
from opentelemetry.instrumentation.aiohttp_server import (
    AioHttpServerInstrumentor,
    create_aiohttp_middleware,
)

from .spans import server_spans

__all__ = ["client_trace_configs", "server_middleware", "server_spans"]

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
