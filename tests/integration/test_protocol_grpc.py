"""gRPC through the real Envoy: the demo's gRPC counter (three members, each with its
statesync sidecar and meshxl's gRPC session interceptor), high availability.

Envoy speaks HTTP/2 to the members and checks them with grpc.health.v1; unary calls
survive a kill -9 of the active member with none failed and no acknowledged write lost;
server streams broken by the kill are re-established on the new owner, which continues
the session's count; a drained member's streams are closed once the drain window has
passed, and not before. One deployment for the module.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio

from meshxl.local import counter
from meshxl.local.deployment import CLUSTER, DemoDeployment
from meshxl.proxy.admin import EnvoyAdmin
from tests.harness.protocols import (
    deployment,
    member_down,
    no_loss,
    restart,
    traffic_around,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

DRAIN_WINDOW = 1.5
ENVOY_DRAIN = 1.0  # the local Envoy's --drain-time-s


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def grpc_deployment(tmp_path_factory: pytest.TempPathFactory,
                          ) -> AsyncIterator[DemoDeployment]:
    async with deployment(tmp_path_factory.mktemp("grpc"), "grpc",
                          drain_window=DRAIN_WINDOW) as d:
        yield d


async def test_envoy_speaks_http2_and_grpc_health_checks_to_the_members(
        grpc_deployment: DemoDeployment) -> None:
    d = grpc_deployment
    async with EnvoyAdmin(d.admin_url) as admin:
        cluster = (await admin.dynamic_clusters())[CLUSTER]
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in options["explicit_http_config"]
    assert "grpc_health_check" in cluster["health_checks"][0]
    # Every member passed its grpc.health.v1 check (SERVING while its sidecar is ready).
    await d.wait_all_healthy()
    async with grpc.aio.insecure_channel(d.target) as channel:
        increment = channel.unary_unary(
            counter.INCREMENT, request_serializer=counter.CounterRequest.SerializeToString,
            response_deserializer=counter.CounterReply.FromString)
        first = await increment(counter.CounterRequest(), timeout=5,
                                metadata=(("x-session-id", "hello"),))
        second = await increment(counter.CounterRequest(), timeout=5,
                                 metadata=(("x-session-id", "hello"),))
    assert (first.member, first.seq, second.seq) == ("a", first.seq, first.seq + 1)


async def test_a_drained_members_streams_close_after_the_drain_window(
        grpc_deployment: DemoDeployment) -> None:
    d = grpc_deployment
    traffic, _, down_at = await traffic_around(
        d, "grpc-stream", 6, before=1.0, after=DRAIN_WINDOW + ENVOY_DRAIN + 10,
        action=lambda _: member_down(d, "a"),
        done=lambda t: len({r.session for r in t.reconnects}) == 6)
    try:
        assert not traffic.failures
        for r in traffic.reconnects:
            # Not before the window (DRAINING alone keeps a stream where it is), and
            # within Envoy's drain time after it.
            assert down_at + DRAIN_WINDOW - 0.05 <= r.broken <= (
                down_at + DRAIN_WINDOW + ENVOY_DRAIN + 2.0), (r, down_at)
            assert (r.member_before, r.member_after) == ("a", "b")
            assert r.seq_before is not None and r.seq_after is not None
            assert r.seq_after > r.seq_before
        await no_loss(d, "grpc-stream", traffic)
    finally:
        await member_down(d, "a", down=False)


async def test_kill_9_of_the_active_member_under_unary_calls_and_streams(
        grpc_deployment: DemoDeployment) -> None:
    d = grpc_deployment
    unary_done: dict[str, Any] = {}

    async def kill_under_unary(_: object) -> float:
        # Unary calls in flight at the kill, beside the streams: 100 sessions, more
        # retries at once than the retry budget's floor (64) allows unless every call in
        # flight may be retried (every one of them was on the dead member).
        unary, killed, _ = await traffic_around(
            d, "grpc", 100, before=0.5, after=3.0, action=lambda _: d.kill_member("a"),
            prefix="u")
        unary_done["traffic"] = unary
        return killed

    streams, kill, _ = await traffic_around(
        d, "grpc-stream", 10, before=2.5, after=20, action=kill_under_unary,
        done=lambda t: len({r.session for r in t.reconnects}) == 10)
    unary = unary_done["traffic"]
    try:
        assert streams.failures == 0, [(r.session, round(r.sent - kill, 3), r.error)
                                       for r in streams.records if not r.ok]
        started = min(r.sent for r in streams.records)
        # The streams lived longer than the retry policy's per-try timeout (2 s) before
        # the kill: a stream is not cut by it.
        early = [(round(r.broken - kill, 3), r.member_before, r.member_after, r.error)
                 for r in streams.reconnects if r.broken < kill]
        assert kill - started > 2.0 and not early, early
        for r in streams.reconnects:
            assert (r.member_before, r.member_after) == ("a", "b"), r
            assert r.seq_before is not None and r.seq_after is not None
            assert r.seq_after > r.seq_before  # the new owner already holds the state
        await no_loss(d, "grpc-stream", streams)
        assert unary.failures == 0, [(round(r.sent - kill, 3), r.error)
                                     for r in unary.records if not r.ok][:5]
        assert {r.member for r in unary.records if r.ok and r.sent > kill + 1.0} == {"b"}
        await no_loss(d, "grpc", unary)
        first_message_ms = sorted((r.answered - kill) * 1000 for r in streams.reconnects)
        print(f"gRPC stream: kill -> first message on the new stream, ms: "
              f"{[round(x) for x in first_message_ms]}")
        assert first_message_ms[-1] < 5000
    finally:
        await restart(d, "a")

