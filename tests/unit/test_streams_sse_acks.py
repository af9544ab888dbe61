"""The clients' acknowledgements cost no request of their own where they can ride on
another: the SSE client's on its next message's POST (one request per message it
sends, not two), the gRPC client's with its question of what the handler consumed, in
one Ack call (docs/streams.md). Pure: the requests are recorded by stand-ins, no
socket is opened."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

from meshxl.streams import sse, sse_client
from meshxl.streams.protocol import Limits, new_token


class _Answer:
    status = 202

    async def __aenter__(self) -> _Answer:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        return None

    async def text(self) -> str:
        return ""


class _Http:
    def __init__(self) -> None:
        self.posts: list[dict[str, str]] = []

    def post(self, url: str, *, data: Any = None, headers: dict[str, str]) -> _Answer:
        self.posts.append(dict(headers))
        return _Answer()


def _events(http: _Http) -> Any:
    events = sse_client._Events(http, "http://mesh/feed", {"x-session-id": "s"},  # type: ignore[arg-type]
                                upload=False)
    events.token = new_token()
    return events


async def test_an_acknowledgement_rides_on_the_next_message() -> None:
    http = _Http()
    events = _events(http)
    await events.send_ack(4)
    await events.send_ack(5)
    await events.send_message(7, {"n": 1})
    await asyncio.sleep(sse_client.ACK_LINGER * 2)
    assert len(http.posts) == 1, http.posts
    assert http.posts[0][sse.SEQ_HEADER] == "7" and http.posts[0][sse.ACK_HEADER] == "5"
    await events.close()


async def test_an_acknowledgement_with_no_message_to_carry_it_goes_alone() -> None:
    http = _Http()
    events = _events(http)
    await events.send_ack(3)
    await asyncio.sleep(sse_client.ACK_LINGER * 2)
    assert [p.get(sse.ACK_HEADER) for p in http.posts] == ["3"]
    assert sse.SEQ_HEADER not in http.posts[0]
    await events.send_message(4, {"n": 1})  # nothing left to carry
    assert sse.ACK_HEADER not in http.posts[1]
    await events.close()


class _Sized:
    """A protobuf message as the client measures it."""

    def __init__(self, size: int):
        self.size = size

    def ByteSize(self) -> int:  # noqa: N802 - protobuf's name
        return self.size

    def SerializeToString(self) -> bytes:  # noqa: N802 - protobuf's name
        return b"x" * self.size


class _AckChannel:
    """A channel whose Ack calls are recorded (answered: nothing consumed yet)."""

    def __init__(self) -> None:
        self.acks: list[dict[str, Any]] = []

    def unary_unary(self, method: str, **kwargs: Any) -> Any:
        async def ack(body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
            self.acks.append(body)
            return {"in": 0}
        return ack


class _Writable:
    async def write(self, message: Any) -> None:
        return None

    def cancel(self) -> None:
        return None


def _grpc_call(channel: _AckChannel, limits: Limits) -> Any:
    from meshxl.streams import grpc_client

    call = grpc_client._Call(channel, "/t.T/Talk", None, None, None, [],  # type: ignore[arg-type]
                        limits)
    call.token, call.call = new_token(), _Writable()
    return call


async def test_a_grpc_clients_acknowledgements_and_questions_share_one_ack_call() -> None:
    from meshxl.streams import grpc_client

    channel = _AckChannel()
    call = _grpc_call(channel, Limits(ack_delay=0.05))
    await call.send_ack(3)
    await call.send_message(1, _Sized(10))  # would ask what the handler consumed
    await call.send_ack(5)
    await asyncio.sleep(grpc_client.ACK_LINGER * 2)
    assert [a["recv"] for a in channel.acks] == [5], channel.acks  # one call, the latest
    await call.close()


async def test_a_grpc_client_that_sends_fast_acknowledges_without_lingering() -> None:
    """The linger spares an Ack call per message at a chat's pace; a client sending a
    quarter of ``max_unacked_bytes`` asks at once, so it never waits a linger to be
    allowed to send more."""
    channel = _AckChannel()
    call = _grpc_call(channel, Limits(max_unacked_bytes=4096, max_message_bytes=1024))
    for seq in range(1, 4):
        await call.send_message(seq, _Sized(300))  # 900 bytes: less than 4096 / 4
    await asyncio.sleep(0.05)
    assert channel.acks == []  # lingering
    await call.send_message(4, _Sized(300))  # 1,200 bytes: a quarter of the limit
    await asyncio.sleep(0.05)
    assert len(channel.acks) == 1, channel.acks
    await call.close()
