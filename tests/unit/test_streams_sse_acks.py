"""The SSE client's acknowledgements ride on its messages' POSTs: one request per
message a client sends, not two (docs/streams.md). Pure: the POSTs are recorded by a
stand-in for the HTTP session, no socket is opened."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

from meshxl.streams import sse
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
    events = sse._Events(http, "http://mesh/feed", {"x-session-id": "s"})  # type: ignore[arg-type]
    events.token = new_token()
    return events


async def test_an_acknowledgement_rides_on_the_next_message() -> None:
    http = _Http()
    events = _events(http)
    await events.send_ack(4)
    await events.send_ack(5)
    await events.send_message(7, {"n": 1})
    await asyncio.sleep(sse.ACK_LINGER * 2)
    assert len(http.posts) == 1, http.posts
    assert http.posts[0][sse.SEQ_HEADER] == "7" and http.posts[0][sse.ACK_HEADER] == "5"
    await events.close()


async def test_an_acknowledgement_with_no_message_to_carry_it_goes_alone() -> None:
    http = _Http()
    events = _events(http)
    await events.send_ack(3)
    await asyncio.sleep(sse.ACK_LINGER * 2)
    assert [p.get(sse.ACK_HEADER) for p in http.posts] == ["3"]
    assert sse.SEQ_HEADER not in http.posts[0]
    await events.send_message(4, {"n": 1})  # nothing left to carry
    assert sse.ACK_HEADER not in http.posts[1]
    await events.close()
