"""Connecting to etcd: endpoint parsing, and one client for a list of endpoints that
routes every request to a member that answers.

One gRPC channel to a list of addresses sticks to the first one that connects, and a
request sent to a member that lost its leader (or was cut off) waits for its whole
deadline. So a multi-member ``--etcd`` list becomes one channel *per member*, each
health-checked by a cheap ``Maintenance.Status`` probe with a short deadline (once a
second, every 100 ms while anything is wrong; the idea of etcd's clientv3 balancer
and its health checker). A member is *up* while it answers and reports a leader that
is not itself known to be gone; requests go to the member this client prefers (spread
over the members at random), to another up member when it is not. :class:`Balancer`
also tells a caller when the member it sent a request to turned out gone or changed
leader (:meth:`Endpoint.changed`), so the request can be cancelled and sent again
elsewhere when that is safe (the session store decides what is: ``statesync/store.py``).

aetcd's own methods (``get``, ``put``, ``lease``, ``watch`` ...) keep working on the
multi-member client: its stubs are those of the preferred member at the moment of
the call, and a watch ends (its owner resumes it elsewhere) when its member stops
answering.

TLS (``https://`` endpoints, a CA, a client certificate) and username/password
authentication (:class:`EtcdSecurity`) are one more thing aetcd 1.0 lacks: it always
dials in plaintext and fetches its auth token once, so a token etcd forgot (after a
restart, or an idle ``--auth-token-ttl``) would fail every later request. The
:class:`_SecureClient` subclass dials with TLS credentials, and a gRPC interceptor
adds the token to every call, fetches a new one when etcd says it is invalid and
retries the call once. Plain ``http://`` clients without credentials for one endpoint
stay vanilla aetcd clients, interceptor-free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aetcd
import grpc
from aetcd import rpc, watcher

from meshxl import tls
from meshxl.errors import InputError, Unavailable

log = logging.getLogger(__name__)


class EtcdEndpointError(InputError):
    """An ``--etcd`` value that is not a list of http(s)://HOST:PORT URLs."""


class EtcdSecurityError(InputError):
    """Unusable etcd TLS or credential settings: a file missing or bad, half a pair."""


class EtcdAuthError(aetcd.exceptions.ClientError, Unavailable):  # type: ignore[misc]
    """etcd refused the user name and password (a wrong setting, not a passing fault)."""


def parse_urls(urls: str) -> tuple[bool, list[tuple[str, int]]]:
    """``(tls, [(host, port), ...])`` of ``http(s)://h1:2379,...`` (scheme optional:
    http). All endpoints must use one scheme."""
    endpoints = []
    schemes = set()
    for raw in (u.strip() for u in urls.split(",")):
        if not raw:
            continue
        parts = urlsplit(raw if "://" in raw else f"http://{raw}")
        if parts.scheme not in ("http", "https"):
            raise EtcdEndpointError(f"unsupported etcd URL scheme {parts.scheme!r} in {raw!r}: "
                                    "use http://HOST:PORT or https://HOST:PORT")
        try:
            port = parts.port
        except ValueError:
            raise EtcdEndpointError(f"bad port in etcd URL {raw!r}") from None
        if not parts.hostname or port is None or parts.path not in ("", "/"):
            raise EtcdEndpointError(f"etcd URL must be http(s)://HOST:PORT, got {raw!r}")
        schemes.add(parts.scheme)
        endpoints.append((parts.hostname, port))
    if not endpoints:
        raise EtcdEndpointError("no etcd endpoint given")
    if len(schemes) > 1:
        raise EtcdEndpointError(f"etcd endpoints mix http:// and https:// in {urls!r}: "
                                "use one scheme")
    return schemes == {"https"}, endpoints


def parse_endpoints(urls: str) -> list[tuple[str, int]]:
    """Parse ``http://h1:2379,http://h2:2379`` (scheme optional) into (host, port)."""
    return parse_urls(urls)[1]


