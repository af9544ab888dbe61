"""Failover and takeover tracing, with an in-memory exporter (no processes)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from meshxl.model import AdminAction, Registration, RuntimeState, parse_model
from meshxl.statesync.tracing import (
    SUMMARY_FAILOVERS,
    SUMMARY_TIMES,
    TakeoverTracer,
    follow_failovers,
)
from meshxl.statesync.writes import Takeover
from meshxl.telemetry import names
from meshxl.xds.failover import TIMELINE_NODES, FailoverTracer, losses
from meshxl.xds.types import CLUSTER, ENDPOINT

MODEL = parse_model("""
clusters:
  - name: c
    membership: registered
    members:
      - {name: a, address: 127.0.0.1, port: 8001}
      - {name: b, address: 127.0.0.1, port: 8002}
  - name: other
    members: [{name: x, address: 127.0.0.1, port: 8003}]
""")
BOTH = RuntimeState(registrations={("c", "a"): Registration("127.0.0.1", 8001),
                                   ("c", "b"): Registration("127.0.0.1", 8002)})


@pytest.fixture
def exporter() -> tuple[TracerProvider, InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return provider, memory


@pytest.mark.parametrize("after,cause", [
    (RuntimeState(registrations={("c", "b"): Registration("127.0.0.1", 8002)}),
     "lease_expired"),
    (RuntimeState(registrations={**BOTH.registrations,
                                 ("c", "a"): Registration("127.0.0.1", 8001, ready=False)}),
     "not_ready"),
    (RuntimeState(registrations={**BOTH.registrations,
                                 ("c", "a"): Registration("127.0.0.1", 8001, problems=("db",))}),
     "problem"),
    (RuntimeState(registrations=BOTH.registrations,
                  members_down={("c", "a"): AdminAction()}), "admin_down"),
    (RuntimeState(registrations=BOTH.registrations,
                  sites_offline={"default": AdminAction()}), "site_offline"),
])
def test_losses_name_the_member_and_the_cause(after: RuntimeState, cause: str) -> None:
    found = losses(MODEL, BOTH, after)
    assert [(loss.cluster, loss.member, loss.cause) for loss in found][0] == ("c", "a", cause)
    if cause != "site_offline":  # a site going offline takes every member of it
        assert len(found) == 1


def test_no_loss_when_nothing_stops_serving() -> None:
    assert losses(MODEL, BOTH, BOTH) == []
    joined = RuntimeState(registrations={**BOTH.registrations,
                                         ("c", "z"): Registration("127.0.0.1", 8009)})
    assert losses(MODEL, BOTH, joined) == []  # a member joining is no failover
    assert losses(MODEL, RuntimeState(), BOTH) == []  # nor is a member becoming ready


def test_a_failover_trace_follows_rebuild_push_and_ack(exporter) -> None:  # type: ignore[no-untyped-def]
    provider, memory = exporter
    acked: dict[str, str | None] = {"n1": "v0", "n2": "v0"}
    tracer = FailoverTracer(connected=lambda: dict(acked), tracer_provider=provider)
    loss = losses(MODEL, BOTH, RuntimeState(registrations={
        ("c", "b"): Registration("127.0.0.1", 8002)}))
    tracer.detected(loss, time.time_ns(), revision=42)
    tracer.rebuilding()
    tracer.built("v1", changed=True)
    tracer.sent("n1", CLUSTER, "c1", None)  # other types are not followed
    for node in ("n1", "n2"):
        tracer.sent(node, ENDPOINT, "v1", None)
    tracer.answered("n1", ENDPOINT, "v1", None)
    assert tracer.open == 1  # n2 has not ACKed yet
    tracer.answered("n2", ENDPOINT, "v1", "bad cluster")  # a NACK ends it too, as an error
    assert tracer.open == 0
    spans = {(s.name, s.attributes.get(names.NODE)): s for s in memory.get_finished_spans()}
    root = spans[(names.FAILOVER, None)]
    assert root.attributes[names.MEMBER] == "a"
    assert root.attributes[names.CAUSE] == "lease_expired"
    assert root.attributes[names.ETCD_REVISION] == 42
    assert root.attributes[names.NODES] == 2
    for name in (names.FAILOVER_DETECT, names.FAILOVER_REBUILD):
        assert spans[(name, None)].parent.span_id == root.context.span_id
    for node in ("n1", "n2"):
        push, ack = spans[(names.FAILOVER_PUSH, node)], spans[(names.FAILOVER_ACK, node)]
        assert push.end_time <= ack.start_time + 1  # causal order
        assert ack.parent.span_id == root.context.span_id
    assert spans[(names.FAILOVER_ACK, "n2")].status.status_code == StatusCode.ERROR
    assert root.end_time >= spans[(names.FAILOVER_ACK, "n2")].end_time


def test_the_timeline_follows_the_failover_and_keeps_nack_texts() -> None:
    """What the control plane stores in etcd for ``meshxl status`` and the live view:
    the timeline when the failover starts, when it is pushed and when it ends."""
    acked: dict[str, str | None] = {f"n{i:02d}": "v0" for i in range(60)}
    records: list[dict[str, Any]] = []
    tracer = FailoverTracer(connected=lambda: dict(acked),
                            on_change=lambda loss, root, timeline: records.append(timeline))
    seen = time.time_ns()
    tracer.detected(losses(MODEL, BOTH, RuntimeState(registrations={
        ("c", "b"): Registration("127.0.0.1", 8002)})), seen, revision=7)
    assert len(records) == 1
    started = records[0]
    assert (started["cluster"], started["member"], started["cause"]) == (
        "c", "a", "lease_expired")
    assert started["detected"] == round(seen / 1e9, 6) and started["revision"] == 7
    assert started["outcome"] == "open" and started["version"] is None
    assert started["id"] == f"c/a@{seen}"

    tracer.rebuilding()
    tracer.built("v1", changed=True)
    pushed = records[-1]
    assert len(records) == 2 and pushed["version"] == "v1"
    assert pushed["detected"] <= pushed["rebuild"] <= pushed["built"]
    assert pushed["nodes_total"] == 60 and len(pushed["nodes"]) == TIMELINE_NODES
    assert all(n["pushed"] == pushed["built"] and n["answered"] is None
               for n in pushed["nodes"])

    nack = "cluster c: " + "x" * 5000
    for node in acked:
        tracer.sent(node, ENDPOINT, "v1", None)
        tracer.answered(node, ENDPOINT, "v1", nack if node == "n00" else None)
    ended = records[-1]
    assert len(records) == 3 and tracer.open == 0
    assert ended["outcome"] == "converged" and ended["ended"] >= ended["built"]
    assert (ended["acked"], ended["nacked"]) == (59, 1)
    first = ended["nodes"][0]
    assert first["node"] == "n00" and first["nack"] == nack[:1024]
    assert first["pushed"] <= first["sent"] <= first["answered"]
    assert ended["nodes"][1]["nack"] is None
    json.dumps(ended)  # stored as JSON


def test_a_timeline_that_times_out_says_so() -> None:
    records: list[dict[str, Any]] = []
    tracer = FailoverTracer(connected=lambda: {"n1": None}, timeout=0.0,
                            on_change=lambda loss, root, timeline: records.append(timeline))
    tracer.detected(losses(MODEL, BOTH, RuntimeState()), time.time_ns(), None)
    tracer.rebuilding()
    tracer.built("v9", changed=True)
    time.sleep(0.001)
    tracer.tick()
    assert {r["outcome"] for r in records[-2:]} == {"timeout"}
    assert records[-1]["acked"] == 0 and records[-1]["nodes"][0]["answered"] is None


def test_nodes_that_already_have_the_version_are_not_waited_for(exporter) -> None:  # type: ignore[no-untyped-def]
    provider, memory = exporter
    tracer = FailoverTracer(connected=lambda: {"n1": "v1"}, tracer_provider=provider)
    tracer.detected(losses(MODEL, BOTH, RuntimeState()), time.time_ns(), None)
    tracer.rebuilding()
    tracer.built("v1", changed=False)
    assert tracer.open == 0
    assert any(s.name == names.FAILOVER for s in memory.get_finished_spans())


def test_a_replica_without_envoys_traces_nothing(exporter) -> None:  # type: ignore[no-untyped-def]
    """With several replicas, only those whose Envoys must converge trace a failover."""
    provider, memory = exporter
    started: list[str] = []
    tracer = FailoverTracer(connected=dict, tracer_provider=provider,
                            on_change=lambda loss, _root, _t: started.append(loss.member))
    tracer.detected(losses(MODEL, BOTH, RuntimeState()), time.time_ns(), None)
    tracer.rebuilding()
    tracer.built("v2", changed=True)
    assert tracer.open == 0 and tracer.started == 0 and tracer.untraced == 2
    assert memory.get_finished_spans() == () and started == []


def test_a_missing_ack_ends_the_failover_as_an_error(exporter) -> None:  # type: ignore[no-untyped-def]
    provider, memory = exporter
    tracer = FailoverTracer(connected=lambda: {"n1": None}, timeout=0.0,
                            tracer_provider=provider)
    tracer.detected(losses(MODEL, BOTH, RuntimeState()), time.time_ns(), None)
    tracer.rebuilding()
    tracer.built("v9", changed=True)
    time.sleep(0.001)
    tracer.tick()
    root = next(s for s in memory.get_finished_spans() if s.name == names.FAILOVER)
    assert root.status.status_code == StatusCode.ERROR
    assert "did not ACK" in (root.status.description or "")


def test_takeovers_join_the_failover_whenever_it_appears(exporter) -> None:  # type: ignore[no-untyped-def]
    provider, memory = exporter
    takeovers = TakeoverTracer("c", "b", tracer_provider=provider)
    now = time.time_ns()
    previous = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    takeovers.record(Takeover("s1", "a", "b", now, now + 3_000_000, previous))
    failover = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    takeovers.failover("a", failover)  # published after the takeover (the usual order)
    takeovers.failover("a", failover)  # seen again after a watch resumed: no duplicate
    takeovers.record(Takeover("s2", "a", "b", now, now + 1_000_000, None))  # a late one
    takeovers.record(Takeover("s3", "x", "b", now, now + 1_000_000, None))  # another owner
    spans = memory.get_finished_spans()
    request = [s for s in spans if s.name == names.SESSION_TAKEOVER]
    joined = [s for s in spans if s.name == names.FAILOVER_TAKEOVER]
    assert len(request) == 3
    assert sorted(s.attributes[names.SESSION] for s in joined) == ["s1", "s2"]
    for span in joined:
        assert format(span.context.trace_id, "032x") == "a" * 32
        assert format(span.parent.span_id, "016x") == "b" * 16
        assert len(span.links) == 1  # back to the request trace's takeover span
    s1 = next(s for s in request if s.attributes[names.SESSION] == "s1")
    assert format(s1.links[0].context.trace_id, "032x") == "1" * 32  # previous owner's write
    assert (s1.end_time - s1.start_time) == 3_000_000


def test_takeovers_are_summed_up_per_failover_with_or_without_tracing() -> None:
    """The sync statistics carry each failover's takeovers, whether the control plane
    exports spans (a trace context) or not (only the failover's id)."""
    takeovers = TakeoverTracer("c", "b")  # no tracer provider: spans record nothing
    now = time.time_ns()
    for i in range(40):
        takeovers.record(Takeover(f"s{i}", "a", "b", now + i * 1000, now + i * 2000, None))
    takeovers.record(Takeover("t", "x", "b", now, now + 1000, None))  # another member's
    takeovers.failover("a", None, "c/a@1")
    takeovers.failover("a", None, "c/a@1")  # the record rewritten: nothing counted twice
    takeovers.record(Takeover("late", "a", "b", now + 10**9, now + 2 * 10**9, None))
    [summary] = takeovers.summary()
    assert summary["failover"] == "c/a@1" and summary["member"] == "a"
    assert summary["count"] == 41 and len(summary["times"]) == SUMMARY_TIMES
    assert summary["first"] == round(now / 1e9, 6)
    assert summary["last"] == round((now + 2 * 10**9) / 1e9, 6)
    assert takeovers.failover("x", None) is None  # neither id nor trace: ignored
    assert len(takeovers.summary()) == 1
    for k in range(SUMMARY_FAILOVERS + 3):  # only the latest failovers are kept
        takeovers.failover("a", None, f"c/a@{k + 2}")
    assert len(takeovers.summary()) == SUMMARY_FAILOVERS


def test_an_unlisted_registered_member_whose_lease_ends_is_lease_expired() -> None:
    model = parse_model("clusters: [{name: d, membership: registered}]")
    before = RuntimeState(registrations={("d", "m"): Registration("127.0.0.1", 9000)})
    (loss,) = losses(model, before, RuntimeState())
    assert (loss.member, loss.cause) == ("m", "lease_expired")


class _Stop(BaseException):
    """Ends a follower that went on after its cancellation (so the test fails, not hangs)."""


class _BrokenWatch:
    """A watch that yields nothing, and whose cancel fails as a closing gRPC stream's may
    (``Stream removed``)."""

    def __init__(self, stop: asyncio.Event):
        self.stop = stop

    def __aiter__(self) -> Any:
        return self

    async def __anext__(self) -> Any:
        await self.stop.wait()
        raise _Stop

    async def cancel(self) -> None:
        raise RuntimeError("Stream removed")


class _Client:
    def __init__(self) -> None:
        self.watches = 0
        self.watching = asyncio.Event()
        self.stop = asyncio.Event()

    async def get_prefix(self, _prefix: bytes) -> Any:
        if self.stop.is_set():
            raise _Stop

        class Got(list[Any]):
            header = type("Header", (), {"revision": 1})()
        return Got()

    async def watch_prefix(self, _prefix: bytes, start_revision: int) -> _BrokenWatch:
        self.watches += 1
        self.watching.set()
        return _BrokenWatch(self.stop)


async def test_following_failovers_stops_when_cancelled_even_if_the_watch_cannot_close() -> None:
    """The sidecar stops its tasks by cancelling them and waiting: a failure closing the
    watch must not turn the cancellation into a retry (the sidecar never stopped)."""
    client: Any = _Client()
    task = asyncio.create_task(follow_failovers(client, "/f/", TakeoverTracer("c", "a")))
    async with asyncio.timeout(2):
        await client.watching.wait()
    await asyncio.sleep(0)  # in the watch
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=2)
    client.stop.set()
    with pytest.raises((asyncio.CancelledError, _Stop)):
        await task
    assert done and task.cancelled(), "the cancelled follower went on watching"
    assert client.watches == 1
