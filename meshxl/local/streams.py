"""Session traffic over gRPC, WebSocket and TCP through Envoy, as a client sees it.

The counterparts of :class:`meshxl.local.traffic.Traffic` for the demo counter's other
protocols (:mod:`meshxl.local.counter`): each session increments its counter every
``interval`` and keeps one :class:`~meshxl.local.traffic.Record` per acknowledged
increment (``POST``, status 200, the member and ``seq`` of the answer), so the report,
the lost-write and the RTO computations read them as they read HTTP's.

* ``grpc``: unary ``Increment`` calls on one channel (HTTP/2 to Envoy); a failed call is
  a record with status 0 and the gRPC status name;
* ``grpc-stream``: one server-streaming ``Watch`` per session; when the stream breaks
  the client opens a new one at once;
* ``websocket``: one WebSocket per session (``/counter/ws``) sending ``inc``;
* ``tcp``: one connection per session sending ``INC`` lines, each session from its own
  loopback source address (127.0.0.10, .11, ...) so Envoy's source-address hash has
  many clients to place.

For the long-lived kinds a broken connection is re-established and the request that
was in flight is sent again; each re-establishment is a :class:`Reconnect` (when the
client saw the break, when the first answer came on the new connection, from which
member, and the ``seq`` before and after: the new owner must continue the count). A
request counts as failed only when no connection could be re-established for
:data:`RECONNECT_DEADLINE` seconds. Every loop is bounded in time and count.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from meshxl import headers as hdr

from . import counter
from .traffic import REQUEST_INTERVAL, Record

__all__ = ["KINDS", "RECONNECT_DEADLINE", "Reconnect", "StreamTraffic", "read_back_kind",
           "reconnect_report", "source_address"]

KINDS = ("grpc", "grpc-stream", "websocket", "tcp")
RECONNECT_DEADLINE = 10.0
"""How long a client keeps reconnecting before it counts its request as failed."""
CALL_TIMEOUT = 5.0
_PAUSE = 0.02


@dataclass
class Reconnect:
    """A long-lived connection that broke and was opened again (Unix seconds)."""

    session: str
    broken: float
    answered: float
    """The first answer on the new connection."""
    member_before: str | None
    member_after: str | None
    seq_before: int | None
    seq_after: int | None
    attempts: int = 1
    error: str = ""
    """What the client saw when the connection broke."""


def source_address(index: int) -> str:
    """The loopback address a TCP session ``index`` connects from (127.0.0.10 on)."""
    n = 10 + index
    return f"127.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}"


class _Broken(Exception):
    """The connection broke (or never opened); the request is sent again."""


class StreamTraffic:
    """Steady session traffic of one kind (:data:`KINDS`) through Envoy."""

    def __init__(self, kind: str, target: str, sessions: int, until: float,
                 max_requests: int, interval: float = REQUEST_INTERVAL,
                 prefix: str = "s") -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.kind = kind
        self.target = target
        self.interval = interval
        self.sessions = [f"{prefix}{i:03d}" for i in range(sessions)]
        self.until = until
        self.max_requests = max_requests
        self.records: list[Record] = []
        self.reconnects: list[Reconnect] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self.failures = 0

    def _more(self) -> bool:
        return time.time() < self.until and len(self.records) < self.max_requests

    def _add(self, record: Record) -> None:
        self.records.append(record)
        if record.ok and record.member:
            self.counts[record.member] += 1
        else:
            self.failures += 1

    async def run(self) -> None:
        import grpc

        channel = grpc.aio.insecure_channel(self.target) if self.kind == "grpc" else None
        try:
            await asyncio.gather(*(self._session(channel, s, k)
                                   for k, s in enumerate(self.sessions)))
        finally:
            if channel is not None:
                await channel.close()

    async def _session(self, channel: Any, session: str, k: int) -> None:
        await asyncio.sleep(self.interval * k / len(self.sessions))
        if self.kind == "grpc":
            await self._unary(channel, session)
        else:
            await self._long_lived(session, k)

    # -- unary gRPC ------------------------------------------------------------------------

    async def _unary(self, channel: Any, session: str) -> None:
        import grpc

        increment = channel.unary_unary(
            counter.INCREMENT, request_serializer=counter.CounterRequest.SerializeToString,
            response_deserializer=counter.CounterReply.FromString)
        while self._more():
            sent = time.time()
            try:
                reply = await increment(counter.CounterRequest(), timeout=CALL_TIMEOUT,
                                        metadata=((hdr.SESSION, session),))
            except grpc.aio.AioRpcError as exc:
                self._add(Record(sent, time.time(), session, 0, None, None, "POST",
                                 f"{exc.code().name}: {exc.details()}"[:200]))
            else:
                self._add(Record(sent, time.time(), session, 200, reply.member, reply.seq))
            await asyncio.sleep(self.interval)

    # -- long-lived connections --------------------------------------------------------------

    async def _long_lived(self, session: str, k: int) -> None:
        connection: Any = None
        last: Record | None = None
        broken_at: float | None = None
        attempts = 0
        why = ""
        try:
            while self._more():
                sent = time.time()
                while True:
                    try:
                        if connection is None:
                            attempts += 1
                            connection = await self._open(session, k)
                        member, seq = await connection.next()
                        break
                    except _Broken as exc:
                        if connection is not None:
                            await connection.close()
                            connection = None
                        now = time.time()
                        if broken_at is None:
                            broken_at, why = now, str(exc)[:200]
                        if now - broken_at > RECONNECT_DEADLINE or not self._more():
                            self._add(Record(sent, now, session, 0, None, None, "POST",
                                             str(exc)[:200] or type(exc).__name__))
                            broken_at, attempts = None, 0
                            sent = time.time()
                            if not self._more():
                                return
                        await asyncio.sleep(_PAUSE)
                record = Record(sent, time.time(), session, 200, member, seq)
                if broken_at is not None:
                    self.reconnects.append(Reconnect(
                        session, broken_at, record.ended, last.member if last else None,
                        member, last.seq if last else None, seq, attempts, why))
                    broken_at = None
                # Dials count from the last answer: a reconnect's are its own.
                attempts = 0
                self._add(record)
                last = record
                if self.kind != "grpc-stream":
                    await asyncio.sleep(self.interval)
        finally:
            if connection is not None:
                await connection.close()

    async def _open(self, session: str, k: int) -> Any:
        opener: Any = {"grpc-stream": _WatchStream, "websocket": _WebSocket,
                       "tcp": _Line}[self.kind]
        conn = opener(self.target, session, k, self.interval)
        try:
            await conn.open()
        except _Broken:
            await conn.close()
            raise
        return conn


class _WatchStream:
    """One ``Watch`` stream: each message is one acknowledged increment."""

    def __init__(self, target: str, session: str, k: int, interval: float) -> None:
        self.target, self.session, self.interval = target, session, interval
        self.channel: Any = None
        self.call: Any = None

    async def open(self) -> None:
        import grpc

        self.channel = grpc.aio.insecure_channel(self.target)
        watch = self.channel.unary_stream(
            counter.WATCH, request_serializer=counter.WatchRequest.SerializeToString,
            response_deserializer=counter.CounterReply.FromString)
        self.call = watch(counter.WatchRequest(interval_ms=round(self.interval * 1000)),
                          metadata=((hdr.SESSION, self.session),))

    async def next(self) -> tuple[str, int]:
        import grpc

        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                reply = await self.call.read()
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            raise _Broken(_describe(exc)) from None
        if reply is grpc.aio.EOF:
            raise _Broken("the stream ended")
        return reply.member, reply.seq

    async def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
        if self.channel is not None:
            await self.channel.close()


class _WebSocket:
    """A WebSocket on ``/counter/ws``: ``inc`` -> one acknowledged increment."""

    def __init__(self, target: str, session: str, k: int, interval: float) -> None:
        self.target, self.session = target, session
        self.http: Any = None
        self.ws: Any = None

    async def open(self) -> None:
        import aiohttp

        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        try:
            self.ws = await self.http.ws_connect(
                f"http://{self.target}/counter/ws", headers={hdr.SESSION: self.session},
                timeout=aiohttp.ClientWSTimeout(ws_close=1.0), autoping=True)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _Broken(_describe(exc)) from None

    async def next(self) -> tuple[str, int]:
        import aiohttp

        try:
            await self.ws.send_str("inc")
            async with asyncio.timeout(CALL_TIMEOUT):
                message = await self.ws.receive()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _Broken(_describe(exc)) from None
        if message.type != aiohttp.WSMsgType.TEXT:
            raise _Broken(f"websocket {message.type.name.lower()}")
        answer = json.loads(message.data)
        if "seq" not in answer:
            raise _Broken(str(answer.get("error", answer))[:200])
        return str(answer["member"]), int(answer["seq"])

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
        if self.http is not None:
            await self.http.close()


class _Line:
    """A TCP connection from the session's own source address, ``INC`` lines."""

    def __init__(self, target: str, session: str, k: int, interval: float) -> None:
        self.host, _, port = target.rpartition(":")
        self.port = int(port)
        self.session, self.source = session, source_address(k)
        self.reader: Any = None
        self.writer: Any = None

    async def open(self) -> None:
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                self.reader, self.writer = await asyncio.open_connection(
                    self.host, self.port, local_addr=(self.source, 0))
        except (OSError, TimeoutError) as exc:
            raise _Broken(_describe(exc)) from None

    async def next(self) -> tuple[str, int]:
        try:
            self.writer.write(counter.tcp_request("INC", self.session))
            await self.writer.drain()
            async with asyncio.timeout(CALL_TIMEOUT):
                line = await self.reader.readline()
            member, _, seq = counter.parse_tcp_answer(line)
        except (OSError, TimeoutError, ValueError) as exc:
            raise _Broken(_describe(exc)) from None
        return member, seq

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()