def read_secret_file(path: Path, what: str) -> str:
    """The first line of a password or token file, or a one-line error naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise EtcdSecurityError(f"cannot read {what} {path}: {reason}") from None
    value = text.splitlines()[0].strip() if text.strip() else ""
    if not value:
        raise EtcdSecurityError(f"{what} {path} is empty")
    return value


def _read_pem(path: Path, what: str) -> bytes:
    try:
        return tls.read_pem(path, what)
    except tls.TlsFileError as exc:
        raise EtcdSecurityError(str(exc)) from None


@dataclass(frozen=True)
class EtcdSecurity:
    """How a meshxl process proves itself to etcd and checks etcd: TLS and credentials.

    ``ca`` verifies etcd's server certificate (default: the system's roots); ``cert`` and
    ``key`` are this client's certificate for etcd's ``--client-cert-auth``; ``user`` and
    ``password`` authenticate to etcd's RBAC (``etcdctl auth enable``). Files are read
    when a client is made; :meth:`check` reads them once up front for a clear error.
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def tls_files(self) -> bool:
        return any(p is not None for p in (self.ca, self.cert, self.key))

    def check(self) -> None:
        """Raise :class:`EtcdSecurityError` (one line) unless every setting is usable."""
        if (self.cert is None) != (self.key is None):
            raise EtcdSecurityError("--etcd-cert and --etcd-key go together: give both or "
                                    "neither")
        if self.user is not None and not self.user.strip():
            raise EtcdSecurityError("--etcd-user is empty")
        if self.user and not self.password:
            raise EtcdSecurityError("--etcd-user needs a password: --etcd-password-file FILE "
                                    "or the MESHXL_ETCD_PASSWORD variable")
        if self.password and not self.user:
            raise EtcdSecurityError("an etcd password was given without --etcd-user")
        try:
            if self.ca is not None:
                tls.check_ca(self.ca, "--etcd-ca")
            if self.cert is not None and self.key is not None:
                tls.check_pair(self.cert, self.key, "--etcd-cert/--etcd-key")
        except tls.TlsFileError as exc:
            raise EtcdSecurityError(str(exc)) from None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem(self.ca, "--etcd-ca") if self.ca else None,
            private_key=_read_pem(self.key, "--etcd-key") if self.key else None,
            certificate_chain=_read_pem(self.cert, "--etcd-cert") if self.cert else None)


def check_settings(urls: str, security: EtcdSecurity | None) -> None:
    """Endpoints, files and credentials usable together, or a one-line ValueError."""
    tls_endpoints, _ = parse_urls(urls)
    if security is None:
        return
    security.check()
    if security.tls_files and not tls_endpoints:
        raise EtcdSecurityError("--etcd-ca, --etcd-cert and --etcd-key need https:// etcd "
                                "endpoints")


_CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.keepalive_time_ms": 2000,
    "grpc.keepalive_timeout_ms": 2000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 500,
    # Also the deadline of one connection attempt (gRPC's default is 20 s): a member
    # whose connection attempt went into a partition is tried again soon after it heals.
    "grpc.min_reconnect_backoff_ms": 500,
    # A page of sessions (each up to ~1 MiB) or a watch response can pass gRPC's
    # 4 MiB default; readers also shrink their pages when a response is too large.
    "grpc.max_receive_message_length": 32 * 1024 * 1024,
}


def client(urls: str | list[tuple[str, int]], *, timeout: float | None = 5.0,
           security: EtcdSecurity | None = None) -> aetcd.Client:
    """An (unconnected) aetcd client for one or several etcd endpoints.

    Several endpoints give a :class:`BalancedClient` (one health-checked channel per
    member). ``https://`` endpoints dial with TLS; ``security`` adds a CA, a client
    certificate and credentials (see :class:`EtcdSecurity`).
    """
    tls, endpoints = parse_urls(urls) if isinstance(urls, str) else (False, urls)
    security = security or EtcdSecurity()
    if security.tls_files and not tls:
        raise EtcdSecurityError("--etcd-ca, --etcd-cert and --etcd-key need https:// etcd "
                                "endpoints")
    options = dict(_CHANNEL_OPTIONS)
    if len(endpoints) > 1 and tls:
        # Every member's certificate is checked against the first endpoint's name (etcd's
        # own TLS guide gives members one certificate naming them all).
        options["grpc.ssl_target_name_override"] = endpoints[0][0]
    members = [_one_client(h, p, tls, security, timeout, options) for h, p in endpoints]
    if len(members) == 1:
        return members[0]
    return BalancedClient([
        Endpoint(f"{_host(h)}:{p}", c, partial(_one_client, h, p, tls, security, timeout,
                                               options))
        for (h, p), c in zip(endpoints, members, strict=True)], timeout=timeout)


def _one_client(host: str, port: int, tls: bool, security: EtcdSecurity,
                timeout: float | None, options: dict[str, Any]) -> aetcd.Client:
    host = _host(host)
    if not tls and not security.user:
        return aetcd.Client(host=host, port=port, timeout=timeout, options=options)
    return _SecureClient(host=host, port=port, timeout=timeout, options=options,
                         credentials=security.channel_credentials() if tls else None,
                         auth=_TokenAuth(security.user, security.password or "", timeout)
                         if security.user else None)


# -- several members: health checking and routing ----------------------------------------

T = TypeVar("T")

PROBE_INTERVAL = 1.0
"""Seconds between a member's health probes while every member is up."""
PROBE_INTERVAL_TROUBLE = 0.1
"""... and while a member is not up, or for a while after a request failed or lagged."""
PROBE_TIMEOUT = 0.5
"""A probe not answered within this long marks the member down."""
ATTEMPT_TIMEOUT = 2.0
"""Deadline of one attempt of a request (:meth:`Balancer.call`); a request as a whole
has the client's timeout."""
SLOW_ATTEMPT = 0.1
"""An attempt outstanding this long makes the members be probed at once, then often."""
LAGGING = 0.15
"""A member whose probe has been outstanding this long while another member answered
a probe sent later is down: compared with its peers, not with a fixed deadline, so a
slow machine (every probe late) marks no member down for it."""
TROUBLE_HOLD = 3.0
"""Seconds of frequent probing after the last failed or slow request."""

