"""The Python client of resumable Server-Sent Events (the wire: :mod:`.sse`).

::

    async with connect_sse(url, headers={"x-session-id": "s1"}) as stream: ...

The server's messages come as events of a ``GET``; the client's frames go in one upload
per connection (a ``POST`` whose body streams them, a line each), or, with
``upload=False``, as one ``POST`` per message, as a browser sends them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
from collections.abc import AsyncIterator, Mapping

import aiohttp

from .client import ClientStream, Connection, HttpSessions
from .protocol import (
    ACK,
    END,
    ERROR,
    MESSAGE,
    READY,
    RESUME,
    Frame,
    Limits,
    Payload,
    ProtocolError,
    compact_json,
    encode_frame,
    message_frame,
    refusal_named,
)
from .sse import (
    ACK_HEADER,
    END_HEADER,
    EPOCH_HEADER,
    EVENT_STREAM,
    RECV_HEADER,
    SEQ_HEADER,
    STREAM_HEADER,
    UPLOAD_TYPE,
)

__all__ = ["ACK_LINGER", "UPLOAD_FLUSH", "UPLOAD_IDLE", "connect_sse"]


ACK_LINGER = 0.25
"""Seconds an acknowledgement waits for a message's POST to carry it (``X-Meshxl-Ack`` on
that POST) before it is POSTed alone. Each POST is a request through the mesh: a client
that talks about as often as it listens sends one for each message instead of two
(measured in ``bench/streams.py``: docs/streams.md). One that lingers when its
connection closes is dropped with it; the stream says what it received when it
resumes."""


UPLOAD_IDLE = 20.0
"""Seconds an upload stays open with nothing to carry before the client ends it (the
next frame opens another): no proxy's idle timeout (Envoy's ``stream_idle_timeout``, 5
minutes by default) cuts one that is still in use, and a quiet stream holds one
connection, not two."""
UPLOAD_FLUSH = 0.5
"""Seconds a closing connection gives its upload to carry the frames still queued (an
acknowledgement, the end) before it cuts it."""


class _Events:
    """A stream's event stream and its POSTs (:class:`.client.Connection`): with
    ``upload``, one POST per connection carries every frame of the client's
    (:func:`_upload`); else one POST per message (what a browser can do)."""

    def __init__(self, http: aiohttp.ClientSession, url: str, headers: Mapping[str, str],
                 upload: bool = True):
        self.http, self.url, self.headers = http, url, dict(headers)
        self.upload = upload
        self.response: aiohttp.ClientResponse | None = None
        self.token: str | None = None
        self.epoch: int | None = None
        """The stream's epoch on this connection's server (its ``ready``): the POSTs
        name it, so that no former server of the stream takes them."""
        self.status: int | None = None
        self._ack: int | None = None
        self._ack_alone: asyncio.Task[None] | None = None
        self._lines: asyncio.Queue[bytes | None] | None = None
        self._uploading: asyncio.Task[None] | None = None
        self._broken: BaseException | None = None

    async def hello(self, frame: Frame) -> None:
        headers = {**self.headers, "Accept": EVENT_STREAM}
        if frame.type == RESUME:
            assert frame.token is not None
            headers[STREAM_HEADER], headers[RECV_HEADER] = frame.token, str(frame.recv)
            self.token = frame.token
        # The server's pings come every heartbeat (2 s by default): a silence three
        # times that long is a connection whose server is gone without a word.
        self.response = await self.http.get(self.url, headers=headers,
                                            timeout=aiohttp.ClientTimeout(sock_read=6.0))

    def _headers(self, extra: Mapping[str, str], content_type: str | None) -> dict[str, str]:
        assert self.token is not None
        headers = {**self.headers, STREAM_HEADER: self.token, **extra}
        if self.epoch is not None:
            headers[EPOCH_HEADER] = str(self.epoch)
        if content_type is not None:
            headers["Content-Type"] = content_type
        return headers

    async def _post(self, extra: dict[str, str], body: bytes | None = None,
                    content_type: str | None = None) -> None:
        async with self.http.post(self.url, data=body,
                                  headers=self._headers(extra, content_type)) as answer:
            if answer.status not in (202, 204):
                raise ConnectionError(f"a message's POST answered {answer.status}: "
                                      f"{(await answer.text())[:200]}")

    # -- the upload: one POST for the connection's frames --------------------------------

    def _send_lines(self, *frames: Frame | str) -> None:
        """Frames on the upload (a str: one encoded already)."""
        if self._broken is not None:
            raise ConnectionError(f"the upload broke: {self._broken}")
        if self._lines is None:
            self._lines = asyncio.Queue()
            self._uploading = asyncio.get_running_loop().create_task(
                self._upload(self._lines))
        for frame in frames:
            line = frame if isinstance(frame, str) else encode_frame(frame, text_bytes=True)
            self._lines.put_nowait(line.encode() + b"\n")

    async def _upload(self, lines: asyncio.Queue[bytes | None]) -> None:
        async def body() -> AsyncIterator[bytes]:
            while True:
                try:
                    async with asyncio.timeout(UPLOAD_IDLE):
                        first = await lines.get()
                except TimeoutError:
                    if lines.empty():
                        if self._lines is lines:  # the next frame opens another
                            self._lines = None
                        return
                    continue
                chunk = [first]
                while not lines.empty():
                    chunk.append(lines.get_nowait())
                if None in chunk:  # closing: what came before it, then the end
                    yield b"".join(c for c in chunk[:chunk.index(None)] if c is not None)
                    return
                yield b"".join(c for c in chunk if c is not None)

        try:
            async with self.http.post(self.url, data=body(),
                                      headers=self._headers({}, UPLOAD_TYPE),
                                      timeout=aiohttp.ClientTimeout(sock_connect=5)) as answer:
                if answer.status != 200:
                    raise ConnectionError(f"the upload answered {answer.status}: "
                                          f"{(await answer.text())[:200]}")
                async for line in answer.content:
                    if line.strip():  # an error line: the stream goes on elsewhere, or
                        raise ConnectionError(  # ends (its events say why)
                            f"the upload was refused: {line[:200].decode(errors='replace')}")
            if self._lines is lines:
                raise ConnectionError("the server ended the upload")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the connection broke: the stream resumes
            self._broken = exc
            if self.response is not None:
                self.response.close()

    # -- what the stream sends --------------------------------------------------------

    async def send_message(self, seq: int, payload: Payload, ack: int | None = None,
                           text: str | None = None) -> None:
        if ack is not None:
            self._ack = max(self._ack or 0, ack)
        if self.upload:
            self._send_lines(Frame(MESSAGE, seq=seq, payload=payload, ack=self._take())
                             if text is None else message_frame(seq, text, self._take()))
            return
        extra = {SEQ_HEADER: str(seq), **self._take_ack()}
        if isinstance(payload, bytes | bytearray | memoryview):
            await self._post(extra, bytes(payload), "application/octet-stream")
        else:
            await self._post(extra, (compact_json(payload) if text is None else text).encode(),
                             "application/json")

    def _take(self) -> int | None:
        """The acknowledgement waiting for a ride, taken (None: none waits)."""
        ack, self._ack = self._ack, None
        return ack

    def _take_ack(self) -> dict[str, str]:
        ack = self._take()
        return {} if ack is None else {ACK_HEADER: str(ack)}

    def _take_ack_frame(self) -> list[Frame]:
        ack = self._take()
        return [] if ack is None else [Frame(ACK, seq=ack)]

    async def send_ack(self, seq: int) -> None:
        """Acknowledge with the next message, or alone after :data:`ACK_LINGER`."""
        self._ack = max(self._ack or 0, seq)
        if self._ack_alone is None or self._ack_alone.done():
            self._ack_alone = asyncio.get_running_loop().create_task(self._linger())

    async def _linger(self) -> None:
        await asyncio.sleep(ACK_LINGER)
        # A send that fails is a connection that broke: the stream resumes, and says
        # there what it received.
        with contextlib.suppress(ConnectionError, aiohttp.ClientError, TimeoutError):
            if self.upload:
                self._send_lines(*self._take_ack_frame())
            elif extra := self._take_ack():
                await self._post(extra)

    async def send_end(self, last: int) -> None:
        if self.upload:
            self._send_lines(*self._take_ack_frame(), Frame(END, seq=last))
        else:
            await self._post({END_HEADER: str(last), **self._take_ack()})

    async def frames(self) -> AsyncIterator[Frame]:
        response = self.response
        assert response is not None
        self.status = response.status
        if response.status != 200:
            try:
                code = (await response.json()).get("code")
            except (ValueError, aiohttp.ContentTypeError):
                code = None
            refusal = refusal_named(code) if isinstance(code, str) else None
            if refusal is not None:
                yield Frame(ERROR, refusal=refusal)
            return
        event, data, ident = "message", [], None
        async for raw in response.content:
            line = raw.decode().rstrip("\r\n")
            if line:
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "event":
                    event = value
                elif name == "data":
                    data.append(value)
                elif name == "id":
                    ident = value
                continue
            if data:
                yield self._frame(event, "\n".join(data), ident)
            event, data, ident = "message", [], None

    def _frame(self, event: str, data: str, ident: str | None) -> Frame:
        try:
            if event == "ready":
                doc = json.loads(data)
                self.token = doc["id"]
                epoch = doc.get("epoch")
                self.epoch = epoch if type(epoch) is int and epoch >= 0 else None
                return Frame(READY, token=doc["id"], consumed=int(doc["in"]),
                             last=int(doc["out"]))
            if event in ("message", "binary"):
                seq = int((ident or "").rpartition(":")[2])
                payload = base64.b64decode(data) if event == "binary" else json.loads(data)
                return Frame(MESSAGE, seq=seq, payload=payload)
            if event == "ack":
                return Frame(ACK, seq=int(data))
            if event == "end":
                return Frame(END, seq=int(data))
            if event == "error":
                doc = json.loads(data)
                refusal = refusal_named(str(doc.get("code")))
                if refusal is not None:
                    return Frame(ERROR, refusal=refusal, message=str(doc.get("message")))
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise ProtocolError(f"an event the protocol does not know: {exc}") from None
        raise ProtocolError(f"an event the protocol does not know: {event[:40]!r}")

    @property
    def close_code(self) -> int | None:
        return None

    def _events_read(self) -> bool:
        """Whether the connection's event stream still reads (no error on it): a member
        killed or cut off breaks it and the upload beside it. Ending that upload's body then makes
        aiohttp write the body's end on a closed transport, in a task of its own whose
        error nobody reads ("Task exception was never retrieved", logged by asyncio):
        25 such lines in a kill of 1,000 streams (``bench/streams.py``). The frames
        queued go again on the next connection anyway."""
        response = self.response
        return response is None or response.content.exception() is None

    async def close(self) -> None:
        if self._ack_alone is not None:
            self._ack_alone.cancel()
        lines, self._lines = self._lines, None
        task, self._uploading = self._uploading, None
        if task is not None and not task.done():
            if lines is not None and not lines.empty() and self._broken is None \
                    and self._events_read():
                lines.put_nowait(None)  # what is queued (an acknowledgement, the end)
                await asyncio.wait({task}, timeout=UPLOAD_FLUSH)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self.response is not None:
            self.response.close()


def connect_sse(url: str, *, headers: Mapping[str, str] | None = None,
                http: aiohttp.ClientSession | None = None, limits: Limits | None = None,
                resume_timeout: float = 30.0, upload: bool = True) -> ClientStream:
    """A resumable stream over Server-Sent Events to ``url`` (as
    :func:`.client.connect_websocket`). ``upload``: the client's frames travel in one
    POST per connection (a line each), not one POST per message; False for a server or
    a proxy that cannot take a request body that streams."""
    http_of = HttpSessions(http, aiohttp.ClientTimeout(total=None, sock_connect=5))

    async def connect() -> Connection:
        return _Events(http_of(), url, headers or {}, upload)

    return ClientStream(connect, limits=limits, resume_timeout=resume_timeout,
                        on_close=http_of.close)
