"""Resumable streams driven as a client sees them: the demo's tally streams
(:mod:`meshxl.demo.tally`) through Envoy, and what became of every message.

Each session keeps one stream (WebSocket, Server-Sent Events or gRPC) open through the
client library (:mod:`meshxl.streams`) and sends ``{"n": N}`` every ``interval`` with a
random N; the server answers each with its number and the tally after it. At the end
every stream is flushed and its answers checked: an answer missing is a message *lost*,
one whose number came before is a *duplicate*, one out of order is *reordered*, and a
tally that is not the sum of what was sent up to it is a message *applied twice* (or
lost on the server). An error that reached the application (the client library raised)
is counted as such. Every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import Any

from meshxl import headers as hdr
from meshxl.stats import summary
from meshxl.streams import ClientStream, connect_sse, connect_websocket

from .wait import WaitTimeout, wait_until

__all__ = ["KINDS", "ProtoTally", "TallyStream", "TallyTraffic"]

KINDS = ("websocket", "sse", "grpc")
OPEN_TIMEOUT = 15.0
DRAIN_TIMEOUT = 30.0
"""How long the end waits for the answers still due."""


@dataclass
class TallyStream:
    """One session's stream and its conversation."""

    session: str
    stream: Any = None
    sent: list[int] = field(default_factory=list)
    answers: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    """(when it arrived, the answer)."""
    error: str | None = None

    def check(self) -> dict[str, int]:
        """What became of its messages (the module docstring)."""
        seqs = [a["seq"] for _, a in self.answers]
        seen: set[int] = set()
        duplicated = reordered = misapplied = 0
        last = 0
        running = 0
        for seq in seqs:
            if seq in seen:
                duplicated += 1
                continue
            seen.add(seq)
            if seq != last + 1:
                reordered += 1
            last = max(last, seq)
        for n, (_, answer) in zip(self.sent, self.answers, strict=False):
            running += n
            if answer.get("total") != running:
                misapplied += 1
        lost = sum(1 for seq in range(1, len(self.sent) + 1) if seq not in seen)
        return {"sent": len(self.sent), "answered": len(seen), "lost": lost,
                "duplicated": duplicated, "reordered": reordered, "misapplied": misapplied,
                "errors": int(self.error is not None)}


