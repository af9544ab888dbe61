"""The sidecar's HTTP server: listening sockets, the once-a-second sweep (the ``Date`` of
answers, connections past their deadline) and shutdown. Connections do the rest
(:mod:`.connection`)."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import time
from collections.abc import Callable

from meshxl.httpbase import BODY_TIMEOUT, HEADER_TIMEOUT, WRITE_TIMEOUT

from .connection import Connection
from .routing import Router
from .site import ANSWER_BUDGET, Authorize, Member, Site, Wrap

__all__ = ["MAX_CONNECTIONS", "HttpServer", "default_max_connections"]

MAX_CONNECTIONS = 4096
"""Client connections at most by default (fewer where the process may open fewer
files: :func:`default_max_connections`)."""
FD_RESERVE = 128
"""File descriptors left for everything else (etcd's connections, logs, the listening
sockets) below the process's limit."""


def default_max_connections() -> int:
    """:data:`MAX_CONNECTIONS`, or the process's open-file limit less
    :data:`FD_RESERVE` when that is lower, so a flood of connections meets the cap (and
    its eviction of idle ones) before the limit of the process, which would refuse
    every connection, the probes' among them, and etcd's."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, soft - FD_RESERVE))


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(seconds: float) -> bytes:
    """A Date header's value (RFC 9110's IMF-fixdate, ``Sun, 06 Nov 1994 08:49:37 GMT``),
    as ``email.utils.formatdate(usegmt=True)`` writes it, without loading the email
    package into every sidecar."""
    t = time.gmtime(seconds)
    return (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT").encode()


class HttpServer:
    """Serves ``router`` on the sockets given to :meth:`listen`."""

    def __init__(self, router: Router, *, authorize: Authorize | None = None,
                 wrap: Wrap | None = None, header_timeout: float = HEADER_TIMEOUT,
                 body_timeout: float = BODY_TIMEOUT, write_timeout: float = WRITE_TIMEOUT,
                 max_connections: int | None = None, answer_budget: int = ANSWER_BUDGET,
                 on_limit: Callable[[str], None] | None = None):
        self.site = Site(router, authorize=authorize, wrap=wrap,
                         header_timeout=header_timeout, body_timeout=body_timeout,
                         write_timeout=write_timeout,
                         max_connections=max_connections or default_max_connections(),
                         answer_budget=answer_budget, on_limit=on_limit)
        self._servers: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._stamp()

    @property
    def connections(self) -> dict[Member, None]:
        """The connections open, oldest first."""
        return self.site.connections

    async def listen(self, sock: socket.socket) -> None:
        """Serve on a bound, listening-ready socket (TCP or Unix)."""
        loop = asyncio.get_running_loop()
        site = self.site
        self._servers.append(await loop.create_server(lambda: Connection(site), sock=sock))
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep())

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting, close idle connections, let answers under way finish (at
        most ``grace`` seconds), then drop what is left."""
        site = self.site
        site.closing = True
        for server in self._servers:
            server.close()
        for conn in list(site.connections):
            conn.shutdown()
        if site.connections:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await site.drained.wait()
        for conn in list(site.connections):
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()

    def _stamp(self) -> None:
        self.site.date = http_date(time.time())

    async def _sweep(self) -> None:
        """Once a second: the Date header, and connections past their deadline (one
        pass over them all costs less than a timer armed and cancelled per request)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            self._stamp()
            now = loop.time()
            for conn in list(self.site.connections):
                if conn.deadline and now >= conn.deadline \
                        or conn.write_deadline and now >= conn.write_deadline:
                    conn.expire(now)
