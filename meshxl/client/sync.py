"""The sync client: the same plans as the async one, over blocking sockets, for code
without an event loop (WSGI apps, scripts, threads).

Why blocking sockets rather than a private event loop thread running the async client:
the logic (retries, ETags, ``update``, the error mapping) lives in the plans, so the
driver is only a loop sending requests; over plain sockets that loop has no thread, no
second event loop and no hand-over between them, so nothing to leak at exit or to break
after ``fork``, the caller's own thread does the I/O, and a Ctrl-C or a timeout
interrupts it where it is. Answers are parsed by the async transport's own reader
(:mod:`meshxl.client.framing`), so both clients frame alike, within the same bounds.

Each request is held to ``settings.timeout`` as a whole: connecting, writing and every
read get only what is left of it, so a peer that drips a byte at a time or floods
interim answers cannot stretch it (``http.client``, used before, timed each socket
operation alone). An answer larger than ``settings.max_answer``, or cut by a close, is
no answer (:class:`~meshxl.client.Unreachable` after the retries).

The client is thread-safe: each request takes an idle connection from the pool (or
opens one) and gives it back when its answer was read in full. Connections idle longer
than ``settings.keepalive`` are closed rather than reused, before the sidecar closes
them; one the sidecar closed meanwhile is found (a zero-timeout poll) and not reused.
"""

from __future__ import annotations

import random
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

from meshxl import __version__
from meshxl import headers as hdr

from . import plans
from .errors import SidecarError, describe
from .framing import AnswerReader, Broken, RequestWriter
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
from .url import base_url, check_cluster, cluster_path, split_url, unix_path

__all__ = ["Client"]

T = TypeVar("T")

_READ = 256 * 1024
"""Bytes asked of the socket per read (asyncio reads as much)."""
_RESET = (ConnectionResetError, BrokenPipeError)


class _Connection:
    """One kept-alive connection: its socket, and the reader of its answers."""

    __slots__ = ("answers", "broken", "reader", "sock", "since")

    def __init__(self, sock: socket.socket, max_answer: int) -> None:
        self.sock = sock
        self.answers: list[Answer] = []
        self.reader = AnswerReader(self.answers.append, max_body=max_answer)
        self.since = 0.0
        self.broken = False
        """Out of step after its last answer (bytes nobody asked for): not reused."""

    def usable(self) -> bool:
        """Nothing (a close, stray bytes) is waiting to be read on the idle socket."""
        try:
            ready, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not ready

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class _Lost(Exception):
    """The connection ended before one byte of the answer; ``reset``: by a reset."""

    def __init__(self, reason: str, reset: bool) -> None:
        super().__init__(reason)
        self.reset = reset


