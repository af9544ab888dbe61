"""The clients of ``bench/streams.py``: many streams of the demo's tally
(:mod:`meshxl.demo.tally`), each sending ``{"n": N}`` every ``interval`` and reading the
answers, through Envoy; and the figures measured beside them.

A *kind* (:data:`KINDS`) says how to open one stream, resumable (meshxl's stream
clients) and plain (the same tally without the stream protocol, the fairest equivalent
through the same Envoy), and which deployment serves it: adding a kind (gRPC) is one
entry here. Every stream is its own session (``x-session-id``); its log
(:class:`streamcheck.StreamLog`) records what it sent and received, and any error that
reached the application (an exception from ``send`` or ``receive``), which stops that
stream. Every loop is bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from streamcheck import StreamLog

from meshxl import etcd
from meshxl import headers as hdr
from meshxl.local import counter
from meshxl.local.wait import LocalError, wait_until
from meshxl.statesync.signals import Window
from meshxl.streams import ClientStream, connect_sse, connect_websocket

INTERVAL = 0.2
"""Seconds between one stream's messages: 5 a second each way."""
OPEN_AT_ONCE = 64
"""Streams opened concurrently (a connect storm of 1,000 at once is not this bench)."""


class Conversation(Protocol):
    """One stream's client end as the bench drives it."""

    connections: int

    async def send(self, n: int) -> int: ...

    async def receive(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class _Resumable:
    """meshxl's stream client (:class:`meshxl.streams.ClientStream`)."""

    def __init__(self, stream: ClientStream):
        self.stream = stream

    @property
    def connections(self) -> int:
        return self.stream.connections

    async def send(self, n: int) -> int:
        return await self.stream.send({"n": n})

    async def receive(self) -> dict[str, Any]:
        answer: dict[str, Any] = await self.stream.receive()
        return answer

    async def close(self) -> None:
        await self.stream.aclose()


class _PlainWebSocket:
    """The tally's plain WebSocket (no subprotocol): what the resumable one is beside."""

    connections = 1

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.seq = 0

    async def send(self, n: int) -> int:
        self.seq += 1
        await self.ws.send_str(json.dumps({"n": n}))
        return self.seq

    async def receive(self) -> dict[str, Any]:
        msg = await self.ws.receive()
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise EOFError(f"the WebSocket ended ({msg.type.name})")
        answer: dict[str, Any] = json.loads(msg.data)
        return answer

    async def close(self) -> None:
        await self.ws.close()


class _PlainEvents:
    """The tally's plain Server-Sent Events (``/streams/sse/plain``): the events of one
    GET, the messages POSTed."""

    connections = 1

    def __init__(self, http: aiohttp.ClientSession, url: str, session: str,
                 response: aiohttp.ClientResponse):
        self.http, self.url, self.response = http, url, response
        self.headers = {hdr.SESSION: session, "Content-Type": "application/json"}
        self.seq = 0

    async def send(self, n: int) -> int:
        self.seq += 1
        async with self.http.post(self.url, data=json.dumps({"n": n}),
                                  headers=self.headers) as answer:
            if answer.status != 202:
                raise ConnectionError(f"POST answered {answer.status}: "
                                      f"{(await answer.text())[:120]}")
        return self.seq

    async def receive(self) -> dict[str, Any]:
        data: list[str] = []
        async for raw in self.response.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("data:"):
                data.append(line[5:].lstrip())
            elif not line and data:
                answer: dict[str, Any] = json.loads("\n".join(data))
                return answer
        raise EOFError("the event stream ended")

    async def close(self) -> None:
        self.response.close()


class _ResumableGrpc(_Resumable):
    """meshxl's gRPC stream client: the tally's protobuf messages."""

    async def send(self, n: int) -> int:
        return await self.stream.send(counter.TallyRequest(n=n))

    async def receive(self) -> dict[str, Any]:
        return _reply(await self.stream.receive())


class _PlainGrpc:
    """The tally's plain bidirectional call (``PlainTalk``, no stream protocol)."""

    connections = 1

    def __init__(self, call: Any):
        self.call = call
        self.seq = 0

    async def send(self, n: int) -> int:
        self.seq += 1
        await self.call.write(counter.TallyRequest(n=n))
        return self.seq

    async def receive(self) -> dict[str, Any]:
        from grpc import aio

        reply = await self.call.read()
        if reply is aio.EOF:
            raise EOFError("the call ended")
        return _reply(reply)

    async def close(self) -> None:
        self.call.cancel()


def _reply(reply: Any) -> dict[str, Any]:
    return {"seq": reply.seq, "n": reply.n, "total": reply.total, "member": reply.member}


Opener = Callable[["Load", str], Awaitable[Conversation]]
"""How a kind opens one stream of ``session`` for a :class:`Load` (its HTTP session,
its gRPC channel, its target)."""


async def _resumable_ws(load: Load, session: str) -> Conversation:
    stream = connect_websocket(f"ws://{load.target}/streams/ws",
                               headers={hdr.SESSION: session}, http=load.http)
    return _Resumable(await stream.start())


async def _resumable_sse(load: Load, session: str) -> Conversation:
    stream = connect_sse(f"http://{load.target}/streams/sse", headers={hdr.SESSION: session},
                         http=load.http)
    return _Resumable(await stream.start())


async def _resumable_grpc(load: Load, session: str) -> Conversation:
    from meshxl.streams.grpcio import connect_grpc

    stream = connect_grpc(load.channel(), counter.TALK, response_type=counter.TallyReply,
                          request_type=counter.TallyRequest,
                          metadata=[(hdr.SESSION, session)])
    return _ResumableGrpc(await stream.start())


async def _plain_ws(load: Load, session: str) -> Conversation:
    assert load.http is not None
    ws = await load.http.ws_connect(f"ws://{load.target}/streams/ws",
                                    headers={hdr.SESSION: session}, heartbeat=None)
    return _PlainWebSocket(ws)


async def _plain_sse(load: Load, session: str) -> Conversation:
    assert load.http is not None
    url = f"http://{load.target}/streams/sse/plain"
    response = await load.http.get(url, headers={hdr.SESSION: session,
                                                 "Accept": "text/event-stream"})
    if response.status != 200:
        response.close()
        raise ConnectionError(f"GET {url} answered {response.status}")
    return _PlainEvents(load.http, url, session, response)


async def _plain_grpc(load: Load, session: str) -> Conversation:
    talk = load.channel().stream_stream(
        counter.PLAIN_TALK, request_serializer=counter.TallyRequest.SerializeToString,
        response_deserializer=counter.TallyReply.FromString)
    return _PlainGrpc(talk(metadata=[(hdr.SESSION, session)]))


@dataclass(frozen=True)
class Kind:
    """A stream kind the bench measures."""

    name: str
    label: str
    protocol: str
    """The deployment that serves it (``DemoDeployment(protocol=...)``)."""
    resumable: Opener
    plain: Opener
    plain_label: str
    requests: str
    """The requests whose RTO under the same kill is the resume time's reference: the
    demo's HTTP counter (``http``), or its unary gRPC calls (``grpc``)."""


KINDS: dict[str, Kind] = {
    "websocket": Kind("websocket", "WebSocket", "websocket", _resumable_ws, _plain_ws,
                      "plain WebSocket of the same tally (no subprotocol)", "http"),
    "sse": Kind("sse", "Server-Sent Events", "websocket", _resumable_sse, _plain_sse,
                "plain event stream + POSTs of the same tally (/streams/sse/plain)", "http"),
    "grpc": Kind("grpc", "gRPC bidirectional", "grpc", _resumable_grpc, _plain_grpc,
                 "plain bidirectional call of the same tally (PlainTalk)", "grpc"),
}


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


class Load:
    """``count`` streams of one kind (resumable or plain) through ``base`` (Envoy's
    listener), each sending every ``interval`` from :meth:`start` to :meth:`stop`."""

    def __init__(self, opener: Opener, target: str, count: int, prefix: str,
                 interval: float = INTERVAL):
        self.opener, self.target, self.count, self.interval = opener, target, count, interval
        self.logs = [StreamLog(f"{prefix}{k:04d}") for k in range(count)]
        self.conversations: list[Conversation | None] = [None] * count
        self._tasks: list[asyncio.Task[None]] = []
        self._sending = False
        self._marks: list[int] = []
        self.http: aiohttp.ClientSession | None = None
        self._channel: Any = None

    def channel(self) -> Any:
        """One gRPC channel to Envoy for every stream (HTTP/2: one connection, each
        call routed by its session's metadata), made on first use."""
        if self._channel is None:
            from grpc import aio

            self._channel = aio.insecure_channel(self.target)
        return self._channel

    async def open(self, timeout: float) -> None:
        """Open every stream (``OPEN_AT_ONCE`` at a time); raises if one cannot be."""
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
        gate = asyncio.Semaphore(OPEN_AT_ONCE)

        async def one(k: int) -> None:
            async with gate:
                self.conversations[k] = await self.opener(self, self.logs[k].id)

        async with asyncio.timeout(timeout):
            await asyncio.gather(*(one(k) for k in range(self.count)))

    def start(self) -> None:
        self._sending = True
        t0 = time.monotonic()
        for k, conv in enumerate(self.conversations):
            assert conv is not None
            self._tasks.append(asyncio.create_task(self._send(conv, self.logs[k], k, t0)))
            self._tasks.append(asyncio.create_task(self._receive(conv, self.logs[k])))

    async def _send(self, conv: Conversation, log: StreamLog, k: int, t0: float) -> None:
        rng = random.Random(f"{log.id}")
        next_at = t0 + self.interval * k / self.count  # spread over one interval
        while self._sending:
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if not self._sending:
                return
            n = rng.randint(1, 9)
            sent = time.time()
            try:
                seq = await conv.send(n)
            except Exception as exc:  # noqa: BLE001 - what reaches the application
                log.errors.append(f"send: {_describe(exc)}")
                return
            log.sent.append((seq, n, sent))
            next_at += self.interval
            now = time.monotonic()
            if next_at < now - self.interval:  # fell behind: no burst to catch up
                next_at = now

    async def _receive(self, conv: Conversation, log: StreamLog) -> None:
        while True:
            try:
                a = await conv.receive()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - what reaches the application
                log.errors.append(f"receive: {_describe(exc)}")
                return
            log.answers.append((int(a["seq"]), int(a.get("n", 0)), a.get("total"),
                                a.get("member"), time.time(), conv.connections))

    def mark(self) -> None:
        """Remember each stream's connection now (:meth:`resumed` counts from here)."""
        self._marks = [c.connections if c is not None else 0 for c in self.conversations]

    def resumed(self, since: float) -> int:
        """Streams that received an answer since ``since`` on a later connection than
        the one :meth:`mark` saw."""
        return sum(1 for log, mark in zip(self.logs, self._marks, strict=True)
                   if log.answers and log.answers[-1][4] >= since
                   and log.answers[-1][5] > mark)

    def answered(self) -> bool:
        return all(len({a[0] for a in log.answers}) >= len(log.sent) or log.errors
                   for log in self.logs)

    def stop_sending(self) -> None:
        self._sending = False

    async def close(self, drain: float) -> None:
        """Stop sending, wait for every answer while they keep coming (``drain``
        seconds without one, at most six times that in all), close."""
        self._sending = False
        deadline = time.monotonic() + 6 * drain
        while time.monotonic() < deadline and not self.answered():
            count = sum(len(log.answers) for log in self.logs)
            with contextlib.suppress(LocalError):
                await wait_until(lambda count=count: self.answered() or sum(
                    len(log.answers) for log in self.logs) > count,
                    timeout=drain, interval=0.2, what="another answer")
            if sum(len(log.answers) for log in self.logs) == count:
                break  # none for ``drain`` seconds: what is left is not coming
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for k, conv in enumerate(self.conversations):
            if conv is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(5):
                        await conv.close()
                if isinstance(conv, _Resumable):
                    self.logs[k].resumes = list(conv.stream.resumes)
        if self.http is not None:
            await self.http.close()
        if self._channel is not None:
            await self._channel.close()


# -- what is measured beside the streams ---------------------------------------------------


class CommitProbe:
    """One etcd put at a time to the deployment's etcd, every ``interval``: what one
    commit costs on this machine at this moment (a Raft round with its fsync), the
    floor of what making a message durable can cost."""

    def __init__(self, url: str, key: str, interval: float = 0.05):
        self.url, self.key, self.interval = url, key.encode(), interval
        self.times_ms: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        client = etcd.client(self.url)
        await client.connect()
        try:
            k = 0
            while True:
                k += 1
                t = time.perf_counter()
                await client.put(self.key, f"probe {k}".encode())
                self.times_ms.append((time.perf_counter() - t) * 1000)
                await asyncio.sleep(self.interval)
        finally:
            await client.close()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


class LoopLagLog(Window):
    """Every lag :class:`~meshxl.statesync.signals.LoopLag` samples, with its time
    (Unix seconds): how late this process's own loop ran, that is, how late the bench's
    clients read what reached them. A client starved of its CPU sees a stream come back
    late that the mesh brought back at once."""

    def __init__(self) -> None:
        super().__init__(clock=time.time)
        self.log: list[tuple[float, float]] = []

    def add(self, value: float) -> None:
        self.log.append((time.time(), value))

    def ms(self, start: float, end: float = float("inf")) -> list[float]:
        return [v * 1000 for t, v in self.log if start <= t <= end]


async def sidecar_counters(url: str) -> dict[str, float]:
    """The sidecar's bulk saves, their sessions and its etcd transactions (``/metrics``)."""
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http, \
            http.get(f"{url}/metrics") as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "meshxl_statesync_bulk_requests_total" and s.labels.get("kind") \
                    == "save":
                out["bulk_saves"] = s.value
            elif s.name == "meshxl_statesync_bulk_items_total" and s.labels.get("kind") \
                    == "save":
                out["bulk_saved_sessions"] = s.value
            elif s.name == "meshxl_statesync_transactions_total":
                out["transactions"] = out.get("transactions", 0.0) + s.value
            elif s.name in ("meshxl_statesync_batch_duration_seconds_sum",
                            "meshxl_statesync_batch_duration_seconds_count"):
                key = "batch_seconds_sum" if s.name.endswith("_sum") else "batches"
                out[key] = out.get(key, 0.0) + s.value
    return out


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all cores since boot (``/proc/stat``)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def load_now() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
