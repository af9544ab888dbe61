"""A resumable stream's server side without a network: what a handler's sends commit and
when (the exactly-once rule), acknowledgements and the lag limit, duplicates and gaps
from the client. The host's commit is played by the test (no sidecar, no socket)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from meshxl.streams.protocol import (
    ACK,
    MESSAGE,
    TOO_FAR_BEHIND,
    Frame,
    Limits,
    ProtocolError,
    decode_binary,
    decode_frame,
)
from meshxl.streams.record import StreamRecord
from meshxl.streams.server import ServerStream, StreamClosed
from meshxl.streams.websocket import _Conduit as WebSocketConduit


class Host:
    """Records which streams asked for a commit, and commits on demand."""

    def __init__(self) -> None:
        self.dirty: list[ServerStream] = []
        self.stopped: list[ServerStream] = []

    def stream(self, limits: Limits | None = None, record: StreamRecord | None = None
               ) -> ServerStream:
        return ServerStream("A" * 22, record or StreamRecord(session="s", kind="websocket"),
                            '"1"', limits or Limits(), self.dirty.append,
                            self.stopped.append, resumed=record is not None)

    async def commit(self, stream: ServerStream) -> StreamRecord:
        """The record committed, as etcd holds it (what a takeover reads)."""
        record, _ = stream.take()
        await stream.committed(record, '"2"')
        return StreamRecord.decode(record.encode())


async def test_a_push_outside_any_client_message_is_committed_at_once() -> None:
    host = Host()
    stream = host.stream()
    await stream.send({"tick": 1})
    assert host.dirty == [stream]
    record = await host.commit(stream)
    assert (record.out, [p for _, p in record.journal]) == (1, [{"tick": 1}])


async def test_what_a_message_caused_is_committed_with_its_consumption_only() -> None:
    """The exactly-once rule: replies sent while handling client message 1 wait until
    the handler asks for message 2; a member dying before that commit leaves nothing,
    and the next one handles message 1 again."""
    host = Host()
    stream = host.stream()
    stream.received(1, {"n": 1})
    stream.received(2, {"n": 2})
    assert await stream.receive() == {"n": 1}
    await stream.send({"reply": 1})
    assert not stream.wants_commit  # held: message 1 is still being handled
    assert await stream.receive() == {"n": 2}
    record = await host.commit(stream)
    assert (record.consumed, record.out) == (1, 1)  # message 1 and its reply, together
    await stream.send({"reply": 2})
    assert not stream.wants_commit


async def test_a_send_with_state_is_a_checkpoint_inside_a_message() -> None:
    """Tokens of a long answer: each send with a state commits what was sent so far and
    the state, and leaves the message unconsumed (a takeover handles it again, from the
    state)."""
    host = Host()
    stream = host.stream()
    stream.received(1, "prompt")
    await stream.receive()
    await stream.send("tok-1", state={"emitted": 1})
    record = await host.commit(stream)
    assert (record.consumed, record.out, record.state) == (0, 1, {"emitted": 1})
    taken_over = host.stream(record=record)
    assert taken_over.resumed and taken_over.state == {"emitted": 1}
    taken_over.received(1, "prompt")  # the client sends it again: not consumed
    assert await taken_over.receive() == "prompt"


async def test_the_committed_state_is_a_copy() -> None:
    host = Host()
    stream = host.stream()
    state: dict[str, Any] = {"total": 1}
    stream.state = state
    await stream.send("x")
    state["total"] = 99  # changed after the checkpoint: not what was committed
    record = await host.commit(stream)
    assert record.state == {"total": 1}


async def test_a_client_message_received_twice_is_handled_once() -> None:
    host = Host()
    stream = host.stream()
    stream.received(1, "a")
    stream.received(1, "a")  # sent again after a resume
    stream.received(2, "b")
    assert [await stream.receive(), await stream.receive()] == ["a", "b"]
    with pytest.raises(ProtocolError, match="gap"):
        stream.received(5, "e")


async def test_acknowledged_messages_leave_the_journal() -> None:
    host = Host()
    stream = host.stream()
    for i in range(3):
        await stream.send(i)
    await host.commit(stream)
    stream.acked(2)
    await stream.send(3)
    record = await host.commit(stream)
    assert [s for s, _ in record.journal] == [3, 4] and record.acked == 2
    with pytest.raises(ProtocolError):
        stream.acked(9)  # never sent


async def test_a_client_that_does_not_acknowledge_is_given_up_after_the_lag_timeout() -> None:
    host = Host()
    stream = host.stream(Limits(max_unacked_bytes=10, max_message_bytes=10, lag_timeout=0.05))
    await stream.send("12345678")  # 10 bytes as JSON: the window is full
    with pytest.raises(StreamClosed):
        await stream.send("x")
    assert stream.stopped is TOO_FAR_BEHIND and host.stopped == [stream]


async def test_an_acknowledgement_lets_a_waiting_send_go() -> None:
    host = Host()
    stream = host.stream(Limits(max_unacked_bytes=10, max_message_bytes=10, lag_timeout=5))
    await stream.send("12345678")
    waiting = asyncio.create_task(stream.send("x"))
    await asyncio.sleep(0)
    assert not waiting.done()
    stream.acked(1)
    async with asyncio.timeout(1):
        assert await waiting == 2


async def test_a_message_over_the_limit_is_refused_before_it_is_sent() -> None:
    stream = Host().stream(Limits(max_message_bytes=8, max_unacked_bytes=100))
    with pytest.raises(ProtocolError):
        await stream.send("x" * 20)


async def test_the_client_closing_its_side_ends_the_iteration() -> None:
    host = Host()
    stream = host.stream()
    stream.received(1, "only")
    stream.client_ended(1)
    assert [m async for m in stream] == ["only"]


async def test_a_handler_that_returns_commits_the_end() -> None:
    host = Host()
    stream = host.stream()

    async def handler(s: ServerStream) -> None:
        await s.send("bye")

    stream.start(handler)
    await asyncio.sleep(0.01)
    record = await host.commit(stream)
    assert record.done and record.failure is None and record.out == 1


async def test_a_handler_that_fails_ends_the_stream_as_failed() -> None:
    host = Host()
    stream = host.stream()

    async def handler(s: ServerStream) -> None:
        raise RuntimeError("the application's bug")

    stream.start(handler)
    await asyncio.sleep(0.01)
    record = await host.commit(stream)
    assert record.done and record.failure == "failed"


class _Socket:
    """A WebSocket's sends, as frames."""

    def __init__(self) -> None:
        self.frames: list[Any] = []

    async def send_str(self, text: str) -> None:
        self.frames.append(decode_frame(text))

    async def send_bytes(self, data: bytes) -> None:
        self.frames.append(decode_binary(data))


