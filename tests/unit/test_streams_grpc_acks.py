"""A gRPC stream's acknowledgements ride in its messages (:mod:`meshxl.streams.grpcwire`):
the field appended to a message's bytes, read back by protobuf as the same message;
the client's Ack calls only for a direction that stayed idle; the server's reading of
the acknowledgement and its refusal of a message without one. Pure: a real protobuf
message type, stand-ins for the calls, no socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshxl.local import counter
from meshxl.streams import grpc_client, grpcio
from meshxl.streams.grpcwire import TRAILER_SIZE, end_message, ended_at, split_ack, with_ack
from meshxl.streams.protocol import MALFORMED, Limits, ProtocolError, new_token
from meshxl.streams.record import StreamRecord
from meshxl.streams.server import ServerStream

SEQS = st.integers(min_value=0, max_value=(1 << 53) - 1)


@given(body=st.binary(max_size=300), ack=SEQS)
def test_a_message_and_its_acknowledgement_come_apart_as_they_went(body: bytes,
                                                                   ack: int) -> None:
    data = with_ack(body, ack)
    assert len(data) == len(body) + TRAILER_SIZE
    assert split_ack(data) == (body, ack)


@given(n=st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1), ack=SEQS)
def test_protobuf_reads_a_message_with_its_acknowledgement_as_the_message(n: int,
                                                                          ack: int) -> None:
    """The field is one protobuf does not know: any parser of the call's type (a peer
    without this library, a tool on the path) reads the message it was."""
    message = counter.TallyRequest(n=n)
    parsed = counter.TallyRequest.FromString(with_ack(message.SerializeToString(), ack))
    assert parsed.n == n


@pytest.mark.parametrize("data", [
    b"", b"\x08\x01", b"x" * (TRAILER_SIZE - 1),
    b"\x08\x01" + b"\xf9\xff\xff\xff\x0e" + bytes(8),  # another field's key
    with_ack(b"", 0)[:-1],  # cut short
    b"\xf9\xff\xff\xff\x0f" + (1 << 53).to_bytes(8, "little"),  # past any number
])
def test_a_message_without_its_acknowledgement_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        split_ack(data)


# -- the client ------------------------------------------------------------------------


class _Call:
    """A stream-stream call as the client writes to it."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    async def write(self, data: bytes) -> None:
        self.written.append(data)

    def cancel(self) -> bool:
        return True


class _Acks:
    """A channel's Ack calls, recorded."""

    def __init__(self) -> None:
        self.asked: list[dict[str, Any]] = []

    def unary_unary(self, *_: Any, **__: Any) -> Any:
        async def ack(request: dict[str, Any], **_: Any) -> dict[str, int]:
            self.asked.append(request)
            return {"in": 0}
        return ack


def _carried(channel: _Acks) -> grpc_client._Call:
    call = grpc_client._Call(channel, "/t.T/Talk", None, counter.TallyRequest,  # type: ignore[arg-type]
                             counter.TallyReply, [], Limits(ack_delay=0.01))
    call.token, call.call, call.carried = new_token(), _Call(), True
    return call


