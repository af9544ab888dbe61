"""The demo's resumable streams: a running tally each session keeps over a stream that
outlives its member (docs/streams.md).

``GET /streams/ws`` (a WebSocket of :data:`meshxl.streams.SUBPROTOCOL`, header
``x-session-id``): each client message ``{"n": N}`` adds N to the stream's tally, and
is answered ``{"seq": S, "n": N, "total": T, "member": M}``: S the number of the client
message, T the tally after it, M the member that answered. The tally is the stream's
committed state, so after a kill -9 of the member the handler goes on elsewhere from
it: a message applied twice (or lost) would show in the totals, which the client can
check against what it sent. A client without the stream protocol gets an ordinary
WebSocket of the same tally, kept in the process only (it starts again from 0 when it
reconnects).

``/streams/sse``: the same tally as Server-Sent Events (``GET``: the answers as events;
``POST``: the messages, :mod:`meshxl.streams.sse`). ``/streams/sse/plain``: the same
without the stream protocol (``GET`` opens the session's event stream, each ``POST`` of
``{"n": N}`` is answered 202 and its answer sent as an event on it; kept in the process
only, like the plain WebSocket): what ``bench/streams.py`` measures the resumable one
beside.

gRPC (:mod:`meshxl.demo.grpc_app`, service ``meshxl.demo.v1.Tally`` of
:mod:`meshxl.local.counter`): ``Talk``, the same tally over a bidirectional stream, and
``Ticks``, a server stream of ``count`` ticks ``interval_ms`` apart whose ``seq``
counts them (the count is the stream's committed state: it goes on from there on the
member that takes the stream over). ``PlainTalk``: ``Talk`` without the stream protocol
(the tally kept by the call, in the process only), what ``bench/streams.py`` measures
it beside.

``/streams/``: a page that keeps both in a browser (:mod:`meshxl.demo.tally_page`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from aiohttp import web

from meshxl import headers as hdr
from meshxl.demo import tally_page
from meshxl.streams import ServerStream, StreamHost, server_sent_events, websocket

__all__ = ["add_routes", "grpc_handlers", "tally"]


def _amount(message: Any) -> int:
    if isinstance(message, dict) and isinstance(message.get("n"), int) \
            and not isinstance(message.get("n"), bool):
        return int(message["n"])
    raise ValueError('a tally message is {"n": <integer>}')


def tally(member: str) -> Any:
    """The handler of one member's tally streams."""

    async def run(stream: ServerStream) -> None:
        total = int((stream.state or {}).get("total", 0))
        async for message in stream:
            try:
                n = _amount(message)
            except ValueError as exc:
                await stream.send({"seq": stream.seq, "error": str(exc), "member": member})
                continue
            total += n
            stream.state = {"total": total}
            await stream.send({"seq": stream.seq, "n": n, "total": total, "member": member})

    return run


async def _plain(request: web.Request, member: str) -> web.StreamResponse:
    ws = web.WebSocketResponse(heartbeat=None)
    await ws.prepare(request)
    total = seq = 0
    async for msg in ws:
        if msg.type != web.WSMsgType.TEXT:
            continue
        try:
            import json

            n = _amount(json.loads(msg.data))
        except ValueError as exc:
            await ws.send_json({"error": str(exc), "member": member})
            continue
        seq += 1
        total += n
        await ws.send_json({"seq": seq, "n": n, "total": total, "member": member})
    return ws


class _PlainEvents:
    """One session's plain event stream (``/streams/sse/plain``) and its tally."""

    def __init__(self, response: web.StreamResponse):
        self.response = response
        self.lock = asyncio.Lock()
        self.closed = asyncio.Event()
        self.seq = self.total = 0


def _plain_sse(member: str) -> Any:
    """The plain (non-resumable) Server-Sent Events of the tally (module docstring)."""
    streams: dict[str, _PlainEvents] = {}

    async def serve(request: web.Request) -> web.StreamResponse:
        session = request.headers.get(hdr.SESSION)
        if not session:
            return web.json_response({"error": f"send the {hdr.SESSION} header"}, status=400)
        if request.method == "POST":
            events = streams.get(session)
            if events is None:
                return web.json_response({"error": "no event stream of this session here: "
                                                   "GET it first"}, status=409)
            try:
                n = _amount(json.loads(await request.read()))
            except ValueError as exc:
                return web.json_response({"error": str(exc)}, status=400)
            async with events.lock:
                events.seq += 1
                events.total += n
                answer = {"seq": events.seq, "n": n, "total": events.total, "member": member}
                try:
                    await events.response.write(f"data: {json.dumps(answer)}\n\n".encode())
                except (ConnectionError, RuntimeError):
                    events.closed.set()
                    return web.json_response({"error": "the event stream closed"},
                                             status=409)
            return web.json_response({"seq": answer["seq"]}, status=202)
        if request.method != "GET":
            return web.json_response({"error": "GET events, POST messages"}, status=405,
                                     headers={"Allow": "GET, POST"})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        events = streams[session] = _PlainEvents(response)
        try:  # a ping every 2 s finds a client that went away
            while not events.closed.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await events.closed.wait()
                async with events.lock:
                    await response.write(b": ping\n\n")
        except (ConnectionError, RuntimeError):
            pass
        finally:
            if streams.get(session) is events:
                del streams[session]
        return response

    return serve


def add_routes(app: web.Application, host: StreamHost, member: str) -> None:
    async def plain(request: web.Request) -> web.StreamResponse:
        return await _plain(request, member)

    app.router.add_get("/streams/ws", websocket(host, tally(member), plain=plain))
    app.router.add_route("*", "/streams/sse", server_sent_events(host, tally(member)))
    app.router.add_route("*", "/streams/sse/plain", _plain_sse(member))
    tally_page.add_routes(app)


def grpc_handlers(host: StreamHost, member: str) -> Any:
    """The gRPC tally service's method handlers (``Talk``, ``Ticks``, ``PlainTalk``)."""
    import asyncio

    import grpc

    from meshxl.local import counter
    from meshxl.streams.grpcio import GrpcStream, stream_stream, unary_stream

    async def talk(stream: GrpcStream) -> None:
        total = int((stream.state or {}).get("total", 0))
        async for message in stream:
            total += message.n
            stream.state = {"total": total}
            await stream.send(counter.TallyReply(seq=stream.seq, n=message.n, total=total,
                                                 member=member))

    async def ticks(stream: GrpcStream) -> None:
        interval = max(stream.request.interval_ms, 1) / 1000
        tick = int((stream.state or {}).get("tick", 0))
        while stream.request.count == 0 or tick < stream.request.count:
            tick += 1
            await stream.send(counter.TallyReply(seq=tick, member=member),
                              state={"tick": tick})
            await asyncio.sleep(interval)

    async def plain_talk(requests: Any, context: Any) -> Any:
        total = seq = 0
        async for message in requests:
            seq += 1
            total += message.n
            yield counter.TallyReply(seq=seq, n=message.n, total=total, member=member)

    return grpc.method_handlers_generic_handler(counter.TALLY, {
        "Talk": stream_stream(host, talk, request_type=counter.TallyRequest,
                              response_type=counter.TallyReply),
        "PlainTalk": grpc.stream_stream_rpc_method_handler(
            plain_talk, request_deserializer=counter.TallyRequest.FromString,
            response_serializer=counter.TallyReply.SerializeToString),
        "Ticks": unary_stream(host, ticks, request_type=counter.WatchRequest,
                              response_type=counter.TallyReply)})
