"""The service level indicators of a failover, measured from spans (pure): when the
failovers were, how long the control plane took to converge, how long a session
takeover took, how long requests failed (RTO), and how many requests succeeded.

:mod:`meshxl.telemetry.slo` evaluates objectives over them (``meshxl slo review``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from . import names
from .otlpjson import KIND_CLIENT, KIND_SERVER, STATUS_ERROR, Span

__all__ = ["Failover", "convergence_ms", "find_failovers", "request_counts", "rto_ms",
           "takeover_ms"]

_NS = 1_000_000  # per millisecond


@dataclass(frozen=True)
class Failover:
    """One failover trace: its root span and its window in Unix nanoseconds."""

    trace_id: str
    root: Span
    window_start_ns: int
    window_end_ns: int

    def contains(self, time_ns: int) -> bool:
        return self.window_start_ns <= time_ns <= self.window_end_ns


def find_failovers(spans: Iterable[Span], window_before_s: float = 5.0,
                   window_after_s: float = 1.0) -> list[Failover]:
    """Every ``meshxl.failover`` span, oldest first, with its window."""
    before, after = round(window_before_s * 1e9), round(window_after_s * 1e9)
    roots = sorted((s for s in spans if s.name == names.FAILOVER), key=lambda s: s.start_ns)
    return [Failover(r.trace_id, r, r.start_ns - before, r.end_ns + after) for r in roots]


def _in_any(failovers: Sequence[Failover], time_ns: int) -> bool:
    return any(f.contains(time_ns) for f in failovers)


def convergence_ms(spans: Sequence[Span], failovers: Sequence[Failover]) -> list[float]:
    """Per failover: root start -> end of its trace's last ACK span (root end if none)."""
    out = []
    for failover in failovers:
        acks = [s.end_ns for s in spans
                if s.trace_id == failover.trace_id and s.name == names.FAILOVER_ACK]
        end = max(acks) if acks else failover.root.end_ns
        out.append((end - failover.root.start_ns) / _NS)
    return out


def takeover_ms(spans: Sequence[Span], failovers: Sequence[Failover]) -> list[float]:
    """Durations of failover takeover spans, else of session takeovers in the window."""
    counted: set[tuple[str, str]] = set()
    out = []
    for failover in failovers:
        mine = [s for s in spans
                if s.trace_id == failover.trace_id and s.name == names.FAILOVER_TAKEOVER]
        if not mine:
            mine = [s for s in spans
                    if s.name == names.SESSION_TAKEOVER and failover.contains(s.start_ns)]
        for span in sorted(mine, key=lambda s: s.start_ns):
            if (span.trace_id, span.span_id) not in counted:
                counted.add((span.trace_id, span.span_id))
                out.append(span.duration_ms)
    return out


def _is_proxy(span: Span) -> bool:
    return (span.service.lower().startswith("envoy")
            or span.resource.get(names.COMPONENT) == "envoy"
            or span.attributes.get("component") == "proxy")


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true")


def _http_status(span: Span) -> int | None:
    for key in ("http.response.status_code", "http.status_code"):
        value = span.attributes.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.isdigit():
            return int(value)
    return None


def _failed(span: Span, *, upstream: bool) -> bool:
    status = _http_status(span)
    if (span.status_code == STATUS_ERROR or (status is not None and status >= 500)
            or _truthy(span.attributes.get("error"))):
        return True
    if not upstream:
        return False
    attributes = span.attributes
    if any(attributes.get(k) not in (None, False, "", "false")
           for k in ("upstream.reset", "upstream_reset")):
        return True
    return any(attributes.get(k) not in (None, "", "-")
               for k in ("response_flags", "envoy.response_flags"))


def _request_traces(spans: Sequence[Span]) -> dict[str, list[Span]]:
    failover_traces = {s.trace_id for s in spans if s.name == names.FAILOVER}
    traces: dict[str, list[Span]] = {}
    for span in spans:
        if span.trace_id not in failover_traces:
            traces.setdefault(span.trace_id, []).append(span)
    return traces


def rto_ms(spans: Sequence[Span], failovers: Sequence[Failover]) -> list[float]:
    """Per request trace failing inside a window: first failure start -> recovery end."""
    out = []
    for trace in _request_traces(spans).values():
        proxy = [s for s in trace if _is_proxy(s)]
        attempts = [s for s in proxy if s.kind == KIND_CLIENT]
        if not attempts:
            attempts = [s for s in proxy if s.kind == KIND_SERVER]
        attempts.sort(key=lambda s: (s.start_ns, s.end_ns))
        failures = [s for s in attempts
                    if _failed(s, upstream=True) and _in_any(failovers, s.start_ns)]
        if not failures:
            continue
        first = failures[0]
        recovered = [s for s in attempts
                     if s is not first and s.start_ns >= first.start_ns
                     and not _failed(s, upstream=True)]
        out.append((recovered[0].end_ns - first.start_ns) / _NS if recovered else math.inf)
    return out


def request_counts(spans: Sequence[Span], failovers: Sequence[Failover]) -> tuple[int, int]:
    """(good, total) downstream proxy requests starting inside a failover window."""
    requests = [s for s in spans if s.kind == KIND_SERVER and _is_proxy(s)
                and _in_any(failovers, s.start_ns)]
    good = sum(1 for s in requests if not _failed(s, upstream=False))
    return good, len(requests)