@pytest.fixture
def linger(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(grpc_client, "ACK_LINGER", 0.05)
    return 0.05


async def test_each_message_carries_what_the_client_received(linger: float) -> None:
    channel = _Acks()
    call = _carried(channel)
    await call.send_message(1, counter.TallyRequest(n=5), ack=3)
    await call.send_ack(4)  # after the message: the next one carries it
    await call.send_message(2, counter.TallyRequest(n=6))
    written = [split_ack(data) for data in call.call.written]
    assert [(counter.TallyRequest.FromString(b).n, ack) for b, ack in written] == [(5, 3),
                                                                                 (6, 4)]
    await call.close()


async def test_no_ack_call_while_both_directions_talk(linger: float) -> None:
    channel = _Acks()
    call = _carried(channel)
    for seq in range(1, 8):  # each message answered, the handler a message behind
        await call.send_message(seq, counter.TallyRequest(n=seq), ack=seq - 1)
        call._talked[1], call._heard = True, seq - 1  # as _pump on the server's answer
        await asyncio.sleep(linger / 2)
    assert channel.asked == []
    await asyncio.sleep(linger * 3)  # then both fall silent, the last message owed
    assert [a["recv"] for a in channel.asked] == [6], channel.asked
    await call.close()


async def test_an_idle_direction_is_acknowledged_by_an_ack_call(linger: float) -> None:
    channel = _Acks()
    call = _carried(channel)
    await call.send_ack(2)  # received two server messages, sends nothing
    await asyncio.sleep(linger * 3)
    assert [a["recv"] for a in channel.asked] == [2]
    await asyncio.sleep(linger * 3)
    assert len(channel.asked) == 1  # told: nothing more is owed
    await call.close()


async def test_server_messages_carry_what_the_handler_consumed() -> None:
    channel = _Acks()
    call = _carried(channel)

    class Replies(_Call):
        def __aiter__(self) -> AsyncIterator[bytes]:
            return self._replies()

        async def _replies(self) -> AsyncIterator[bytes]:
            for seq, consumed in ((1, 0), (2, 2)):
                yield with_ack(counter.TallyReply(seq=seq).SerializeToString(), consumed)
            yield b"no trailer"

        async def code(self) -> Any:
            raise AssertionError("the call is cancelled at the malformed message")

    call.call = Replies()
    call.next_seq = 1
    await call._pump()
    frames = []
    with pytest.raises(ProtocolError, match="acknowledgement"):
        async for frame in call.frames():
            frames.append(frame)
    assert [(f.seq, f.payload.seq, f.ack) for f in frames] == [(1, 1, 0), (2, 2, 2)]
    assert call._heard == 2
    await call.close()


# -- the server ------------------------------------------------------------------------


def _stream() -> ServerStream:
    """A stream that sent three messages the client has not acknowledged."""
    record = StreamRecord(session="s", kind="grpc", out=3,
                          journal=[(seq, b"0123456789") for seq in (1, 2, 3)])
    return ServerStream(new_token(), record, "1", Limits(), lambda _: None,
                        lambda _: None, resumed=False)


async def _messages(*items: bytes) -> AsyncIterator[bytes]:
    for item in items:
        yield item


async def test_the_server_reads_each_messages_acknowledgement() -> None:
    stream = _stream()
    await grpcio._read(stream, _messages(
        with_ack(counter.TallyRequest(n=7).SerializeToString(), 2)), counter.TallyRequest,
        True)
    assert (await stream.receive()).n == 7
    assert stream._client_acked == 2
    assert [seq for seq, _ in stream._unacked] == [3]  # 1 and 2 let go


@pytest.mark.parametrize("data", [b"\x08\x07", with_ack(b"\xff\xff", 0),
                                  with_ack(b"\x08\x07", 4)],
                         ids=["no-acknowledgement", "not-a-message", "ack-of-unsent"])
async def test_a_malformed_client_message_stops_its_stream_only(data: bytes) -> None:
    stream = _stream()
    await grpcio._read(stream, _messages(data), counter.TallyRequest, True)
    assert stream.stopped is MALFORMED


# -- the client's end ----------------------------------------------------------------


@given(st.integers(0, (1 << 53) - 1), st.integers(0, (1 << 53) - 1))
def test_an_end_message_says_its_last_message_and_no_message_is_one(last: int,
                                                                    ack: int) -> None:
    body, told = split_ack(end_message(last, ack))
    assert (ended_at(body), told) == (last, ack)
    assert counter.TallyRequest.FromString(body).n == 0  # a parser skips the field
    assert ended_at(counter.TallyRequest(n=last % 1000).SerializeToString()) is None


async def test_a_carried_call_ends_its_stream_only_when_the_client_says_so(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A call reset by its client or by a draining Envoy ends its messages as a
    half-close does, and may be cancelled only much later on a busy server: without
    the end message that is no end of the stream (it resumes elsewhere); with it, the
    stream ends after the last message."""
    monkeypatch.setattr(grpcio, "END_GRACE", 0.0)  # a cancellation later than any grace
    one = with_ack(counter.TallyRequest(n=1).SerializeToString(), 0)
    reset = _stream()
    await grpcio._read(reset, _messages(one), counter.TallyRequest, True)
    assert reset._client_done is None and reset.stopped is None
    said = _stream()
    await grpcio._read(said, _messages(one, end_message(1, 0)), counter.TallyRequest, True)
    assert said._client_done == 1
    earlier = _stream()  # a client without acknowledgements in its messages
    await grpcio._read(earlier, _messages(b"\x08\x01"), counter.TallyRequest, False)
    assert earlier._client_done == 1


async def test_the_client_says_its_end_before_it_half_closes() -> None:
    call = _carried(_Acks())
    done: list[bool] = []

    async def done_writing() -> None:
        done.append(True)

    call.call.done_writing = done_writing  # type: ignore[attr-defined]
    await call.send_message(1, counter.TallyRequest(n=1))
    await call.send_end(1)
    assert ended_at(split_ack(call.call.written[-1])[0]) == 1 and done == [True]
