"""Takeover spans: in the request's trace, and in the failover's trace.

When this member takes a session over, ``meshxl.session.takeover`` is recorded in the
request's own trace (the request came through Envoy and the app with a W3C
``traceparent``), linked to the previous owner's last write. The control plane
publishes each failover's trace context in etcd; when one names the previous owner,
a ``meshxl.failover.takeover`` span joins that failover's trace with the takeover's
times, linked back to the request trace. Takeovers often happen before the control
plane even learns of the loss (Envoy retries within milliseconds, a lease takes
seconds to end), so recent takeovers are kept until their failover appears.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aetcd

from meshxl import etcd
from meshxl.telemetry import names, tracing

from .record import valid_traceparent
from .writes import Takeover

if TYPE_CHECKING:
    from opentelemetry import trace
    from opentelemetry.context import Context
    from opentelemetry.trace import SpanContext

log = logging.getLogger(__name__)

KEEP_SECONDS = 300.0
"""How long a takeover waits for its failover, and a failover for late takeovers."""
SUMMARY_FAILOVERS = 16
"""Failovers whose takeovers :meth:`TakeoverTracer.summary` lists (the latest)."""
SUMMARY_TIMES = 32
"""Takeover times listed per failover (the first ones; all are counted)."""


@dataclass
class _Joined:
    """The takeovers of one failover, summed up."""

    lost_member: str
    count: int = 0
    first_ns: int = 0
    last_ns: int = 0
    times: list[tuple[int, int]] = field(default_factory=list)
    updated: float = 0.0


def _context(traceparent: str | None) -> Context | None:
    if not traceparent:
        return None
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    ctx = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def _span_context(traceparent: str | None) -> SpanContext | None:
    from opentelemetry import trace

    ctx = _context(traceparent)
    return trace.get_current_span(ctx).get_span_context() if ctx is not None else None


@dataclass
class _Recent:
    takeover: Takeover
    span: SpanContext | None
    """Its span in the request's trace (None: no spans are made)."""
    joined: set[str] = field(default_factory=set)
    """Failovers (their ids) this takeover already joined."""


