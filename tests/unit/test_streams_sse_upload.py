"""An event stream's client frames travel in one upload per connection (a POST whose
body streams them, a line each), not a request per message (docs/streams.md). The
client batches what is queued into one chunk (an acknowledgement rides with the next
message), names its connection's epoch, ends an idle upload and opens another for the
next frame, and takes a refused upload for a broken connection (the stream resumes).
The server checks, for each frame of an upload, that the stream is still its own: one
taken over meanwhile is refused from that frame on, nothing after it taken. Pure:
requests made in memory, no socket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any
from unittest import mock

import pytest
from aiohttp import streams as aiostreams
from aiohttp.test_utils import make_mocked_request

from meshxl.client import AsyncClient
from meshxl.streams import StreamHost, sse, sse_client
from meshxl.streams.protocol import ERROR, MESSAGE, MOVED, Frame, Limits, decode_frame, new_token
from meshxl.streams.record import StreamRecord
from meshxl.streams.server import ServerStream

# -- the client ---------------------------------------------------------------------------


class _Upload:
    """One upload as a stand-in server takes it: every chunk of its body recorded; the
    answer's lines are what the test says; the answer ends when the body does."""

    status = 200

    def __init__(self, http: _Http, data: AsyncIterator[bytes], headers: dict[str, str]):
        self.http, self.data, self.headers = http, data, headers
        self.chunks: list[bytes] = []
        self.lines: asyncio.Queue[bytes] = asyncio.Queue()
        self.drained = asyncio.Event()

    async def __aenter__(self) -> _Upload:
        self.task = asyncio.create_task(self._drain())
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.task.cancel()

    async def _drain(self) -> None:
        if self.http.stuck:  # a server that takes no more of the body
            return
        async for chunk in self.data:
            self.chunks.append(chunk)
        self.drained.set()

    @property
    def content(self) -> AsyncIterator[bytes]:
        return self._answer()

    async def _answer(self) -> AsyncIterator[bytes]:
        while True:
            line = asyncio.create_task(self.lines.get())
            drained = asyncio.create_task(self.drained.wait())
            await asyncio.wait({line, drained}, return_when=asyncio.FIRST_COMPLETED)
            drained.cancel()
            if not line.done():
                line.cancel()
                return
            yield line.result()

    def frames(self) -> list[Frame]:
        return [decode_frame(line) for chunk in self.chunks for line in chunk.splitlines()]


class _Http:
    def __init__(self, stuck: bool = False) -> None:
        self.uploads: list[_Upload] = []
        self.stuck = stuck

    def post(self, url: str, *, data: Any, headers: dict[str, str], **_: Any) -> _Upload:
        self.uploads.append(_Upload(self, data, headers))
        return self.uploads[-1]


def _events(http: _Http, epoch: int = 7) -> Any:
    events = sse_client._Events(http, "http://mesh/feed", {"x-session-id": "s"})  # type: ignore[arg-type]
    events.token, events.epoch = new_token(), epoch
    events.response = mock.Mock()
    events.response.content.exception.return_value = None  # the event stream reads
    return events


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_frames_queued_together_travel_in_one_chunk_of_one_upload() -> None:
    http = _Http()
    events = _events(http)
    await events.send_ack(5)
    await events.send_message(7, {"n": 1}, text='{"n": 1}')  # sent as the stream made it
    await events.send_message(8, b"\x00\xff")
    await events.send_end(8)
    await _settle()
    [upload] = http.uploads
    assert b'"d":{"n": 1}}' in b"".join(upload.chunks)
    assert upload.headers["Content-Type"] == sse.UPLOAD_TYPE
    assert upload.headers[sse.EPOCH_HEADER] == "7"
    assert upload.headers[sse.STREAM_HEADER] == events.token
    assert len(upload.chunks) == 1, upload.chunks  # one write for what was queued
    assert upload.frames() == [  # the acknowledgement rides on the next message
        Frame(MESSAGE, seq=7, payload={"n": 1}, ack=5),
        Frame(MESSAGE, seq=8, payload=b"\x00\xff"), Frame("end", seq=8)]
    await events.close()


