"""A server stream's client messages in order, over transports that keep them in order
(a WebSocket) and over those that do not (SSE's POSTs, each its own request: one sent
before a resume may be delivered by Envoy's retry after it, behind the messages sent
again), and gRPC calls, whose reset ends their messages as a half-close does. Pure: no
socket, no process (the stream is driven directly)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshxl.streams.protocol import Limits, ProtocolError, new_token
from meshxl.streams.record import StreamRecord
from meshxl.streams.server import ServerStream


def _stream(consumed: int = 0, limits: Limits | None = None) -> ServerStream:
    record = StreamRecord(session="s", kind="sse", consumed=consumed)
    return ServerStream(new_token(), record, "1", limits or Limits(), lambda _: None,
                        lambda _: None, resumed=consumed > 0)


class _Json:
    """A message type whose messages are JSON documents."""

    FromString = staticmethod(json.loads)


async def _drain(stream: ServerStream, count: int) -> list[object]:
    return [await stream.receive() for _ in range(count)]


async def test_an_early_post_waits_for_the_one_before_it() -> None:
    # After a resume at consumed 3, the POST of message 5 (sent on the connection that
    # broke) arrives before message 4 is sent again: both reach the handler, in order.
    stream = _stream(consumed=3)
    stream.received(5, {"n": 5}, ordered=False)
    stream.received(4, {"n": 4}, ordered=False)
    stream.received(5, {"n": 5}, ordered=False)  # sent again after the resume: once only
    assert await _drain(stream, 2) == [{"n": 4}, {"n": 5}]
    assert stream.seq == 5


def test_over_one_connection_a_gap_is_still_malformed() -> None:
    stream = _stream()
    with pytest.raises(ProtocolError, match="a gap"):
        stream.received(2, "x")


def test_early_messages_are_bounded_by_what_a_client_may_have_in_flight() -> None:
    stream = _stream(limits=Limits(max_unacked_bytes=1024, max_message_bytes=512))
    stream.received(3, "a" * 500, ordered=False)
    stream.received(4, "b" * 500, ordered=False)
    with pytest.raises(ProtocolError, match="early"):
        stream.received(5, "c" * 500, ordered=False)


async def test_an_end_that_overtakes_the_last_message_keeps_it() -> None:
    stream = _stream()
    stream.received(1, 1, ordered=False)
    stream.client_ended(2)
    stream.received(2, 2, ordered=False)
    assert await _drain(stream, 2) == [1, 2]
    with pytest.raises(EOFError):
        await stream.receive()
    with pytest.raises(ProtocolError, match="after its end"):
        stream.received(3, 3, ordered=False)


@given(st.permutations(list(range(1, 13))), st.integers(min_value=0, max_value=3))
async def test_any_arrival_order_delivers_each_message_once_in_order(
        order: list[int], repeats: int) -> None:
    stream = _stream()
    for seq in order + order[:repeats]:
        stream.received(seq, seq, ordered=False)
    assert await _drain(stream, 12) == list(range(1, 13))


async def test_the_sse_route_takes_posts_in_any_order() -> None:
    from unittest import mock

    from aiohttp import streams as aiostreams
    from aiohttp.test_utils import make_mocked_request

    from meshxl.client import AsyncClient
    from meshxl.streams import StreamHost
    from meshxl.streams.sse import SEQ_HEADER, STREAM_HEADER, _post

    host = StreamHost(AsyncClient("http://127.0.0.1:9"))  # never called: no commit here
    stream = _stream()
    host.live[stream.token] = stream

    def post(seq: int) -> object:
        body = aiostreams.StreamReader(mock.Mock(_reading_paused=False), 2 ** 16,
                                       loop=mock.Mock())
        body.feed_data(b'{"n": %d}' % seq)
        body.feed_eof()
        return make_mocked_request(
            "POST", "/feed", payload=body,
            headers={STREAM_HEADER: stream.token, SEQ_HEADER: str(seq),
                     "Content-Type": "application/json", "x-session-id": "s"})

    assert (await _post(host, post(2), "s")).status == 202  # type: ignore[arg-type]
    assert (await _post(host, post(1), "s")).status == 202  # type: ignore[arg-type]
    assert await _drain(stream, 2) == [{"n": 1}, {"n": 2}]
    await host.sessions.close()


async def test_a_grpc_call_reset_is_not_the_clients_end() -> None:
    # A call reset by Envoy (a drain) or its client ends its messages as a half-close
    # does, then is cancelled: the stream must go on (elsewhere), not end.
    import asyncio

    from meshxl.streams import grpcio

    async def messages(count: int):  # type: ignore[no-untyped-def]
        for n in range(count):
            yield json.dumps({"n": n}).encode()

    reset = _stream()
    reader = asyncio.create_task(grpcio._read(reset, messages(2), _Json, False))
    await _drain(reset, 2)
    await asyncio.sleep(0)  # the messages ended; the cancellation comes at once
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    reset.received(3, {"n": 3})  # resumed: it goes on
    assert await reset.receive() == {"n": 3}

    closed = _stream()  # a half-close that nothing cancels: the client's end
    await grpcio._read(closed, messages(1), _Json, False)
    assert await closed.receive() == {"n": 0}
    with pytest.raises(EOFError):
        await closed.receive()
