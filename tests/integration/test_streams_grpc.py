"""Resumable gRPC streams through the real Envoy (docs/streams.md): the demo's tally
services (:mod:`meshxl.demo.tally`: ``Talk``, bidirectional; ``Ticks``,
server-streaming) on a high-availability cluster of three members, each with its
statesync sidecar, and meshxl's gRPC stream client: a kill -9 of the member serving
the streams, every message once, in order. One deployment for the module.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from meshxl import headers as hdr
from meshxl.local.deployment import DemoDeployment
from meshxl.local.tallies import ProtoTally
from meshxl.local.wait import wait_until
from meshxl.streams import ClientStream
from tests.harness.protocols import deployment, restart
from tests.integration.test_streams import Tally

pytestmark = [pytest.mark.integration, pytest.mark.heavy, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def grpc_streams_deployment(tmp_path_factory: pytest.TempPathFactory,
                                  ) -> AsyncIterator[DemoDeployment]:
    async with deployment(tmp_path_factory.mktemp("grpc-streams"), "grpc") as d:
        yield d


async def test_grpc_streams_survive_a_kill_9_of_their_member_exactly_once(
        grpc_streams_deployment: DemoDeployment) -> None:
    """Both kinds of gRPC stream: bidirectional (the tally) and server-streaming (ticks
    whose count is the stream's state): every message once, in order, after the kill."""
    from grpc import aio

    from meshxl.local import counter
    from meshxl.streams.grpcio import connect_grpc

    d = grpc_streams_deployment
    rng = random.Random(11)
    async with aio.insecure_channel(d.target) as channel:
        talks: list[Tally] = []
        ticks: list[ClientStream] = []
        for i in range(6):
            session = f"grpc-{i}"
            talk = connect_grpc(channel, counter.TALK, request_type=counter.TallyRequest,
                                response_type=counter.TallyReply,
                                metadata=[(hdr.SESSION, session)], resume_timeout=20)
            talks.append(Tally(session, await asyncio.wait_for(talk.start(), 15)))
            tick = connect_grpc(channel, counter.TICKS, response_type=counter.TallyReply,
                                request=counter.WatchRequest(interval_ms=30, count=80),
                                metadata=[(hdr.SESSION, session)], resume_timeout=20)
            ticks.append(await asyncio.wait_for(tick.start(), 15))
        for t in talks:
            t.stream = ProtoTally(t.stream)  # type: ignore[assignment]
        victim = ""
        try:
            runs = [asyncio.create_task(t.talk(40, 0.03, rng)) for t in talks]
            await wait_until(lambda: all(len(t.answers) >= 8 for t in talks), timeout=20,
                             what="8 answers on every gRPC stream")
            served = {t.answers[-1]["member"] for t in talks}
            assert len(served) == 1, served
            victim = served.pop()
            await d.kill_member(victim)
            await asyncio.wait_for(asyncio.gather(*runs), 60)
            for t in talks:
                t.check()
                assert t.answers[-1]["member"] != victim
            for stream in ticks:
                got = [m async for m in stream]
                assert [m.seq for m in got] == list(range(1, 81)), [m.seq for m in got]
                assert got[-1].member != victim and stream.connections >= 2
        finally:
            for t in talks:
                await t.stream.aclose()
            for stream in ticks:
                await stream.aclose()
            if victim:
                await restart(d, victim)