UP, NO_LEADER, DOWN, UNKNOWN = "up", "no-leader", "down", "unknown"


class EtcdUnavailable(aetcd.exceptions.ConnectionFailedError, Unavailable):  # type: ignore[misc]
    """No etcd member could take the request (none answers, or no leader in time)."""


class Endpoint:
    """One etcd member as a client sees it: its channel and its health."""

    def __init__(self, name: str, client: aetcd.Client,
                 factory: Callable[[], aetcd.Client] | None = None):
        self.name = name
        self.client = client
        self._factory = factory
        self.renewed = 0.0
        self.state = UNKNOWN
        self.reason = "not probed yet"
        self.member_id = 0
        self.leader = 0
        self.term = 0
        self.answered = False    # the last probe (newest applied) got an answer
        self.suspect_since = 0.0  # monotonic: a request failed here (0: none)
        self.checked = 0.0
        self._probe_seq = 0
        self._applied_seq = 0
        self._probing = 0
        self._outstanding: dict[int, float] = {}  # probe seq -> monotonic time sent
        self.answered_sent = 0.0  # when the newest answered probe was sent
        self._changed = asyncio.Event()

    def changed(self) -> asyncio.Event:
        """Set when this member stops being up or its leader changes: a request sent to
        it before then may wait for a leader that is gone."""
        return self._changed

    def _fire(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def renew(self) -> None:
        """A new channel: a connection whose packets went into a partition recovers only
        at TCP's next retransmission (seconds later), a new one at once."""
        if self._factory is None:
            return
        self.renewed = time.monotonic()
        old, self.client = self.client, self._factory()
        await self.client.connect()
        task = asyncio.get_running_loop().create_task(_close_later(old))
        _background.add(task)
        task.add_done_callback(_background.discard)

    def as_dict(self) -> dict[str, Any]:
        return {"endpoint": self.name, "state": self.state, "reason": self.reason,
                "member_id": f"{self.member_id:x}" if self.member_id else None,
                "leader": f"{self.leader:x}" if self.leader else None}

    def __repr__(self) -> str:
        return f"Endpoint({self.name}, {self.state})"


_background: set[asyncio.Task[None]] = set()
RENEW_AFTER = 0.3
"""A member whose probes time out gets a new channel this often."""


async def _close_later(client: aetcd.Client) -> None:
    await asyncio.sleep(ATTEMPT_TIMEOUT)  # requests still on it end by themselves first
    with contextlib.suppress(Exception):
        await client.close()


class Balancer:
    """Health of a list of etcd members and the choice of one for each request."""

    def __init__(self, endpoints: list[Endpoint], *, timeout: float | None = 5.0,
                 probing: bool = True):
        if not endpoints:
            raise ValueError("no etcd endpoint")
        self.endpoints = endpoints
        self.timeout = timeout if timeout is not None else 5.0
        self.probing = probing and len(endpoints) > 1
        # Spread clients over the members: each starts with one at random.
        self._preferred = random.randrange(len(endpoints))
        self._trouble_until = 0.0
        self._wake = asyncio.Event()
        self._any_change = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._probes: set[asyncio.Task[None]] = set()
        self.switches = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if not self.probing or self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._probe_loop(ep), name=f"etcd probe {ep.name}")
                       for ep in self.endpoints]

    async def stop(self) -> None:
        tasks, self._tasks = [*self._tasks, *self._probes], []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- choosing ------------------------------------------------------------------------

    @property
    def current(self) -> Endpoint:
        """The member requests go to now: the preferred one while it is up, else the
        first up member after it (which becomes preferred), else the preferred one."""
        n = len(self.endpoints)
        preferred = self.endpoints[self._preferred]
        if not self.probing or preferred.state == UP:
            return preferred
        for i in range(1, n):
            index = (self._preferred + i) % n
            if self.endpoints[index].state == UP:
                self._switch(index)
                return self.endpoints[index]
        for rank in (UNKNOWN, NO_LEADER):
            for i in range(n):
                ep = self.endpoints[(self._preferred + i) % n]
                if ep.state == rank:
                    return ep
        return preferred

    def _switch(self, index: int) -> None:
        if index != self._preferred:
            log.info("etcd: using %s (was %s: %s)", self.endpoints[index].name,
                     self.endpoints[self._preferred].name,
                     self.endpoints[self._preferred].reason)
            self._preferred = index
            self.switches += 1

    async def choose(self, deadline: float) -> Endpoint:
        """A member for the next attempt: an up one, waiting (until ``deadline``) while
        some answer but none has a leader; :class:`EtcdUnavailable` at once when no
        member answers at all (etcd down, or this client cut off)."""
        while True:
            ep = self.current
            if not self.probing or ep.state in (UP, UNKNOWN):
                return ep
            if all(e.state == DOWN for e in self.endpoints):
                raise EtcdUnavailable("no etcd member answers: " + "; ".join(
                    f"{e.name} {e.reason}" for e in self.endpoints))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EtcdUnavailable("no etcd member has a leader: " + "; ".join(
                    f"{e.name} {e.state} ({e.reason})" for e in self.endpoints))
            self.trouble()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, PROBE_INTERVAL_TROUBLE)):
                    await self._any_change.wait()

    def trouble(self) -> None:
        """Probe often for a while (a request failed, lagged or found no leader)."""
        if not self.probing:
            return
        first = time.monotonic() >= self._trouble_until
        self._trouble_until = time.monotonic() + TROUBLE_HOLD
        if first:
            self._wake.set()

    def failed(self, ep: Endpoint, exc: BaseException) -> None:
        """A request to ``ep`` failed without an answer: do not send it more until a
        probe sent after now succeeds."""
        if not self.probing:
            return
        ep.suspect_since = time.monotonic()
        ep.reason = f"a request failed: {_short(exc)}"
        self.trouble()
        self._evaluate()

    # -- calls ------------------------------------------------------------------------------

    async def call(self, fn: Callable[[Endpoint, float], Awaitable[T]], *,
                   timeout: float | None = None, attempt_timeout: float = ATTEMPT_TIMEOUT,
                   what: str = "etcd request") -> T:
        """``fn(endpoint, attempt_timeout)`` on a member that answers, again on another
        (or the same, once it has a leader) when an attempt fails without an answer or
        its member turned out gone. Only for requests that are safe to send twice (reads,
        lease grants and keepalives, unconditional puts)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        last: BaseException | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EtcdUnavailable(f"{what}: no answer in time ({_short(last)})")
            try:
                ep = await self.choose(deadline)
            except EtcdUnavailable:
                if last is not None and not self.probing:
                    raise last from None
                raise
            try:
                return await self.attempt(ep, fn(ep, min(attempt_timeout, remaining)),
                                          min(attempt_timeout, remaining))
            except (grpc.aio.AioRpcError, aetcd.exceptions.ConnectionFailedError,
                    aetcd.exceptions.ConnectionTimeoutError, aetcd.exceptions.InternalError,
                    TimeoutError, MemberChanged) as exc:
                if isinstance(exc, grpc.aio.AioRpcError) and not retryable(exc):
                    raise
                last = exc
                if not self.probing:
                    raise
                if not isinstance(exc, MemberChanged):
                    self.failed(ep, exc)

    async def attempt(self, ep: Endpoint, request: Awaitable[T], timeout: float) -> T:
        """Await one request to ``ep``: :class:`MemberChanged` if ``ep`` stops being up
        (or changes leader) first, TimeoutError after ``timeout``."""
        changed = ep.changed()
        task = asyncio.ensure_future(request)
        if not self.probing:
            async with asyncio.timeout(timeout):
                return await task
        started = time.monotonic()
        waiter = asyncio.ensure_future(changed.wait())
        try:
            done, _ = await asyncio.wait({task, waiter}, timeout=min(SLOW_ATTEMPT, timeout),
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:
                self.trouble()  # slow: find out soon whether its member is still there
                done, _ = await asyncio.wait(
                    {task, waiter}, timeout=timeout - (time.monotonic() - started),
                    return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            if waiter in done:
                raise MemberChanged(f"{ep.name}: {ep.state} ({ep.reason})")
            raise TimeoutError(f"{ep.name}: no answer within {timeout:.2f} s")
        finally:
            for fut in (task, waiter):
                if not fut.done():
                    fut.cancel()
            if not task.done() or task.cancelled():
                with contextlib.suppress(BaseException):
                    await task

    # -- probing ------------------------------------------------------------------------

    async def _probe_loop(self, ep: Endpoint) -> None:
        while True:
            self._check_lagging(ep)
            if ep._probing < 3:  # overlapping probes: a healed member is seen at once
                ep._probing += 1
                task = asyncio.get_running_loop().create_task(self._probe(ep))
                self._probes.add(task)
                task.add_done_callback(self._probes.discard)
            trouble = time.monotonic() < self._trouble_until or any(
                e.state != UP for e in self.endpoints)
            interval = PROBE_INTERVAL_TROUBLE if trouble else PROBE_INTERVAL
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake.wait()
            self._wake.clear()

    def _check_lagging(self, ep: Endpoint) -> None:
        if not ep._outstanding or ep.state == DOWN:
            return
        oldest = min(ep._outstanding.values())
        if time.monotonic() - oldest > LAGGING and any(
                other.answered_sent > oldest for other in self.endpoints if other is not ep):
            self.failed(ep, TimeoutError(f"no answer for {time.monotonic() - oldest:.2f} s "
                                         "while other members answer"))

    async def _probe(self, ep: Endpoint) -> None:
        ep._probe_seq += 1
        seq = ep._probe_seq
        sent = time.monotonic()
        ep._outstanding[seq] = sent
        try:
            await ep.client.connect()
            reply = await ep.client.maintenancestub.Status(
                rpc.StatusRequest(), timeout=PROBE_TIMEOUT, metadata=ep.client.metadata)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            timed_out = isinstance(exc, TimeoutError) or (
                isinstance(exc, grpc.aio.AioRpcError)
                and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED)
            if timed_out and time.monotonic() - ep.renewed > RENEW_AFTER:
                await ep.renew()
            if seq > ep._applied_seq:
                ep._applied_seq = seq
                ep.answered = False
                ep.reason = f"no answer to a health probe: {_short(exc)}"
                ep.checked = time.monotonic()
                self._evaluate()
        else:
            if seq > ep._applied_seq:
                ep._applied_seq = seq
                ep.answered = True
                ep.answered_sent = max(ep.answered_sent, sent)
                ep.member_id = reply.header.member_id
                ep.term = reply.raftTerm
                if ep.suspect_since and sent >= ep.suspect_since:
                    ep.suspect_since = 0.0
                ep.checked = time.monotonic()
                leader_changed = reply.leader != ep.leader and ep.leader != 0
                ep.leader = reply.leader
                self._evaluate(leader_changed=ep if leader_changed else None)
        finally:
            ep._probing -= 1
            ep._outstanding.pop(seq, None)

    def _evaluate(self, leader_changed: Endpoint | None = None) -> None:
        """Each member's state from the latest probes (a member that reports a leader
        which itself does not answer, or is behind another member's term, has none)."""
        gone = {e.member_id for e in self.endpoints
                if e.member_id and (not e.answered or e.suspect_since)}
        newest = max((e.term for e in self.endpoints if e.answered), default=0)
        changed = False
        for ep in self.endpoints:
            if not ep.answered:
                state = DOWN if ep._applied_seq else UNKNOWN
            elif ep.suspect_since:
                state = DOWN
            elif ep.leader == 0:
                state, ep.reason = NO_LEADER, "reports no leader"
            elif ep.leader in gone:
                state, ep.reason = NO_LEADER, f"its leader {ep.leader:x} does not answer"
            elif ep.term < newest:
                state, ep.reason = NO_LEADER, f"behind term {newest} (at {ep.term})"
            else:
                state, ep.reason = UP, "ok"
            if state != ep.state:
                if ep.state == UP or state == DOWN:
                    ep._fire()
                log.log(logging.INFO if state == UP else logging.WARNING,
                        "etcd member %s: %s (%s)", ep.name, state, ep.reason)
                ep.state = state
                changed = True
            elif ep is leader_changed:
                ep._fire()
                changed = True
        if changed:
            self._any_change.set()
            self._any_change = asyncio.Event()

    def status(self) -> list[dict[str, Any]]:
        """Each member's health, and which one requests go to (``current``)."""
        preferred = self.endpoints[self._preferred]
        return [{**ep.as_dict(), "current": ep is preferred} for ep in self.endpoints]