async def test_an_idle_upload_ends_and_the_next_frame_opens_another(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sse_client, "UPLOAD_IDLE", 0.05)
    http = _Http()
    events = _events(http)
    await events.send_message(1, {"n": 1})
    await _settle()
    async with asyncio.timeout(2):
        await http.uploads[0].drained.wait()  # ended: nothing to carry
    await events.send_message(2, {"n": 2})
    await _settle()
    assert [u.frames() for u in http.uploads] == [[Frame(MESSAGE, seq=1, payload={"n": 1})],
                                                  [Frame(MESSAGE, seq=2, payload={"n": 2})]]
    assert events._broken is None  # an upload the client ended is no broken connection
    await events.close()


async def test_a_refused_upload_breaks_the_connection_so_the_stream_resumes() -> None:
    http = _Http()
    events = _events(http)
    await events.send_message(1, {"n": 1})
    await _settle()
    refusal = {"t": "error", "code": MOVED.name, "message": "elsewhere"}
    http.uploads[0].lines.put_nowait(json.dumps(refusal).encode() + b"\n")
    await _settle()
    events.response.close.assert_called()  # the event stream ends: the stream resumes
    with pytest.raises(ConnectionError):
        await events.send_message(2, {"n": 2})  # sent again on the next connection
    await events.close()


@pytest.mark.parametrize(("broken", "flushed"), [(None, True),
                                                (ConnectionResetError("reset"), False)])
async def test_a_closing_connection_ends_its_upload_only_while_its_events_read(
        monkeypatch: pytest.MonkeyPatch, broken: Exception | None, flushed: bool) -> None:
    """Closing, a connection ends its upload after what is queued while its event stream
    reads; once that broke (its member killed), the upload is cut instead: ending its
    body would have aiohttp write the end on a closed transport in a task whose error
    nobody reads. What was queued goes again on the next connection."""
    monkeypatch.setattr(sse_client, "UPLOAD_FLUSH", 0.01)
    http = _Http(stuck=True)
    events = _events(http)
    events.response.content.exception.return_value = broken
    await events.send_message(1, {"n": 1})
    await _settle()
    lines = events._lines
    assert lines is not None and lines.qsize() == 1
    await events.close()
    assert lines.qsize() == (2 if flushed else 1)  # the end marker, or nothing more


# -- the server ---------------------------------------------------------------------------


class _Writer:
    """What the server wrote in its answer."""

    def __init__(self) -> None:
        self.body = b""
        self.buffer_size = 0
        self.output_size = 0

    async def write(self, data: bytes) -> None:
        self.body += bytes(data)

    async def write_headers(self, *_: Any) -> None:
        return None

    def send_headers(self) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        self.body += data

    async def drain(self) -> None:
        return None

    def enable_compression(self, *_: Any) -> None:
        return None

    def enable_chunking(self) -> None:
        return None


async def test_an_upload_is_refused_from_the_frame_its_stream_was_taken_over() -> None:
    host = StreamHost(AsyncClient("http://127.0.0.1:9"))  # never called: no commit here
    record = StreamRecord(session="s", kind="sse", epoch=2)
    stream = ServerStream(new_token(), record, "1", Limits(), lambda _: None,
                          lambda _: None, resumed=True)
    host.live[stream.token] = stream
    body = aiostreams.StreamReader(mock.Mock(_reading_paused=False, connected=True), 2 ** 16,
                                   loop=asyncio.get_running_loop())
    writer = _Writer()
    request = make_mocked_request("POST", "/feed", payload=body, writer=writer, headers={
        sse.STREAM_HEADER: stream.token, sse.EPOCH_HEADER: "2", "x-session-id": "s",
        "Content-Type": sse.UPLOAD_TYPE})
    body.feed_data(b'{"t":"m","s":1,"d":{"n":1}}\n')
    upload = asyncio.create_task(sse._post(host, request, "s"))
    async with asyncio.timeout(2):
        assert await stream.receive() == {"n": 1}
    del host.live[stream.token]  # taken over elsewhere: this process learns it
    body.feed_data(b'{"t":"m","s":2,"d":{"n":2}}\n')
    body.feed_eof()
    async with asyncio.timeout(2):
        answer = await upload
    assert answer.status == 200
    [line] = writer.body.splitlines()
    assert decode_frame(line) == Frame(ERROR, refusal=MOVED,
                                       message="the stream goes on elsewhere now: resume it")
    assert stream._received == 1  # the frame after the takeover was not taken
    await host.sessions.close()