async def test_a_websocket_acknowledgement_rides_on_the_last_json_message() -> None:
    ws = _Socket()
    conduit = WebSocketConduit(ws)  # type: ignore[arg-type]
    await conduit.send_messages([(1, {"x": 1}), (2, [2])], 7)
    assert ws.frames == [Frame(MESSAGE, seq=1, payload={"x": 1}),
                         Frame(MESSAGE, seq=2, payload=[2], ack=7)]
    ws.frames.clear()
    await conduit.send_messages([(3, {"x": 3}), (4, b"\x00")], 8)  # a binary frame: none
    assert ws.frames == [Frame(MESSAGE, seq=3, payload={"x": 3}), (4, b"\x00"),
                         Frame(ACK, seq=8)]
    ws.frames.clear()
    await conduit.send_messages([(5, "y")])
    await conduit.send_ack(9)
    assert ws.frames == [Frame(MESSAGE, seq=5, payload="y"), Frame(ACK, seq=9)]


class _Counted(dict[str, Any]):
    """A JSON object that counts its encodings (the encoder asks a dict subclass for its
    items each time)."""

    encodings = 0

    def items(self) -> Any:  # type: ignore[override]
        _Counted.encodings += 1
        return super().items()


async def test_a_message_and_the_state_are_encoded_once_from_send_to_socket() -> None:
    """The limits' size, the record's journal entry and the WebSocket frame share one
    encoding of the message; the state is encoded once at its checkpoint."""
    ws = _Socket()
    host = Host()
    stream = host.stream()
    stream.attach(WebSocketConduit(ws), 0)  # type: ignore[arg-type]
    _Counted.encodings = 0
    stream.state = _Counted(total=1)
    await stream.send(_Counted(x=1))
    record, _ = stream.take()
    await stream.committed(record, '"2"')
    assert ws.frames[-1] == Frame(MESSAGE, seq=1, payload={"x": 1}, ack=0)
    assert StreamRecord.decode(record.encode()).state == {"total": 1}
    assert _Counted.encodings == 2