class MemberChanged(Unavailable):
    """The member a request was sent to stopped being up, or its leader changed."""


def retryable(exc: BaseException) -> bool:
    """An RPC error that is no answer (or no leader) rather than a refusal."""
    if isinstance(exc, grpc.aio.AioRpcError):
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                          grpc.StatusCode.CANCELLED):
            return True
        details = exc.details() or ""
        return any(text in details for text in _NO_LEADER)
    return isinstance(exc, TimeoutError | MemberChanged | OSError)


_NO_LEADER = ("leader changed", "no leader", "proposal dropped", "request timed out",
              "timed out, possibly due to", "not capable", "raft: stopped")


def _short(exc: BaseException | None) -> str:
    if exc is None:
        return "-"
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


class BalancedClient(aetcd.Client):  # type: ignore[misc]
    """An aetcd client over several etcd members, one health-checked channel each.

    aetcd's methods use the stubs of :attr:`Balancer.current` at the time of the call;
    :attr:`balancer` offers retries on another member and the news that a member went.
    A watch ends when its member stops answering, so its owner resumes it elsewhere.
    """

    def __init__(self, endpoints: list[Endpoint], *, timeout: float | None):
        super().__init__(host=endpoints[0].name, port=0,  # type: ignore[arg-type]
                         timeout=timeout)
        self.balancer = Balancer(endpoints, timeout=timeout)

    def _init_channel_attrs(self) -> None:  # the members' clients hold the channels
        pass

    @property
    def _member(self) -> aetcd.Client:
        return self.balancer.current.client

    channel = property(lambda self: self._member.channel)
    metadata = property(lambda self: self._member.metadata)
    kvstub = property(lambda self: _Stub(self.balancer, "kvstub"))
    leasestub = property(lambda self: _Stub(self.balancer, "leasestub"))
    clusterstub = property(lambda self: _Stub(self.balancer, "clusterstub"))
    maintenancestub = property(lambda self: _Stub(self.balancer, "maintenancestub"))
    _watcher = property(lambda self: self._member._watcher)

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        for ep in self.balancer.endpoints:
            await ep.client.connect()
        self.balancer.start()
        self._connected.set()
        # The first probes' answers, so that the first request goes to a member that
        # answers (bounded: a member cut off is found out by the requests' own retries).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(PROBE_TIMEOUT):
                while not any(ep.state == UP for ep in self.balancer.endpoints) and any(
                        ep.state == UNKNOWN for ep in self.balancer.endpoints):
                    await self.balancer._any_change.wait()

    async def close(self) -> None:
        await self.balancer.stop()
        for ep in self.balancer.endpoints:
            with contextlib.suppress(Exception):
                await ep.client.close()
        self._connected.clear()

    async def watch(self, key: bytes, **kwargs: Any) -> Any:
        await self.connect()
        ep = self.balancer.current
        inner = await ep.client.watch(key, **kwargs)
        balancer = self.balancer

        async def iterator() -> AsyncIterator[Any]:
            events = inner.__aiter__()
            pending: asyncio.Future[Any] | None = None
            try:
                while True:
                    changed = ep.changed()
                    if ep.state == DOWN or (ep.state != UP and balancer.current is not ep):
                        raise aetcd.exceptions.ConnectionFailedError(
                            f"etcd member {ep.name} of this watch is {ep.state} ({ep.reason})")
                    if pending is None:
                        pending = asyncio.ensure_future(events.__anext__())
                    waiter = asyncio.ensure_future(changed.wait())
                    try:
                        await asyncio.wait({pending, waiter}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        waiter.cancel()
                    if pending.done():
                        done, pending = pending, None
                        try:
                            item = done.result()
                        except StopAsyncIteration:
                            return
                        yield item
            finally:
                if pending is not None and not pending.done():
                    pending.cancel()
                    with contextlib.suppress(BaseException):
                        await pending

        from aetcd import rtypes
        return rtypes.Watch(iterator, inner.cancel, inner.watch_id)


class _Stub:
    """A gRPC stub of whichever member answers: unary calls go through
    :meth:`Balancer.call` (sent again elsewhere after no answer), except ``Txn``, whose
    compares may not make a second application harmless: it gets one attempt, on an up
    member. Streams go to the current member."""

    _STREAMS = frozenset({"LeaseKeepAlive", "Snapshot", "Watch"})

    def __init__(self, balancer: Balancer, attr: str):
        self._balancer = balancer
        self._attr = attr

    def __getattr__(self, method: str) -> Any:
        balancer, attr = self._balancer, self._attr
        if method in self._STREAMS:
            return getattr(getattr(balancer.current.client, attr), method)

        def invoke(request: Any, timeout: float | None = None, metadata: Any = None,
                   **kwargs: Any) -> Awaitable[Any]:
            def send(ep: Endpoint, attempt_timeout: float) -> Awaitable[Any]:
                return getattr(getattr(ep.client, attr), method)(
                    request, timeout=attempt_timeout, metadata=ep.client.metadata, **kwargs)

            if method == "Txn":
                return _once(balancer, send, timeout)
            return balancer.call(send, timeout=timeout, what=f"etcd {method}")

        return invoke


async def _once(balancer: Balancer, send: Callable[[Endpoint, float], Awaitable[T]],
                timeout: float | None) -> T:
    deadline = time.monotonic() + (balancer.timeout if timeout is None else timeout)
    ep = await balancer.choose(deadline)
    try:
        return await send(ep, max(deadline - time.monotonic(), 0.01))
    except grpc.aio.AioRpcError as exc:
        if retryable(exc):
            balancer.failed(ep, exc)
        raise


def balancer_of(client: aetcd.Client) -> Balancer:
    """The client's :class:`Balancer`; a plain one-member client gets one that never
    probes (there is nowhere else to send a request)."""
    balancer = getattr(client, "balancer", None)
    if isinstance(balancer, Balancer):
        return balancer
    balancer = Balancer([Endpoint("etcd", client)],
                        timeout=getattr(client, "_timeout", None), probing=False)
    with contextlib.suppress(AttributeError):
        client.balancer = balancer
    return balancer


async def check_credentials(client: aetcd.Client) -> None:
    """Authenticate now if ``client`` has credentials: :class:`EtcdAuthError` if etcd
    refuses them. An unreachable etcd is not an error here (callers retry)."""
    auth = getattr(client, "_auth", None)
    if not isinstance(auth, _TokenAuth):
        return
    await client.connect()
    try:
        await auth.token()
    except grpc.aio.AioRpcError as exc:
        log.warning("etcd authentication not checked yet: %s", exc.details())


def describe_error(exc: BaseException) -> str:
    """One line for an etcd failure, with a hint when it looks like a TLS mismatch."""
    if isinstance(exc, EtcdAuthError):
        return str(exc)
    text = str(exc) or type(exc).__name__
    hints = (
        ("CERTIFICATE_VERIFY_FAILED", "etcd's certificate is not signed by --etcd-ca or does "
                                      "not name the endpoint's host"),
        ("TSI_DATA_CORRUPTED", "etcd refused this client's certificate (--etcd-cert and "
                               "--etcd-key, signed by a CA etcd trusts)"),
        ("BAD_CERTIFICATE", "etcd refused this client's certificate (--etcd-cert and "
                            "--etcd-key, signed by a CA etcd trusts)"),
        ("WRONG_VERSION_NUMBER", "etcd does not speak TLS there: use http://"),
        ("Socket closed", "if etcd serves TLS, use https:// endpoints"),
        ("user name is empty", "etcd has authentication enabled: give --etcd-user and a "
                               "password"),
        ("permission denied", "the etcd user (or client certificate name) lacks access to "
                              "meshxl's keys"),
    )
    for needle, hint in hints:
        if needle in text:
            return f"{type(exc).__name__}: {text} ({hint})"
    return f"{type(exc).__name__}: {text}"


# -- TLS and authentication ------------------------------------------------------------------

_AUTHENTICATE = "/etcdserverpb.Auth/Authenticate"
_WATCH = "/etcdserverpb.Watch/Watch"
# etcd answers these when a request's token is unknown (expired, or etcd restarted and
# forgot its simple tokens) or missing (auth was enabled after the client connected).
_TOKEN_ERRORS = ("invalid auth token", "user name is empty")


def _method(details: grpc.aio.ClientCallDetails) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else str(method)


def _stale_token(code: grpc.StatusCode | None, message: str | None) -> bool:
    return code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT) \
        and any(e in (message or "") for e in _TOKEN_ERRORS)