class Client:
    """The sidecar's session API, blocking. Same methods as
    :class:`~meshxl.client.AsyncClient`, same arguments, same exceptions."""

    def __init__(self, url: str = DEFAULT_URL, *, token: str | None = None,
                 settings: ClientSettings | None = None,
                 rng: random.Random | None = None, cluster: str | None = None) -> None:
        self.settings = settings or ClientSettings()
        self.cluster = check_cluster(cluster)
        """The cluster addressed on a sidecar hosting several (as AsyncClient's)."""
        self._unix = unix_path(url)
        scheme, self._host, self._port, self._prefix = ("http", "localhost", 80, "") \
            if self._unix is not None else split_url(url)
        self._tls = ssl.create_default_context() if scheme == "https" else None
        self.url = base_url(url)
        authority = "localhost" if self._unix is not None else (
            f"[{self._host}]" if ":" in self._host else self._host) + (
            "" if self._port == (443 if self._tls is not None else 80) else f":{self._port}")
        self._writer = RequestWriter({"Host": authority,
                                      "User-Agent": f"meshxl-client/{__version__}",
                                      **hdr.bearer(token)})
        self._rng = rng or random.Random()
        self._rng_lock = threading.Lock()
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()

    # -- session API ------------------------------------------------------------------------

    def get(self, session_id: str) -> Session:
        return self.run(plans.get(session_id, self.settings, self._fork_rng()))

    def put(self, session_id: str, state: Any, *, content_type: str | None = None,
            if_match: str | None = None, create_only: bool = False,
            sync_now: bool = False) -> Written:
        return self.run(plans.put(session_id, state, self.settings, self._fork_rng(),
                                  content_type=content_type, if_match=if_match,
                                  create_only=create_only, sync_now=sync_now))

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
        data = self._writer.encode(request.method,
                                   self._prefix + cluster_path(self.cluster, request.path),
                                   request.headers, request.body)
        deadline = time.monotonic() + self.settings.timeout
        head_only = request.method == "HEAD"
        conn = self._take()
        while True:
            reused = conn is not None
            if conn is None:
                try:
                    conn = self._open(deadline)
                except OSError as exc:
                    return Unanswered(describe(exc), sent=False)
            try:
                answer = self._exchange(conn, data, deadline, head_only)
            except _Lost as lost:
                conn.close()
                # The keep-alive race: the sidecar closed this idle connection as the
                # request went out. A reset before any byte of the answer means the
                # request was left unread in the closed socket (a plain close proves
                # nothing), so sending it again, once, on a new connection is safe (as
                # the async transport does).
                if reused and lost.reset:
                    conn = None
                    continue
                return Unanswered(str(lost), sent=True)
            except (OSError, Broken) as exc:
                conn.close()
                return Unanswered(_reason(exc, self.settings.timeout), sent=True)
            if conn.reader.keep and not conn.broken:
                self._give(conn)
            else:
                conn.close()
            return answer

    def _open(self, deadline: float) -> _Connection:
        budget = min(self.settings.connect_timeout, deadline - time.monotonic())
        if budget <= 0:
            raise TimeoutError(f"no time left to connect within {self.settings.timeout:g} s")
        if self._unix is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(budget)
                sock.connect(self._unix)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((self._host, self._port), timeout=budget)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                try:
                    sock = self._tls.wrap_socket(sock, server_hostname=self._host)
                except BaseException:
                    sock.close()
                    raise
        return _Connection(sock, self.settings.max_answer)

    @staticmethod
    def _exchange(conn: _Connection, data: bytes, deadline: float,
                  head_only: bool) -> Answer:
        """Write the request and read its answer, all before ``deadline``."""
        sock, reader = conn.sock, conn.reader
        reader.expect(head_only)
        try:
            sock.settimeout(_left(deadline))
            sock.sendall(data)
            while not conn.answers:
                sock.settimeout(_left(deadline))
                chunk = sock.recv(_READ)
                if not chunk:
                    started = reader.started
                    reader.eof()
                    if not started:
                        raise _Lost("the sidecar closed the connection without answering",
                                    reset=False)
                    raise Broken("the sidecar closed the connection before its answer "
                                 "was complete")
                try:
                    reader.feed(chunk)
                except Broken:
                    if not conn.answers:
                        raise
                    conn.broken = True  # the answer came whole; what followed it is junk
        except _RESET as exc:
            if not reader.started:
                raise _Lost(describe(exc), reset=True) from None
            raise
        return conn.answers.pop(0)

    def _take(self) -> _Connection | None:
        """An idle connection fresh enough and not closed by the peer, or None (open a
        new one)."""
        horizon = time.monotonic() - self.settings.keepalive
        stale = []
        found = None
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if conn.since >= horizon and conn.usable():
                    found = conn
                    break
                stale.append(conn)
        for conn in stale:
            conn.close()
        return found

    def _give(self, conn: _Connection) -> None:
        conn.since = time.monotonic()
        with self._lock:
            if len(self._idle) < self.settings.max_connections:
                self._idle.append(conn)
                return
        conn.close()

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the idle connections; the client opens new ones if used again."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r})"


def _left(deadline: float) -> float:
    """Seconds left before ``deadline``; TimeoutError when none."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the request's time ran out")
    return left


def _reason(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError
        return describe(TimeoutError(f"no answer within {timeout:g} s"))
    return str(exc) if isinstance(exc, Broken) else describe(exc)
