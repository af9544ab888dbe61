"""A process's streams and their commits (:mod:`meshxl.streams.host`) without a network:
the sidecar's compare-and-set is played in memory (a write whose If-Match is not the
session's ETag is refused with 412, as the sidecar refuses it), so what the host writes,
and in which order, is seen write by write."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

from meshxl.client import Upsert, Written
from meshxl.client.errors import SidecarPreconditionFailed
from meshxl.local.wait import wait_until
from meshxl.streams.host import StreamHost
from meshxl.streams.protocol import Payload, Refusal
from meshxl.streams.server import ServerStream


class Sessions:
    """The sidecar's writes, in memory: each answered after a turn of the loop."""

    def __init__(self) -> None:
        self.states: dict[str, tuple[Any, str]] = {}
        self.revision = 0
        self.refused: list[SidecarPreconditionFailed] = []

    def _write(self, session: str, state: bytes, if_match: str | None,
               create_only: bool) -> Written | SidecarPreconditionFailed:
        current = self.states.get(session)
        if (create_only and current is not None) or (
                if_match is not None and (current is None or current[1] != if_match)):
            refused = SidecarPreconditionFailed(
                f"session {session!r} is at {current[1] if current else 'none'}, not "
                f"{if_match}", status=412)
            self.refused.append(refused)
            return refused
        self.revision += 1
        etag = f'"{self.revision}"'
        self.states[session] = (json.loads(bytes(state)), etag)
        return Written(session=session, etag=etag, owner="m", created=current is None,
                       takeover=False, replicated=True)

    async def put(self, session: str, state: bytes, *, content_type: str | None = None,
                  create_only: bool = False, if_match: str | None = None,
                  sync_now: bool = False) -> Written:
        await asyncio.sleep(0)
        answer = self._write(session, state, if_match, create_only)
        if isinstance(answer, SidecarPreconditionFailed):
            raise answer
        return answer

    async def bulk_save(self, items: Sequence[Upsert]
                        ) -> list[Written | SidecarPreconditionFailed]:
        await asyncio.sleep(0)
        return [self._write(i.session, i.state, i.if_match, i.create_only) for i in items]


class Conduit:
    def __init__(self) -> None:
        self.messages: list[tuple[int, Payload]] = []
        self.closed: list[Refusal | None] = []

    async def send_messages(self, messages: Sequence[tuple[int, Payload]],
                            ack: int | None = None, texts: Any = None) -> None:
        self.messages.extend(messages)
        if ack is not None:
            await self.send_ack(ack)

    async def send_ack(self, consumed: int) -> None:
        pass

    async def send_end(self, last: int, failure: Refusal | None) -> None:
        pass

    async def close(self, refusal: Refusal | None) -> None:
        self.closed.append(refusal)


async def echo(stream: ServerStream) -> None:
    async for message in stream:
        await stream.send({"echo": message})


async def test_messages_handled_back_to_back_make_one_write_at_a_time() -> None:
    """A handler that consumes several messages in one turn of the loop asks for a
    commit after each: the stream must still have one write in flight at a time. Two
    writes naming the same If-Match would refuse one of them (412), which the host takes
    for a takeover elsewhere: it would close the stream's connection (moved) and its
    client would resume for nothing."""
    sessions = Sessions()
    host = StreamHost(sessions)  # type: ignore[arg-type]
    conduit = Conduit()
    stream = await host.open("s", "websocket", echo, conduit)
    for seq in range(1, 6):
        stream.received(seq, seq)
    await wait_until(lambda: stream.record.consumed == 5 or stream.stopped is not None,
                     timeout=5, what="the five messages committed")
    assert sessions.refused == []
    assert stream.stopped is None and conduit.closed == []
    assert conduit.messages == [(seq, {"echo": seq}) for seq in range(1, 6)]
    assert host.live == {stream.token: stream}
    await host.aclose()


class AckConduit(Conduit):
    def __init__(self) -> None:
        super().__init__()
        self.acks: list[int] = []

    async def send_ack(self, consumed: int) -> None:
        self.acks.append(consumed)


class CarryConduit(Conduit):
    """Records each send: ("messages", seqs, ack) and ("ack", n)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, ...]] = []

    async def send_messages(self, messages: Sequence[tuple[int, Payload]],
                            ack: int | None = None, texts: Any = None) -> None:
        self.messages.extend(messages)
        self.calls.append(("messages", [seq for seq, _ in messages], ack))

    async def send_ack(self, consumed: int) -> None:
        self.calls.append(("ack", consumed))


async def test_an_answer_carries_the_acknowledgement_of_what_it_answers() -> None:
    """What a client message caused and its consumption are one commit; they reach the
    client together (one frame over a WebSocket), not as a message and an ``a`` frame."""
    host = StreamHost(Sessions())  # type: ignore[arg-type]
    conduit = CarryConduit()
    stream = await host.open("s", "websocket", echo, conduit)
    stream.received(1, {"hi": 1})
    await wait_until(lambda: conduit.messages, timeout=5, what="the answer sent")
    stream.received(2, {"hi": 2})
    await wait_until(lambda: len(conduit.messages) == 2, timeout=5, what="the second")
    await stream.idle()
    assert conduit.calls == [("messages", [1], 1), ("messages", [2], 2)], conduit.calls
    await host.aclose()


async def test_a_stream_that_only_pushes_acknowledges_once_per_connection() -> None:
    """Each commit told the client what the handler had consumed, also when nothing new
    was: a frame per commit for nothing in a stream that only pushes (tokens, prices).
    An acknowledgement now goes when what was consumed changed, and once on each new
    connection."""
    sessions = Sessions()
    host = StreamHost(sessions)  # type: ignore[arg-type]
    go = asyncio.Event()

    async def push(stream: ServerStream) -> None:
        for n in range(1, 4):
            await go.wait()
            go.clear()
            await stream.send({"n": n})
        await echo(stream)

    conduit = AckConduit()
    stream = await host.open("s", "websocket", push, conduit)
    for n in range(1, 4):
        go.set()
        await wait_until(lambda n=n: len(conduit.messages) == n, timeout=5,  # type: ignore[misc]
                         what=f"pushed message {n} sent")
        await stream.idle()
    assert conduit.acks == [0], conduit.acks
    again = AckConduit()
    assert stream.attach(again, 3) == []
    assert again.acks == []
    stream.received(1, {"hi": 1})  # the client speaks: what was consumed changes
    await wait_until(lambda: again.acks == [1], timeout=5, what="the new consumed acknowledged")
    assert again.messages == [(4, {"echo": {"hi": 1}})] and conduit.acks == [0]
    await host.aclose()


async def test_streams_marked_while_their_commit_is_in_flight_wait_outside_the_queue(
        ) -> None:
    """Many streams, each asking for a commit with every message, most with one in
    flight: the queue holds only those that can go (each mark walked every stream
    waiting), and each is committed again once its write lands, none forgotten."""
    sessions = Sessions()
    host = StreamHost(sessions, max_batch=4, max_inflight=1)  # type: ignore[arg-type]
    streams = [await host.open(f"s{i}", "websocket", echo, Conduit()) for i in range(12)]
    most = 0
    for seq in range(1, 9):
        for stream in streams:
            stream.received(seq, seq)
        await asyncio.sleep(0)
        most = max(most, len(host._dirty))
        assert not any(s.committing for s in host._dirty.values())
    await wait_until(lambda: all(s.record.consumed == 8 for s in streams), timeout=5,
                     what="every message of every stream committed")
    assert sessions.refused == [] and all(s.stopped is None for s in streams)
    assert most <= len(streams)
    await host.aclose()