def _describe(exc: BaseException) -> str:
    # A gRPC error's code() is a method; aiohttp's ClientResponseError.code a property,
    # deprecated (read on the class, its getter does not run and warn).
    if callable(getattr(type(exc), "code", None)):
        return f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
    return f"{type(exc).__name__}: {exc}".strip().rstrip(":")


async def read_back_kind(kind: str, target: str, sessions: Sequence[str],
                         ) -> tuple[dict[str, int | None], list[Record]]:
    """Every session's counter read once over the kind's protocol (``GET`` records)."""
    final: dict[str, int | None] = {}
    records: list[Record] = []
    gate = asyncio.Semaphore(16)

    async def one(k: int, session: str) -> None:
        async with gate:
            for _ in range(3):
                sent = time.time()
                try:
                    member, seq = await _read_one(kind, target, session, k)
                except Exception as exc:  # noqa: BLE001 - a failed read is recorded
                    record = Record(sent, time.time(), session, 0, None, None, "GET",
                                    _describe(exc)[:200])
                    await asyncio.sleep(0.2)
                    continue
                record = Record(sent, time.time(), session, 200, member, seq, "GET")
                break
            records.append(record)
            final[session] = record.seq if record.ok else None

    await asyncio.gather(*(one(k, s) for k, s in enumerate(sessions)))
    return final, records


