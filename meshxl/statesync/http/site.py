"""What the connections of one server share (:class:`Site`): its routes and hooks, its
limits and their count, the connections open. The connections' states are named here,
as the cap's choice of a connection to close reads them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from meshxl.httpbase import BODY_TIMEOUT, HEADER_TIMEOUT, WRITE_TIMEOUT

from .messages import Response
from .routing import Handler, Request, Router

log = logging.getLogger("meshxl.statesync.http")

__all__ = ["ANSWER_BUDGET", "BODY", "DONE", "HEAD", "IDLE", "LIMITS", "LOG_EVERY", "Authorize",
           "Member", "Site", "Wrap"]

IDLE, HEAD, BODY, DONE = range(4)
"""A connection's state: between requests, reading a head, reading a body, a request
just complete."""

LIMITS = ("connections", "idle_timeout", "header_timeout", "body_timeout", "write_timeout",
          "head_size", "body_size")
"""The connection-level limits, as :meth:`Site.hit` counts them: a connection closed to
admit another (or refused: every one busy), an idle keep-alive connection or a head or
body that did not arrive in time, an answer its client did not read in time, a head or
body over its bound."""
ANSWER_BUDGET = 1 << 20
"""Bytes of answers not yet sent on one connection (written into the transport, or
ready and waiting) past which the connection takes up no request and stops reading,
until its client reads: what a client that pipelines and does not read can make the
server hold is about this much, whatever it asked for (one answer larger than the
budget is still sent whole)."""
LOG_EVERY = 10.0
"""Seconds between two log lines of one limit (a flood logs once, with its count)."""

Authorize = Callable[[Request], "Response | None"]
"""Called with a request's head (no body yet): a refusal, or None to go on."""
Wrap = Callable[[Request, Handler], Awaitable[Response]]
"""Runs the handler for a request (tracing: a span around it)."""


class Member(Protocol):
    """A connection as the site sees it."""

    state: int
    started: float
    deadline: float
    write_deadline: float
    slots: deque[Any]
    queue: deque[Any]
    transport: Any

    def expire(self, now: float) -> None: ...

    def shutdown(self) -> None: ...

    def abort(self) -> None: ...


class Site:
    """What the connections of one server share: its routes and hooks, its limits, the
    ``Date`` of its answers (stamped once a second by the server), and the connections
    open (oldest first), which the server closes and sweeps."""

    def __init__(self, router: Router, *, authorize: Authorize | None = None,
                 wrap: Wrap | None = None, header_timeout: float = HEADER_TIMEOUT,
                 body_timeout: float = BODY_TIMEOUT, write_timeout: float = WRITE_TIMEOUT,
                 max_connections: int = 1024, answer_budget: int = ANSWER_BUDGET,
                 on_limit: Callable[[str], None] | None = None):
        self.router = router
        self.authorize = authorize
        self.wrap = wrap
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.write_timeout = write_timeout
        self.max_connections = max_connections
        self.answer_budget = answer_budget
        self.on_limit = on_limit
        """Called with a limit's name (:data:`LIMITS`) each time it is hit (a metric)."""
        self.hits = dict.fromkeys(LIMITS, 0)
        self._logged: dict[str, tuple[float, int]] = {}
        self.connections: dict[Member, None] = {}
        self.closing = False
        self.drained = asyncio.Event()
        """Set when the server is closing and its last connection has closed."""
        self.date = b""

    def hit(self, limit: str) -> None:
        """Count a limit hit; log it, at most once per :data:`LOG_EVERY` seconds a limit
        (with how many hits that line stands for)."""
        self.hits[limit] += 1
        if self.on_limit is not None:
            self.on_limit(limit)
        now = time.monotonic()
        last, count = self._logged.get(limit, (-LOG_EVERY, self.hits[limit] - 1))
        if now - last >= LOG_EVERY:
            log.warning("HTTP limit %s hit %d time(s) since the last report (%d connections "
                        "open, at most %d)", limit, self.hits[limit] - count,
                        len(self.connections), self.max_connections)
            self._logged[limit] = (now, self.hits[limit])

    def make_room(self) -> bool:
        """At the connection cap: close the connection stuck longest in an incomplete
        request (a head or a body still arriving, nothing answered yet on it), else the
        longest idle one, to admit a new one; False when every connection has requests
        under way (the new one is refused). So slow heads and slow bodies cannot keep a
        probe or the application out: the oldest of them gives way."""
        stuck = idle = None
        for conn in self.connections:  # oldest first
            if conn.slots or conn.queue or conn.transport is None:
                continue
            if conn.state in (HEAD, BODY):
                if stuck is None or conn.started < stuck.started:
                    stuck = conn
            elif conn.state == IDLE and (idle is None or conn.deadline < idle.deadline):
                idle = conn
        victim = stuck or idle
        self.hit("connections")
        if victim is None:
            return False
        victim.abort()
        self.connections.pop(victim, None)
        return True
