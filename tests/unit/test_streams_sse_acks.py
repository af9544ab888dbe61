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
from meshxl.streams.protocol import new_token


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


async def test_a_grpc_clients_acknowledgements_and_questions_share_one_ack_call() -> None:
    from meshxl.streams import grpcio

    acks: list[dict[str, Any]] = []

    class _Channel:
        def unary_unary(self, method: str, **kwargs: Any) -> Any:
            async def ack(body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
                acks.append(body)
                return {"in": 0}
            return ack

    class _Stream:
        async def write(self, message: Any) -> None:
            return None

        def cancel(self) -> None:
            return None

    call = grpcio._Call(_Channel(), "/t.T/Talk", None, None, None, [], 0.05)  # type: ignore[arg-type]
    call.token, call.call = new_token(), _Stream()
    await call.send_ack(3)
    await call.send_message(1, object())  # would ask what the handler consumed
    await call.send_ack(5)
    await asyncio.sleep(grpcio.ACK_LINGER * 2)
    assert [a["recv"] for a in acks] == [5], acks  # one call, the latest acknowledgement
    await call.close()