class TallyTraffic:
    """Tally streams of one ``kind`` for ``sessions`` sessions until ``until`` (Unix
    seconds). ``url``: Envoy's listener (``http://HOST:PORT``; for gRPC, ``HOST:PORT``)."""

    def __init__(self, url: str, kind: str, sessions: int, until: float, *,
                 interval: float = 0.1, prefix: str = "t", max_messages: int = 10_000,
                 seed: int = 1):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
        self.url, self.kind, self.until = url, kind, until
        self.interval = interval
        self.max_messages = max_messages
        self.streams = [TallyStream(f"{prefix}-{kind}-{i}") for i in range(sessions)]
        self._rng = random.Random(seed)
        self._channel: Any = None

    async def _open_within(self, tally: TallyStream) -> Any:
        async with asyncio.timeout(OPEN_TIMEOUT):
            return await self._open(tally)

    async def _open(self, tally: TallyStream) -> Any:
        headers = {hdr.SESSION: tally.session}
        if self.kind == "websocket":
            ws = self.url.replace("http://", "ws://", 1) + "/streams/ws"
            return await connect_websocket(ws, headers=headers).start()
        if self.kind == "sse":
            return await connect_sse(self.url + "/streams/sse", headers=headers).start()
        from meshxl.local import counter
        from meshxl.streams.grpcio import connect_grpc

        stream = connect_grpc(self._channel, counter.TALK, request_type=counter.TallyRequest,
                              response_type=counter.TallyReply,
                              metadata=[(hdr.SESSION, tally.session)])
        return ProtoTally(await stream.start())

    async def run(self) -> None:
        """Open every stream, talk until ``until``, then wait for what is due (bounded)."""
        if self.kind == "grpc":
            from grpc import aio

            target = self.url.removeprefix("http://")
            self._channel = aio.insecure_channel(target)
        try:
            opened = await asyncio.gather(
                *(self._open_within(t) for t in self.streams),
                return_exceptions=True)
            for tally, stream in zip(self.streams, opened, strict=True):
                if isinstance(stream, BaseException):
                    tally.error = f"open: {type(stream).__name__}: {stream}"
                else:
                    tally.stream = stream
            await asyncio.gather(*(self._talk(t) for t in self.streams if t.stream))
        finally:
            for tally in self.streams:
                if tally.stream is not None:
                    with contextlib.suppress(Exception):
                        await tally.stream.aclose()
            if self._channel is not None:
                await self._channel.close()

    async def _talk(self, tally: TallyStream) -> None:
        reader = asyncio.get_running_loop().create_task(self._read(tally))
        try:
            per_stream = self.max_messages // max(1, len(self.streams))
            while time.time() < self.until and len(tally.sent) < per_stream:
                n = self._rng.randint(1, 9)
                tally.sent.append(n)
                await tally.stream.send({"n": n})
                await asyncio.sleep(self.interval)
            with contextlib.suppress(WaitTimeout):  # what is still missing is lost
                await wait_until(lambda: len(tally.answers) >= len(tally.sent)
                                 or reader.done(), timeout=DRAIN_TIMEOUT, interval=0.02,
                                 what=f"the answers of stream {tally.session}")
        except Exception as exc:  # the library raised: the application would see it
            tally.error = f"{type(exc).__name__}: {exc}"
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _read(self, tally: TallyStream) -> None:
        try:
            while True:
                answer = await tally.stream.receive()
                tally.answers.append((time.time(), answer))
        except EOFError:
            return
        except Exception as exc:
            tally.error = tally.error or f"{type(exc).__name__}: {exc}"

    def report(self, kill_time: float | None = None, killed: str | None = None
               ) -> dict[str, Any]:
        """Totals over the streams; with ``kill_time``: each stream of ``killed`` (the
        member that answered it last before the kill), the time from the kill to its
        first answer from another member."""
        totals: dict[str, int] = {}
        for tally in self.streams:
            for key, value in tally.check().items():
                totals[key] = totals.get(key, 0) + value
        resumes = [r for t in self.streams if t.stream is not None
                   for r in _resumes(t.stream)]
        report: dict[str, Any] = {"kind": self.kind, "streams": len(self.streams), **totals,
                                  "errors_seen": [t.error for t in self.streams if t.error][:5],
                                  "resume_ms": summary([r * 1000 for r in resumes], 1)}
        if kill_time is not None and killed is not None:
            firsts = []
            for tally in self.streams:
                before = [a for at, a in tally.answers if at <= kill_time]
                if not before or before[-1].get("member") != killed:
                    continue
                after = [at for at, a in tally.answers
                         if at > kill_time and a.get("member") != killed]
                if after:
                    firsts.append((after[0] - kill_time) * 1000)
            report["of_killed_member"] = len(firsts)
            report["kill_to_first_answer_ms"] = summary(firsts, 1)
        return report


def _resumes(stream: Any) -> list[float]:
    inner = stream.stream if isinstance(stream, ProtoTally) else stream
    return list(inner.resumes) if isinstance(inner, ClientStream) else []


class ProtoTally:
    """The gRPC tally stream with the JSON tally's messages (``{"n"}`` out, dicts in)."""

    def __init__(self, stream: ClientStream):
        self.stream = stream

    async def send(self, message: dict[str, Any]) -> int:
        from meshxl.local import counter

        return await self.stream.send(counter.TallyRequest(n=message["n"]))

    async def receive(self) -> dict[str, Any]:
        reply = await self.stream.receive()
        return {"seq": reply.seq, "n": reply.n, "total": reply.total, "member": reply.member}

    async def aclose(self) -> None:
        await self.stream.aclose()