async def _read_one(kind: str, target: str, session: str, k: int) -> tuple[str, int]:
    if kind in ("grpc", "grpc-stream"):
        import grpc

        async with grpc.aio.insecure_channel(target) as channel:
            current = channel.unary_unary(
                counter.CURRENT, request_serializer=counter.CounterRequest.SerializeToString,
                response_deserializer=counter.CounterReply.FromString)
            reply = await current(counter.CounterRequest(), timeout=CALL_TIMEOUT,
                                  metadata=((hdr.SESSION, session),))
            return reply.member, reply.seq
    if kind == "websocket":
        ws = _WebSocket(target, session, k, 0)
        try:
            await ws.open()
            await ws.ws.send_str("get")
            async with asyncio.timeout(CALL_TIMEOUT):
                answer = json.loads((await ws.ws.receive()).data)
            return str(answer["member"]), int(answer["seq"])
        finally:
            await ws.close()
    line = _Line(target, session, k, 0)
    try:
        await line.open()
        line.writer.write(counter.tcp_request("GET", session))
        async with asyncio.timeout(CALL_TIMEOUT):
            member, _, seq = counter.parse_tcp_answer(await line.reader.readline())
        return member, seq
    finally:
        await line.close()


def reconnect_report(reconnects: Sequence[Reconnect], kill_time: float | None,
                     killed: str | None) -> dict[str, Any]:
    """What the clients of long-lived connections saw (pure): how many connections
    broke and were re-established, the time from the kill (and from the break the
    client saw) to the first answer on the new connection, where they went, and
    whether every new owner continued the session's count (``state_intact``)."""
    from meshxl.stats import summary

    def ms(values: Sequence[float]) -> dict[str, Any]:
        s = summary(values)
        return {"count": s["n"], **{k: round(s[k], 1) for k in ("p50", "p99", "max")
                                    if k in s}}

    of_killed = [r for r in reconnects if killed is None or r.member_before == killed]
    after_kill = [r for r in of_killed if kill_time is None or r.broken >= kill_time]
    return {
        "reconnects": len(reconnects),
        "of_killed_member": len(of_killed),
        "kill_to_first_answer_ms": ms([(r.answered - kill_time) * 1000 for r in after_kill])
        if kill_time is not None else ms([]),
        "break_to_first_answer_ms": ms([(r.answered - r.broken) * 1000 for r in after_kill]),
        "moved_to": dict(collections.Counter(str(r.member_after) for r in after_kill)),
        "state_intact": all(r.seq_after is not None and (r.seq_before is None
                                                         or r.seq_after > r.seq_before)
                            for r in reconnects),
    }