class _TokenAuth:
    """One auth token per client, fetched on first use and again when etcd rejects it.

    A watch stream is checked against its token when each watch is created, and etcd
    3.4 refuses a watch with a stale token by cancelling it (no gRPC error), so a watch
    stream starts only with a token a call confirmed recently (:data:`WATCH_TOKEN_AGE`).
    """

    WATCH_TOKEN_AGE = 1.0

    def __init__(self, user: str, password: str, timeout: float | None):
        self._user = user
        self._password = password
        self._timeout = timeout
        self._token: str | None = None
        self._confirmed = 0.0
        self._disabled = False
        self._lock = asyncio.Lock()
        self.channel: grpc.aio.Channel | None = None
        self.authentications = 0

    async def token(self, max_age: float | None = None) -> str | None:
        """The current token; a new one if there is none (or it was last confirmed more
        than ``max_age`` seconds ago)."""
        if self._usable(max_age):
            return self._token
        async with self._lock:
            if not self._usable(max_age):
                await self._authenticate()
        return self._token

    def _usable(self, max_age: float | None) -> bool:
        if self._disabled:
            return True
        if self._token is None:
            return False
        return max_age is None or time.monotonic() - self._confirmed < max_age

    def confirm(self, token: str | None) -> None:
        """A call with ``token`` succeeded: etcd still knows it."""
        if token is not None and token == self._token:
            self._confirmed = time.monotonic()

    def invalidate(self, token: str | None) -> None:
        """Forget ``token`` (unless another call already replaced it)."""
        if token == self._token:
            self._token = None
            self._disabled = False

    @property
    def current(self) -> str | None:
        return self._token

    async def _authenticate(self) -> None:
        assert self.channel is not None
        stub = rpc.AuthStub(self.channel)
        request = rpc.AuthenticateRequest(name=self._user, password=self._password)
        try:
            response = await stub.Authenticate(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or ""
            if "authentication is not enabled" in details:
                # Like etcd's own client: credentials for an etcd without auth are
                # harmless, and auth can be enabled later (the next call authenticates).
                log.info("etcd authentication is not enabled; sending no token")
                self._disabled = True
                return
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise EtcdAuthError(f"etcd refused user {self._user!r}: "
                                    f"{details.removeprefix('etcdserver: ')}") from None
            raise
        self._token = response.token
        self._confirmed = time.monotonic()
        self._disabled = False
        self.authentications += 1

    def interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        return [_UnaryAuth(self), _UnaryStreamAuth(self), _StreamUnaryAuth(self),
                _StreamStreamAuth(self)]


def _with_token(details: grpc.aio.ClientCallDetails,
                token: str | None) -> grpc.aio.ClientCallDetails:
    if token is None:
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata["token"] = token
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata,
                                      details.credentials, details.wait_for_ready)


