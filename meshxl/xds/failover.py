"""One OpenTelemetry trace per failover, from the control plane's point of view.

A failover starts when a member that was serving stops serving: its registration
ended (lease expired), it is not ready, the app reported a problem, or an operator
took it (or its site) down. The trace then follows the decision through the rebuild,
the push of the new EDS version to every connected Envoy and each Envoy's ACK; the
root span ends when the last of them ACKed (or after ``timeout``, as an error).

Beside the spans, each failover keeps its timeline (when the loss was seen, the
rebuild, each Envoy's push and answer, NACK texts included) as a JSON-able record:
:class:`FailoverTracer` hands it to ``on_change`` when the failover starts, when its
version is pushed and when it ends, and the control plane stores it in etcd for
``meshxl status`` and the live view of every replica.

Span names and attributes: :mod:`meshxl.telemetry.names` and docs/telemetry.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

from meshxl.model import MemberState, ModelSpec, RuntimeState
from meshxl.model.spec import choose
from meshxl.telemetry import names

from .history import Transition, transitions
from .types import ENDPOINT

log = logging.getLogger(__name__)

_CAUSES = {
    MemberState.LOST: "lease_expired",
    MemberState.SYNCING: "not_ready",
    MemberState.PROBLEM: "problem",
    MemberState.ADMIN_DOWN: "admin_down",
    MemberState.SITE_OFFLINE: "site_offline",
    MemberState.DEGRADED: "degraded",
}
#: Every cause a failover is counted under (``meshxl_xds_failovers_total``).
FAILOVER_CAUSES: tuple[str, ...] = tuple(_CAUSES.values())


@dataclass(frozen=True)
class Loss:
    """A member that stopped serving, as seen in one rebuild."""

    cluster: str
    member: str
    cause: str
    from_state: str
    to_state: str


TIMELINE_NODES = 50
"""Envoy nodes a failover's timeline lists one by one (the others are only counted), so
a push to a thousand Envoys stays a small record."""

_NACK_TEXT = 1024
"""Characters of a NACK text kept in a timeline."""


def _seconds(ns: int | None) -> float | None:
    return None if ns is None else round(ns / 1e9, 6)


@dataclass
class _NodeTimes:
    pushed: int
    sent: int | None = None
    answered: int | None = None
    nack: str | None = None


@dataclass
class _Failover:
    loss: Loss
    root: Span
    detect: Span | None
    detected_ns: int = 0
    revision: int | None = None
    rebuild: Span | None = None
    rebuild_ns: int | None = None
    built_ns: int | None = None
    version: str | None = None
    expected: dict[str, str] = field(default_factory=dict)
    """Nodes served another EDS version than ``version`` (their zone's), by node."""
    waiting: set[str] = field(default_factory=set)
    pushes: dict[str, Span] = field(default_factory=dict)
    acks: dict[str, Span] = field(default_factory=dict)
    deadline: float = 0.0
    nodes: dict[str, _NodeTimes] = field(default_factory=dict)
    """Per Envoy node (the first :data:`TIMELINE_NODES`): push, send and answer times."""
    nodes_total: int = 0
    acked: int = 0
    nacked: int = 0
    ended_ns: int | None = None
    outcome: str = "open"
    """``open``, ``converged`` (every Envoy answered), ``timeout`` or ``stopped``."""

    def timeline(self) -> dict[str, Any]:
        """The failover as a JSON-able record (times in seconds since the epoch)."""
        loss = self.loss
        return {
            "id": f"{loss.cluster}/{loss.member}@{self.detected_ns}",
            "cluster": loss.cluster, "member": loss.member, "cause": loss.cause,
            "from_state": loss.from_state, "to_state": loss.to_state,
            "revision": self.revision, "detected": _seconds(self.detected_ns),
            "rebuild": _seconds(self.rebuild_ns), "built": _seconds(self.built_ns),
            "version": self.version, "nodes_total": self.nodes_total,
            "acked": self.acked, "nacked": self.nacked,
            "nodes": [{"node": node, "pushed": _seconds(t.pushed), "sent": _seconds(t.sent),
                       "answered": _seconds(t.answered), "nack": t.nack}
                      for node, t in sorted(self.nodes.items())],
            "ended": _seconds(self.ended_ns), "outcome": self.outcome,
        }


def losses(model: ModelSpec, before: RuntimeState, after: RuntimeState,
           seen: list[Transition] | None = None) -> list[Loss]:
    """Members that served before and do not now (pure; cheap when nothing changed).

    ``seen``: the :func:`~meshxl.xds.history.transitions` already computed for the
    same states, to avoid computing them twice.
    """
    if seen is None:
        seen = transitions(model, before, after)
    # A registered member that is not listed in the model leaves the view when its
    # registration ends: that is its lease ending too.
    return [Loss(c.cluster, c.member, choose(_CAUSES, MemberState(c.to_state), "member state"),
                 c.from_state, c.to_state) for c in seen if c.failover]


class FailoverTracer:
    """Follows each loss through rebuild, push and ACK. Single event loop; no I/O."""

    def __init__(self, *, connected: Callable[[], dict[str, str | None]],
                 timeout: float = 10.0,
                 on_change: Callable[[Loss, Span, dict[str, Any]], None] | None = None,
                 tracer_provider: trace.TracerProvider | None = None):
        """``on_change(loss, root_span, timeline)``: called when a failover starts, when
        its version is pushed and when it ends (no I/O in it: it runs on the push path)."""
        self._connected = connected
        self._timeout = timeout
        self._on_change = on_change
        self._tracer = trace.get_tracer("meshxl.xds", tracer_provider=tracer_provider)
        self._open: list[_Failover] = []
        self.started = 0
        self.untraced = 0
        """Losses seen while no Envoy was connected to this replica (not traced)."""

    @property
    def open(self) -> int:
        return len(self._open)

    def detected(self, found: list[Loss], seen_ns: int, revision: int | None) -> None:
        """Start a trace per loss; ``seen_ns`` is when the change was first seen.

        A replica with no Envoy connected traces nothing: with several replicas, the
        failover is traced by the one(s) whose Envoys must converge, not once per replica.
        """
        if found and not self._connected():
            self.untraced += len(found)
            return
        for loss in found:
            attrs: dict[str, str | int] = {names.CLUSTER: loss.cluster, names.MEMBER: loss.member,
                                           names.CAUSE: loss.cause,
                                           names.FROM_STATE: loss.from_state,
                                           names.TO_STATE: loss.to_state}
            if revision is not None:
                attrs[names.ETCD_REVISION] = revision
            root = self._tracer.start_span(names.FAILOVER, start_time=seen_ns,
                                           attributes=attrs, context=None,
                                           kind=trace.SpanKind.INTERNAL)
            ctx = trace.set_span_in_context(root)
            detect = self._tracer.start_span(names.FAILOVER_DETECT, context=ctx,
                                             start_time=seen_ns, attributes=attrs)
            f = _Failover(loss, root, detect, detected_ns=seen_ns, revision=revision)
            self._open.append(f)
            self.started += 1
            log.info("failover: %s/%s %s (%s -> %s)", loss.cluster, loss.member, loss.cause,
                     loss.from_state, loss.to_state)
            self._changed(f)

    def _changed(self, f: _Failover) -> None:
        if self._on_change is not None:
            self._on_change(f.loss, f.root, f.timeline())

    def rebuilding(self) -> None:
        now = time.time_ns()
        for f in self._open:
            if f.detect is not None:
                f.detect.end(end_time=now)
                f.detect = None
                f.rebuild = self._tracer.start_span(
                    names.FAILOVER_REBUILD, context=trace.set_span_in_context(f.root),
                    start_time=now)
                f.rebuild_ns = now

    def built(self, version: str, changed: bool,
              expected: Mapping[str, str] | None = None) -> None:
        """The snapshot with ``version`` (EDS) is about to be served; ``expected``: the
        nodes served another version (their zone's variant), by node."""
        now = time.time_ns()
        acked = self._connected()  # connected node -> the EDS version it ACKed last
        expected = dict(expected or {})
        nodes = {node for node, have in acked.items()
                 if have != expected.get(node, version)}
        for f in self._open:
            if f.rebuild is not None:
                f.rebuild.set_attribute(names.VERSION, version)
                f.rebuild.end(end_time=now)
                f.rebuild = None
                f.built_ns = now
            if not changed and f.version is not None:
                continue
            f.version, f.expected = version, expected
            f.root.set_attribute(names.VERSION, version)
            f.root.set_attribute(names.NODES, len(acked))
            f.waiting = set(nodes)
            f.deadline = time.monotonic() + self._timeout
            f.nodes_total, f.acked, f.nacked = len(nodes), 0, 0
            f.nodes = {node: _NodeTimes(now) for node in sorted(nodes)[:TIMELINE_NODES]}
            ctx = trace.set_span_in_context(f.root)
            for node in nodes:
                if node not in f.pushes:
                    f.pushes[node] = self._tracer.start_span(
                        names.FAILOVER_PUSH, context=ctx, start_time=now,
                        attributes={names.NODE: node, names.TYPE_URL: ENDPOINT,
                                    names.VERSION: expected.get(node, version)})
            if f.waiting:
                self._changed(f)  # pushed: the timeline shows who it waits for
        self._close_finished()

    def _awaiting(self, node: str, type_url: str, version: str) -> list[_Failover]:
        """Open failovers waiting for ``node`` to get (or answer) EDS ``version``."""
        if type_url != ENDPOINT or not self._open:
            return []
        return [f for f in self._open if node in f.waiting
                and f.expected.get(node, f.version) == version]

    def sent(self, node: str, type_url: str, version: str, _error: str | None) -> None:
        now = time.time_ns()
        for f in self._awaiting(node, type_url, version):
            push = f.pushes.pop(node, None)
            if push is not None:
                push.end(end_time=now)
            times = f.nodes.get(node)
            if times is not None and times.sent is None:
                times.sent = now
            if node not in f.acks:
                f.acks[node] = self._tracer.start_span(
                    names.FAILOVER_ACK, context=trace.set_span_in_context(f.root),
                    start_time=now, attributes={names.NODE: node, names.VERSION: version,
                                                names.TYPE_URL: ENDPOINT})

    def answered(self, node: str, type_url: str, version: str, error: str | None) -> None:
        awaiting = self._awaiting(node, type_url, version)
        if not awaiting:
            return
        now = time.time_ns()
        for f in awaiting:
            ack = f.acks.pop(node, None)
            if ack is not None:
                if error:
                    ack.set_status(Status(StatusCode.ERROR, f"NACK: {error}"))
                ack.end(end_time=now)
            if node in f.waiting:
                f.waiting.discard(node)
                if error:
                    f.nacked += 1
                else:
                    f.acked += 1
                times = f.nodes.get(node)
                if times is not None:
                    times.answered = now
                    times.nack = error[:_NACK_TEXT] if error else None
        self._close_finished()

    def tick(self) -> None:
        """End failovers whose Envoys did not all ACK in time (called periodically)."""
        self._close_finished()

    def _close_finished(self) -> None:
        now_mono, now = time.monotonic(), time.time_ns()
        still = []
        for f in self._open:
            if f.version is None:
                still.append(f)
                continue
            timed_out = now_mono > f.deadline and bool(f.waiting)
            if f.waiting and not timed_out:
                still.append(f)
                continue
            for span in [*f.pushes.values(), *f.acks.values()]:
                span.set_status(Status(StatusCode.ERROR, "no ACK before the deadline"))
                span.end(end_time=now)
            if timed_out:
                f.root.set_status(Status(StatusCode.ERROR,
                                         f"{len(f.waiting)} Envoy node(s) did not ACK "
                                         f"within {self._timeout:g}s"))
            f.root.end(end_time=now)
            f.ended_ns, f.outcome = now, "timeout" if timed_out else "converged"
            self._changed(f)
        self._open = still

    def close(self) -> None:
        for f in self._open:
            f.root.set_status(Status(StatusCode.ERROR, "control plane stopped"))
            f.root.end()
        self._open = []


__all__ = ["FailoverTracer", "Loss", "losses"]
