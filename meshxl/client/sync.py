"""The sync client: the same plans as the async one, over the standard library's
``http.client``, for code without an event loop (WSGI apps, scripts, threads).

Why ``http.client`` rather than a private event loop thread running the async client:
the logic (retries, ETags, ``update``, the error mapping) lives in the plans, so the
driver is only a loop sending requests; over ``http.client`` that loop has no thread,
no second event loop and no hand-over between them, so nothing to leak at exit or to
break after ``fork``, the caller's own thread does the I/O, and a Ctrl-C or a timeout
interrupts it where it is. What it costs: a small pool of kept-alive connections
written here, and a timeout per socket operation (``http.client``'s) rather than per
request.

The client is thread-safe: each request takes an idle connection from the pool (or
opens one) and gives it back when its answer was read in full. Connections idle longer
than ``settings.keepalive`` are closed rather than reused, before the sidecar closes
them.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

from meshxl import __version__
from meshxl import headers as hdr

from . import plans
from .errors import SidecarError, describe
from .plans import (
    Answer,
    Delete,
    Pause,
    Plan,
    Readiness,
    Request,
    Session,
    Unanswered,
    Upsert,
    Written,
)
from .settings import DEFAULT_URL, ClientSettings
from .url import base_url, split_url, unix_path

__all__ = ["Client", "UnixHTTPConnection"]

T = TypeVar("T")


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over a Unix socket (the sidecar's ``--listen unix:PATH``); the
    ``Host`` header says ``localhost``."""

    def __init__(self, path: str, timeout: float | None = None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Client:
    """The sidecar's session API, blocking. Same methods as
    :class:`~meshxl.client.AsyncClient`, same arguments, same exceptions."""

    def __init__(self, url: str = DEFAULT_URL, *, token: str | None = None,
                 settings: ClientSettings | None = None,
                 rng: random.Random | None = None) -> None:
        self.settings = settings or ClientSettings()
        self._unix = unix_path(url)
        scheme, self._host, self._port, self._prefix = ("http", "localhost", 80, "") \
            if self._unix is not None else split_url(url)
        self._https = scheme == "https"
        self.url = base_url(url)
        self._headers = {"User-Agent": f"meshxl-client/{__version__}", **hdr.bearer(token)}
        self._rng = rng or random.Random()
        self._rng_lock = threading.Lock()
        self._idle: list[tuple[float, http.client.HTTPConnection]] = []
        self._lock = threading.Lock()

    # -- session API ------------------------------------------------------------------------

    def get(self, session_id: str) -> Session:
        return self.run(plans.get(session_id, self.settings, self._fork_rng()))

    def put(self, session_id: str, state: Any, *, content_type: str | None = None,
            if_match: str | None = None, create_only: bool = False) -> Written:
        return self.run(plans.put(session_id, state, self.settings, self._fork_rng(),
                                  content_type=content_type, if_match=if_match,
                                  create_only=create_only))

    def patch(self, session_id: str, merge_patch: Any, *,
              if_match: str | None = None) -> Written:
        return self.run(plans.patch(session_id, merge_patch, self.settings, self._fork_rng(),
                                    if_match=if_match))

    def delete(self, session_id: str, *, if_match: str | None = None) -> None:
        self.run(plans.delete(session_id, self.settings, self._fork_rng(), if_match=if_match))

    def update(self, session_id: str, fn: Callable[[Any], Any], *,
               default: Any = None) -> Session:
        return self.run(plans.update(session_id, fn, self.settings, self._fork_rng(),
                                     default=default))

    def bulk_get(self, session_ids: list[str]) -> list[Session | SidecarError]:
        return self.run(plans.bulk_get(session_ids, self.settings, self._fork_rng()))

    def bulk_save(self, items: list[Upsert]) -> list[Written | SidecarError]:
        return self.run(plans.bulk_save(items, self.settings, self._fork_rng()))

    def transaction(self, operations: list[Upsert | Delete]) -> list[Written | None]:
        return self.run(plans.transaction(operations, self.settings, self._fork_rng()))

    def ready(self) -> Readiness:
        return self.run(plans.ready(self.settings, self._fork_rng()))

    # -- the driver -------------------------------------------------------------------------

    def run(self, plan: Plan[T]) -> T:
        """Carry out a plan (see :mod:`meshxl.client.plans`) and return its result."""
        try:
            step = next(plan)
            while True:
                if isinstance(step, Pause):
                    time.sleep(step.seconds)
                    step = plan.send(None)
                else:
                    step = plan.send(self._send(step))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        finally:
            plan.close()

    def _fork_rng(self) -> random.Random:
        """A generator per call: ``random.Random`` is not to be shared across threads."""
        with self._rng_lock:
            return random.Random(self._rng.getrandbits(64))

    def _send(self, request: Request) -> Answer | Unanswered:
        conn = self._take()
        if conn is None:
            conn = self._connection()
            try:
                conn.connect()
            except OSError as exc:
                conn.close()
                return Unanswered(describe(exc), sent=False)
        if conn.sock is not None:
            conn.sock.settimeout(self.settings.timeout)
        try:
            conn.request(request.method, self._prefix + request.path, body=request.body,
                         headers={**self._headers, **request.headers})
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            return Unanswered(describe(exc), sent=True)
        headers = {name.lower(): value for name, value in resp.getheaders()}
        if resp.will_close:
            conn.close()
        else:
            self._give(conn)
        return Answer(resp.status, headers, body)

    def _connection(self) -> http.client.HTTPConnection:
        if self._unix is not None:
            return UnixHTTPConnection(self._unix, timeout=self.settings.connect_timeout)
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=self.settings.connect_timeout)

    def _take(self) -> http.client.HTTPConnection | None:
        """An idle connection that is fresh enough, or None (open a new one)."""
        horizon = time.monotonic() - self.settings.keepalive
        stale = []
        found = None
        with self._lock:
            while self._idle:
                since, conn = self._idle.pop()
                if since >= horizon:
                    found = conn
                    break
                stale.append(conn)
        for conn in stale:
            conn.close()
        return found

    def _give(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self.settings.max_connections:
                self._idle.append((time.monotonic(), conn))
                return
        conn.close()

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the idle connections; the client opens new ones if used again."""
        with self._lock:
            idle, self._idle = self._idle, []
        for _, conn in idle:
            conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