class _UnaryAuth(grpc.aio.UnaryUnaryClientInterceptor):
    """Unary calls carry the token; one rejected for its token is retried once."""

    def __init__(self, auth: _TokenAuth):
        self._auth = auth

    async def intercept_unary_unary(self, continuation: Callable[..., Awaitable[Any]],
                                    client_call_details: grpc.aio.ClientCallDetails,
                                    request: Any) -> Any:
        if _method(client_call_details) == _AUTHENTICATE:
            return await continuation(client_call_details, request)
        token = await self._auth.token()
        call = await continuation(_with_token(client_call_details, token), request)
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            if not _stale_token(exc.code(), exc.details()):
                raise
            self._auth.invalidate(token)
            token = await self._auth.token()
            return await continuation(_with_token(client_call_details, token), request)
        self._auth.confirm(token)
        return call


class _StreamAuth:
    """Streams (watch, lease keep-alive) carry the token; a stream that fails for its
    token makes the next call authenticate again (the caller retries the stream).

    grpc.aio files an interceptor under the first kind it is an instance of, so each
    kind of stream gets its own subclass.
    """

    def __init__(self, auth: _TokenAuth):
        self._auth = auth

    async def _intercept(self, continuation: Callable[..., Awaitable[Any]],
                         details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        watch = _method(details) == _WATCH
        token = await self._auth.token(_TokenAuth.WATCH_TOKEN_AGE if watch else None)
        call = await continuation(_with_token(details, token), request)

        def done(finished: Any) -> None:
            task = asyncio.ensure_future(_finished_status(finished))
            task.add_done_callback(lambda t: self._check(t, token))

        call.add_done_callback(done)
        return call

    def _check(self, task: asyncio.Future[tuple[grpc.StatusCode, str]],
               token: str | None) -> None:
        if not task.cancelled() and task.exception() is None and _stale_token(*task.result()):
            self._auth.invalidate(token)


class _UnaryStreamAuth(_StreamAuth, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Callable[..., Any],
                                     client_call_details: grpc.aio.ClientCallDetails,
                                     request: Any) -> Any:
        return await self._intercept(continuation, client_call_details, request)


class _StreamUnaryAuth(_StreamAuth, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Callable[..., Any],
                                     client_call_details: grpc.aio.ClientCallDetails,
                                     request_iterator: Any) -> Any:
        return await self._intercept(continuation, client_call_details, request_iterator)


class _StreamStreamAuth(_StreamAuth, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Callable[..., Any],
                                      client_call_details: grpc.aio.ClientCallDetails,
                                      request_iterator: Any) -> Any:
        return await self._intercept(continuation, client_call_details, request_iterator)


async def _finished_status(call: Any) -> tuple[grpc.StatusCode, str]:
    return await call.code(), await call.details()


class _SecureClient(aetcd.Client):
    """aetcd's client dialing with TLS credentials and/or sending an auth token.

    Only :meth:`connect` differs from aetcd's: the channel is secure when
    ``credentials`` are given, and the token comes from the interceptors (aetcd's
    ``metadata`` stays None), so a token etcd no longer knows is replaced on the fly.
    """

    def __init__(self, *, host: str, port: int, timeout: float | None,
                 options: dict[str, Any], credentials: grpc.ChannelCredentials | None,
                 auth: _TokenAuth | None):
        super().__init__(host=host, port=port, timeout=timeout,  # type: ignore[arg-type]
                         options=options)
        self._credentials = credentials
        self._auth = auth

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:  # type: ignore[has-type]
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            target = f"{self._host}:{self._port}"
            options = list(self._options.items())
            interceptors = self._auth.interceptors() if self._auth else None
            if self._credentials is not None:
                self.channel = grpc.aio.secure_channel(target, self._credentials, options,
                                                       interceptors=interceptors)
            else:
                self.channel = grpc.aio.insecure_channel(target, options,
                                                         interceptors=interceptors)
            if self._auth is not None:
                self._auth.channel = self.channel
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = _Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                     auth=self._auth)
            self._connected.set()
        finally:
            self._is_connecting = False


class _Watcher(watcher.Watcher):  # type: ignore[misc]
    """aetcd's watcher, except that a watch etcd cancels with a reason (refused for its
    token or its permissions) fails instead of waiting forever for events.

    aetcd registers a created-and-cancelled watch as if it were live. Raising here ends
    the stream like a connection error: every watch on it gets the error, and its
    owner starts a new one (on a new stream, with a new token).
    """

    def __init__(self, watchstub: Any, *, timeout: float | None, auth: _TokenAuth | None):
        super().__init__(watchstub, timeout=timeout, metadata=None)
        self._auth = auth

    async def _handle_response(self, response: Any) -> None:
        if response.canceled and response.cancel_reason:
            if self._auth is not None:
                self._auth.invalidate(self._auth.current)
            raise aetcd.exceptions.ClientError(
                f"etcd cancelled the watch: {response.cancel_reason}")
        await super()._handle_response(response)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
