"""OpenTelemetry set-up shared by every meshxl process.

The SDK is configured from the standard ``OTEL_*`` variables (``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_EXPORTER``, ``OTEL_EXPORTER_OTLP_*`` with
``OTEL_EXPORTER_OTLP_PROTOCOL`` ``grpc`` or ``http/protobuf``, ``OTEL_SDK_DISABLED``),
and ``--trace-file PATH`` adds OTLP JSON lines written to a file. Resource attributes
name the component, cluster and member, so spans of all processes can be told apart
in one file or one collector.

Nothing of OpenTelemetry is imported until spans go somewhere: a process without an
OTLP exporter or a trace file (most sidecars) loads neither the SDK nor its batch
span processor's thread (``docs/performance.md``, "Sidecar footprint").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import names

if TYPE_CHECKING:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)

_provider: TracerProvider | None = None


def _otlp_exporter() -> SpanExporter | None:
    """The OTLP exporter the standard environment asks for, if any."""
    exporters = os.environ.get("OTEL_TRACES_EXPORTER", "")
    endpoint = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    wanted = [e.strip() for e in exporters.split(",") if e.strip()]
    if "none" in wanted or not (endpoint or "otlp" in wanted):
        return None
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc")
    from .export import otlp_exporter  # meshxl's own: see export.py for why

    return otlp_exporter(protocol.strip())


def setup_tracing(component: str, *, service_name: str | None = None,
                  attributes: Mapping[str, Any] | None = None,
                  trace_file: str | Path | None = None,
                  schedule_delay_ms: int = 200) -> TracerProvider | None:
    """Install the process's tracer provider (once) and return it; None (and nothing
    imported) when spans go nowhere: no OTLP exporter, no trace file, or
    ``OTEL_SDK_DISABLED=true``."""
    global _provider
    if _provider is not None:
        return _provider
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    exporter = _otlp_exporter()
    if exporter is None and trace_file is None:
        return None  # with nowhere to send spans, the API's no-op tracer costs nothing
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attrs: dict[str, Any] = {names.COMPONENT: component,
                             **{k: v for k, v in (attributes or {}).items() if v is not None}}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attrs["service.name"] = service_name or f"meshxl-{component}"
    provider = TracerProvider(resource=Resource.create(attrs))
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=5000))
    if trace_file is not None:
        from opentelemetry.exporter.otlp.json.file.trace_exporter import FileSpanExporter

        Path(trace_file).parent.mkdir(parents=True, exist_ok=True)
        provider.add_span_processor(BatchSpanProcessor(
            FileSpanExporter(str(trace_file)), schedule_delay_millis=schedule_delay_ms))
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def enabled() -> bool:
    """Whether this process exports spans (request instrumentation is added only then)."""
    return _provider is not None


def shutdown_tracing() -> None:
    """Flush and stop exporting (at process exit).

    OpenTelemetry lets a process set its global provider once: after this, spans are
    no longer exported, and a later ``setup_tracing`` cannot install another.
    """
    global _provider
    if _provider is not None:
        _provider.force_flush(5000)
        _provider.shutdown()
        _provider = None


def tracer(name: str = "meshxl") -> trace.Tracer:
    from opentelemetry import trace

    return trace.get_tracer(name)
