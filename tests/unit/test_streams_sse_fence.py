"""An SSE stream's POSTs go each its own way through the mesh, so during a move one may
reach a former server of the stream: taken over elsewhere, which it learns only at its
next commit. Answered 202 there, the message was never committed and never sent again,
and the new server held every later message for it: the stream stalled after a planned
move. The POSTs name the epoch their connection's ``ready`` said, and a server of the
stream at another epoch refuses them as ``moved`` (sent again where the stream is); a
refusal the member's health is not judged by. Pure: requests made in memory, no
socket."""

from __future__ import annotations

import json
from types import TracebackType
from typing import Any
from unittest import mock

from aiohttp import streams as aiostreams
from aiohttp.test_utils import make_mocked_request

from meshxl.client import AsyncClient
from meshxl.streams import StreamHost, sse, sse_client
from meshxl.streams.protocol import MOVED, READY, Limits, new_token
from meshxl.streams.record import StreamRecord
from meshxl.streams.server import ServerStream
from meshxl.xds.accesslog import http_sample
from tests.harness.als import entry


def _stream(epoch: int) -> ServerStream:
    record = StreamRecord(session="s", kind="sse", epoch=epoch)
    return ServerStream(new_token(), record, "1", Limits(), lambda _: None, lambda _: None,
                        resumed=epoch > 1)


def _post(stream: ServerStream, seq: int, body: dict[str, Any],
          epoch: int | None) -> Any:
    payload = aiostreams.StreamReader(mock.Mock(_reading_paused=False), 2 ** 16,
                                      loop=mock.Mock())
    payload.feed_data(json.dumps(body).encode())
    payload.feed_eof()
    headers = {sse.STREAM_HEADER: stream.token, sse.SEQ_HEADER: str(seq),
               "Content-Type": "application/json", "x-session-id": "s"}
    if epoch is not None:
        headers[sse.EPOCH_HEADER] = str(epoch)
    return make_mocked_request("POST", "/feed", payload=payload, headers=headers)


async def test_a_post_for_another_epoch_is_refused_and_not_taken() -> None:
    host = StreamHost(AsyncClient("http://127.0.0.1:9"))  # never called: no commit here
    former = _stream(epoch=2)  # taken over at epoch 3 elsewhere: it does not know yet
    host.live[former.token] = former
    refused = await sse._post(host, _post(former, 1, {"to": 3}, epoch=3), "s")
    assert refused.status == MOVED.http_status
    assert json.loads(refused.body)["code"] == MOVED.name  # type: ignore[attr-defined]
    # Not taken: the message that reaches the handler is the one for this epoch.
    taken = await sse._post(host, _post(former, 1, {"to": 2}, epoch=2), "s")
    assert taken.status == 202
    assert await former.receive() == {"to": 2}
    await host.sessions.close()


async def test_a_post_that_names_no_epoch_is_taken_as_before() -> None:
    """A client without the library (an ``EventSource`` and POSTs of its own) names no
    epoch: its POSTs are taken by whichever server holds the stream."""
    host = StreamHost(AsyncClient("http://127.0.0.1:9"))
    stream = _stream(epoch=4)
    host.live[stream.token] = stream
    assert (await sse._post(host, _post(stream, 1, {"n": 1}, epoch=None), "s")).status == 202
    assert await stream.receive() == {"n": 1}
    await host.sessions.close()


async def test_a_post_a_process_cannot_take_is_no_failure_of_its_member() -> None:
    """During a move many POSTs reach a member that does not hold their stream (not yet,
    or no more): its refusal is the protocol at work, not the member failing. Answered
    with a 503, it was Envoy's gateway error: retried on the next priority, counted by
    outlier detection (three in a row eject the member), and judged: the new active
    failed every request, and a predictive failover moved the sessions again."""
    host = StreamHost(AsyncClient("http://127.0.0.1:9"))
    former = _stream(epoch=2)
    host.live[former.token] = former
    answers = [await sse._post(host, _post(_stream(epoch=1), 1, {"n": 1}, 1), "s"),  # none
               await sse._post(host, _post(former, 1, {"n": 1}, epoch=3), "s")]
    for answer in answers:
        assert json.loads(answer.body)["code"] == MOVED.name  # type: ignore[attr-defined]
        assert 400 <= answer.status < 500, answer.status  # no gateway error, no 5xx
        logged = entry("demo", "127.0.0.2:80", 0.001, answer.status)  # what the judge reads
        assert http_sample(logged) == ("demo", "127.0.0.2:80", 0.001, False)
    await host.sessions.close()


class _Answer:
    status = 202

    async def __aenter__(self) -> _Answer:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        return None


class _Http:
    def __init__(self) -> None:
        self.posts: list[dict[str, str]] = []

    def post(self, url: str, *, data: Any = None, headers: dict[str, str]) -> _Answer:
        self.posts.append(dict(headers))
        return _Answer()


async def test_the_client_names_its_connections_epoch_on_every_post() -> None:
    http = _Http()
    events = sse_client._Events(http, "http://mesh/feed", {"x-session-id": "s"},  # type: ignore[arg-type]
                                upload=False)
    token = new_token()
    ready = events._frame("ready", json.dumps({"id": token, "in": 0, "out": 0,
                                               "epoch": 7}), None)
    assert ready.type == READY and ready.token == token
    await events.send_message(1, {"n": 1})
    await events.send_end(1)
    assert [post[sse.EPOCH_HEADER] for post in http.posts] == ["7", "7"]
    await events.close()
