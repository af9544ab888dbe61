"""Session traffic against the sample app through Envoy, as a client sees it.

:class:`Traffic` drives sticky sessions (``POST /counter``, one request at a time per
session, :data:`REQUEST_INTERVAL` apart), bounded in time and in count, and keeps one
:class:`Record` per request; :func:`read_back` reads every session's last ``seq`` once
the run is over. The demo, the benchmarks and the integration tests drive their load
with these; :mod:`meshxl.local.report` computes what the records say.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshxl import headers as hdr
from meshxl.telemetry import names

REQUEST_INTERVAL = 0.1
"""Pause between one session's requests: 10 requests/s per session."""


@dataclass
class Record:
    """One client request through Envoy; times are Unix seconds."""

    sent: float
    ended: float
    session: str
    status: int
    """HTTP status; 0 when no answer came (connection error, timeout)."""
    member: str | None = None
    seq: int | None = None
    method: str = "POST"
    error: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class Traffic:
    """Steady session traffic through Envoy, one request at a time per session."""

    def __init__(self, url: str, sessions: int, until: float, max_requests: int,
                 trace_file: Path | None = None,
                 interval: float = REQUEST_INTERVAL, prefix: str = "s",
                 pin_header: str | None = None, request_timeout: float = 5.0,
                 traced: bool = True) -> None:
        """``url`` may be changed while it runs (a site's clients sent to the other
        site); ``pin_header``: the header Envoy pins sessions with, kept per session
        and sent back, as a client of a pinned cluster does; ``request_timeout``: how
        long a request may take before the client gives it up (a failure); ``traced``:
        the client starts every request's trace, sampled (False: it sends no
        ``traceparent``, and Envoy's own sampling decides)."""
        self.traced = traced
        self.url = url
        self.request_timeout = request_timeout
        self.interval = interval
        self.trace_file = trace_file
        self.sessions = [f"{prefix}{i:03d}" for i in range(sessions)]
        self.pin_header = pin_header
        self.pins: dict[str, str] = {}
        self._inflight: dict[str, asyncio.Task[Record]] = {}
        self._redirected: set[str] = set()
        self.until = until
        self.max_requests = max_requests
        self.records: list[Record] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self.failures = 0

    async def run(self) -> None:
        import aiohttp
        from opentelemetry.exporter.otlp.json.file.trace_exporter import FileSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        from meshxl.telemetry.http import client_trace_configs

        # The client starts every request's trace (W3C traceparent through Envoy, the
        # app and its sidecar). A provider of this run's own: a process sets its global
        # provider once, and the demo may run several times in one process (tests).
        provider = TracerProvider(resource=Resource.create(
            {"service.name": "meshxl-demo-client", names.COMPONENT: "demo"}))
        if self.trace_file is not None:
            provider.add_span_processor(BatchSpanProcessor(FileSpanExporter(str(self.trace_file)),
                                                           schedule_delay_millis=500))
        timeout = aiohttp.ClientTimeout(total=self.request_timeout)
        connector = aiohttp.TCPConnector(limit=len(self.sessions) + 4)
        try:
            async with aiohttp.ClientSession(
                    timeout=timeout, connector=connector,
                    trace_configs=client_trace_configs(tracer_provider=provider)
                    if self.traced else []) as http:
                await asyncio.gather(*(self._session(http, s, k)
                                       for k, s in enumerate(self.sessions)))
        finally:
            provider.shutdown()

    def redirect(self, url: str) -> None:
        """From now on to ``url``; requests in flight are abandoned (a failure each), as
        a client gives up on a site it was told is gone."""
        self.url = url
        for session, call in list(self._inflight.items()):
            self._redirected.add(session)
            call.cancel()

    async def _session(self, http: Any, session: str, k: int) -> None:
        # Spread the sessions' first requests over one interval.
        await asyncio.sleep(self.interval * k / len(self.sessions))
        while time.time() < self.until and len(self.records) < self.max_requests:
            sent = time.time()
            call = asyncio.create_task(request(http, self.url, session, "POST",
                                               self.pin_header, self.pins))
            self._inflight[session] = call
            try:
                record = await call
            except asyncio.CancelledError:
                if session not in self._redirected:
                    raise
                self._redirected.discard(session)
                record = Record(sent, time.time(), session, 0, error="redirected")
            finally:
                self._inflight.pop(session, None)
            self.records.append(record)
            if record.ok and record.member:
                self.counts[record.member] += 1
            else:
                self.failures += 1
            await asyncio.sleep(self.interval)


async def request(http: Any, url: str, session: str, method: str,
                  pin_header: str | None = None, pins: dict[str, str] | None = None) -> Record:
    import aiohttp

    sent = time.time()
    headers = {hdr.SESSION: session}
    if pin_header and pins and session in pins:
        headers[pin_header] = pins[session]
    try:
        async with http.request(method, url, headers=headers) as resp:
            body = await resp.read()
            member = resp.headers.get(hdr.MEMBER)
            if pin_header and pins is not None and pin_header in resp.headers:
                pins[session] = resp.headers[pin_header]
            seq = None
            if resp.status == 200:
                with contextlib.suppress(ValueError, AttributeError, TypeError):
                    seq = int(json.loads(body)["seq"])
            return Record(sent, time.time(), session, resp.status, member, seq, method,
                          "" if resp.status == 200 else body[:200].decode(errors="replace"))
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Record(sent, time.time(), session, 0, None, None, method,
                      type(exc).__name__)


async def read_back(url: str, sessions: Sequence[str]) -> tuple[dict[str, int | None],
                                                                  list[Record]]:
    import aiohttp

    final: dict[str, int | None] = {}
    records: list[Record] = []
    gate = asyncio.Semaphore(16)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0)) as http:
        async def one(session: str) -> None:
            async with gate:
                for _ in range(3):
                    r = await request(http, url, session, "GET")
                    if r.ok:
                        break
                    await asyncio.sleep(0.2)
                records.append(r)
                final[session] = r.seq if r.ok else None
        await asyncio.gather(*(one(s) for s in sessions))
    return final, records


__all__ = ["REQUEST_INTERVAL", "Record", "Traffic", "read_back", "request"]