class TakeoverTracer:
    """Records takeovers and joins them to the failovers the control plane publishes.

    Spans are made with ``tracer_provider``, or while the process exports spans
    (:func:`meshxl.telemetry.tracing.enabled`); otherwise OpenTelemetry is not even
    imported, and only the summary is kept."""

    def __init__(self, cluster: str, member: str,
                 tracer_provider: trace.TracerProvider | None = None):
        self.cluster = cluster
        self.member = member
        self._provider = tracer_provider
        self._tracer: trace.Tracer | None = None
        self._recent: deque[_Recent] = deque()
        # lost member -> (its latest failover's traceparent, the failover's id, seen at)
        self._failovers: dict[str, tuple[str | None, str, float]] = {}
        self._joined: dict[str, _Joined] = {}  # failover id -> its takeovers here
        self.joined = 0

    def _spans(self) -> trace.Tracer | None:
        """The tracer, while spans go somewhere (bound on first use)."""
        if self._tracer is None and (self._provider is not None or tracing.enabled()):
            from opentelemetry import trace

            self._tracer = trace.get_tracer("meshxl.statesync",
                                            tracer_provider=self._provider)
        return self._tracer

    def record(self, t: Takeover) -> None:
        """Called in the request's context right after the takeover write."""
        tracer = self._spans()
        span_context = None
        if tracer is not None:
            from opentelemetry.trace import Link

            links = []
            previous = _span_context(t.previous_traceparent)
            if previous is not None:
                links.append(Link(previous, {"meshxl.link": "previous_owner_write"}))
            span = tracer.start_span(
                names.SESSION_TAKEOVER, start_time=t.start_ns, links=links,
                attributes={names.CLUSTER: self.cluster, names.MEMBER: t.owner,
                            names.SESSION: t.session_id,
                            names.PREVIOUS_OWNER: t.previous_owner})
            span.end(end_time=t.end_ns)
            span_context = span.get_span_context()
        recent = _Recent(t, span_context)
        self._recent.append(recent)
        self._prune()
        failover = self._failovers.get(t.previous_owner)
        if failover is not None:
            self._join(recent, failover[0], failover[1])

    def failover(self, lost_member: str, traceparent: str | None,
                 failover_id: str | None = None) -> None:
        """A failover of ``lost_member`` was published: join the takeovers from it.

        ``failover_id`` names the failover whether or not it is traced (a control plane
        exporting no spans publishes no trace context); it defaults to the traceparent.
        """
        key = failover_id or traceparent
        if key is None:
            return
        self._failovers[lost_member] = (traceparent, key, time.time())
        for recent in self._recent:
            if recent.takeover.previous_owner == lost_member:
                self._join(recent, traceparent, key)
        self._prune()

    def _join(self, recent: _Recent, traceparent: str | None, key: str) -> None:
        if key in recent.joined:
            return
        recent.joined.add(key)
        t = recent.takeover
        tracer = self._spans()
        parent = _context(traceparent) if tracer is not None else None
        if tracer is not None and parent is not None:
            from opentelemetry.trace import Link

            links: list[Any] = [] if recent.span is None else [
                Link(recent.span, {"meshxl.link": "request_trace"})]
            span = tracer.start_span(
                names.FAILOVER_TAKEOVER, context=parent, start_time=t.start_ns,
                links=links,
                attributes={names.CLUSTER: self.cluster, names.MEMBER: t.owner,
                            names.SESSION: t.session_id,
                            names.PREVIOUS_OWNER: t.previous_owner})
            span.end(end_time=t.end_ns)
            self.joined += 1
        joined = self._joined.pop(key, None) or _Joined(t.previous_owner)
        self._joined[key] = joined  # the most recently joined last
        joined.count += 1
        joined.first_ns = min(joined.first_ns or t.start_ns, t.start_ns)
        joined.last_ns = max(joined.last_ns, t.end_ns)
        joined.updated = time.time()
        if len(joined.times) < SUMMARY_TIMES:
            joined.times.append((t.start_ns, t.end_ns))
        while len(self._joined) > SUMMARY_FAILOVERS:
            del self._joined[next(iter(self._joined))]

    def summary(self) -> list[dict[str, object]]:
        """The takeovers joined to each recent failover (by its id): count, first
        start, last end and the first :data:`SUMMARY_TIMES` (start, end) pairs, in
        seconds."""
        return [{"failover": key, "member": j.lost_member, "count": j.count,
                 "first": round(j.first_ns / 1e9, 6), "last": round(j.last_ns / 1e9, 6),
                 "times": [[round(a / 1e9, 6), round(b / 1e9, 6)] for a, b in j.times]}
                for key, j in self._joined.items()]

    def _prune(self) -> None:
        horizon_ns = time.time_ns() - int(KEEP_SECONDS * 1e9)
        while self._recent and self._recent[0].takeover.end_ns < horizon_ns:
            self._recent.popleft()
        horizon = time.time() - KEEP_SECONDS
        for member in [m for m, (_, _, at) in self._failovers.items() if at < horizon]:
            del self._failovers[member]
        for key in [k for k, j in self._joined.items() if j.updated < horizon]:
            del self._joined[key]


async def follow_failovers(client: aetcd.Client, prefix: str, tracer: TakeoverTracer) -> None:
    """Feed the failover records of this cluster to ``tracer`` (read, then watch)."""
    backoff = 0.1
    while True:
        try:
            got = await client.get_prefix(prefix.encode())
            for kv in got:
                _offer(tracer, kv.value)
            watch = await client.watch_prefix(prefix.encode(),
                                              start_revision=got.header.revision + 1)
            backoff = 0.1
            try:
                async for event in watch:
                    if event.kind == "PUT":
                        _offer(tracer, event.kv.value)
            finally:
                await etcd.cancel_watch(watch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # tracing must never disturb the sidecar
            log.debug("failover watch interrupted: %s", exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)


_MAX_ID = 512


def _offer(tracer: TakeoverTracer, raw: bytes) -> None:
    try:
        record = json.loads(raw)
        member, traceparent = record["member"], record.get("traceparent")
        failover_id = record.get("id")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        log.debug("ignoring a malformed failover record")
        return
    if not (isinstance(traceparent, str) and valid_traceparent(traceparent)):
        traceparent = None
    if not (isinstance(failover_id, str) and 0 < len(failover_id) <= _MAX_ID):
        failover_id = None
    if isinstance(member, str) and 0 < len(member) <= 253 and (traceparent or failover_id):
        tracer.failover(member, traceparent, failover_id)
