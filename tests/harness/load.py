"""Bounded HTTP load against a loopback target, recording who served each request.

``drive`` sends ``requests_per_session`` requests for each session, round-robin across
sessions (so every session's requests spread over the whole run, which is what a
failover test needs), with at most ``concurrency`` in flight, and stops at
``max_seconds`` (scaled by the suite's clock, :mod:`tests.harness.clock`). It refuses
non-loopback targets and more than ``MAX_REQUESTS``.

``under_way(answered, count)`` waits until a running load has had ``count`` answers
(a fault injected "under load" comes once the load is under way, not after a fixed
time that a busy machine may spend starting it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence, Sized
from dataclasses import dataclass
from http.cookies import SimpleCookie
from urllib.parse import urlsplit

import aiohttp

from meshxl.local.wait import wait_until
from tests.harness.clock import scaled

__all__ = ["MAX_REQUESTS", "Outcome", "by_session", "drive", "failures", "members_seen",
           "under_way"]

MAX_REQUESTS = 20_000


@dataclass(frozen=True)
class Outcome:
    """One request: which session sent it, who answered (or what went wrong), when."""

    session: str
    seq: int  # index of this request within its session
    status: int | None  # HTTP status, None when no response arrived
    member: str | None  # from the JSON body / x-meshxl-member header
    error: str | None  # transport error or non-2xx summary
    started: float  # seconds since the run's origin (drive()'s start, or the caller's)
    elapsed: float  # seconds
    echoed_session: str | None = None  # the session the backend saw

    @property
    def ok(self) -> bool:
        return self.error is None and self.status is not None and 200 <= self.status < 300


def _check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"drive() only sends to loopback addresses, not {host!r} ({url})")


async def drive(
    url: str,
    sessions: int | Sequence[str],
    requests_per_session: int,
    *,
    header: str | None = "x-session-id",
    cookie: str | None = None,
    keep_set_cookies: bool = False,
    extra_headers: dict[str, str] | None = None,
    concurrency: int = 8,
    max_seconds: float = 20.0,
    request_timeout: float = 5.0,
    method: str = "GET",
    origin: float | None = None,
    live: list[Outcome] | None = None,
    stop: asyncio.Event | None = None,
) -> list[Outcome]:
    """Send the load and return one ``Outcome`` per request sent, in completion order.

    ``sessions``: a count (names ``s0``, ``s1``...) or explicit session ids. Each request
    carries its session in ``header`` and/or in cookie ``cookie``. ``keep_set_cookies``
    stores cookies the proxy or backend sets (e.g. Envoy's hash cookie with a TTL) per
    session and sends them back, like a browser. Requests not started by ``max_seconds``
    are not sent (so ``len(result)`` may be smaller than asked); those started run to
    their answer or ``request_timeout``. ``origin``: the
    ``time.monotonic()`` an outcome's ``started`` counts from (default: when this call
    starts), for a caller that times a fault with its own clock: the load starts a while
    after its task is made (its queue filled first). ``live``: a list the outcomes are
    appended to as they come (for :func:`under_way`, or to wait for enough after a
    fault); ``stop``: no request is started once it is set.
    """
    _check_loopback(url)
    names = [f"s{i}" for i in range(sessions)] if isinstance(sessions, int) else list(sessions)
    total = len(names) * requests_per_session
    if total > MAX_REQUESTS:
        raise ValueError(f"{total} requests asked; drive() is bounded to {MAX_REQUESTS}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    for seq in range(requests_per_session):
        for name in names:
            queue.put_nowait((name, seq))
    jars: dict[str, dict[str, str]] = defaultdict(dict)
    results: list[Outcome] = [] if live is None else live
    t0 = time.monotonic()
    deadline = t0 + scaled(max_seconds)
    zero = t0 if origin is None else origin

    async def one(http: aiohttp.ClientSession, session: str, seq: int) -> Outcome:
        headers = dict(extra_headers or {})
        if header:
            headers[header] = session
        cookies = dict(jars[session]) if keep_set_cookies else {}
        if cookie:
            cookies.setdefault(cookie, session)
        if cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
        start = time.monotonic()
        member: str | None = None
        echoed: str | None = None
        try:
            async with http.request(method, url, headers=headers) as resp:
                body = await resp.read()
                member = resp.headers.get("x-meshxl-member")
                if keep_set_cookies:
                    for raw in resp.headers.getall("Set-Cookie", []):
                        parsed: SimpleCookie = SimpleCookie()
                        parsed.load(raw)
                        for key, morsel in parsed.items():
                            jars[session][key] = morsel.value
                if resp.content_type == "application/json":
                    try:
                        data = await resp.json()
                        member = data.get("member", member)
                        echoed = data.get("session")
                    except ValueError:
                        pass
                error = None
                if not 200 <= resp.status < 300:
                    error = f"HTTP {resp.status}: {body[:120].decode(errors='replace')}"
                status: int | None = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            status, error = None, f"{type(exc).__name__}: {exc}"
        return Outcome(
            session=session,
            seq=seq,
            status=status,
            member=member,
            error=error,
            started=start - zero,
            elapsed=time.monotonic() - start,
            echoed_session=echoed,
        )

    async def worker(http: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            try:
                session, seq = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            # A request started in time runs to its answer (bounded by request_timeout):
            # cut at max_seconds, a slow machine's last answers would count as failures.
            results.append(await one(http, session, seq))

    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=request_timeout)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()
    ) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return results


def by_session(outcomes: Iterable[Outcome]) -> dict[str, list[Outcome]]:
    """Outcomes grouped per session, each list in request order."""
    grouped: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        grouped[outcome.session].append(outcome)
    return {k: sorted(v, key=lambda o: o.seq) for k, v in grouped.items()}


def members_seen(outcomes: Iterable[Outcome]) -> dict[str, list[str | None]]:
    """Session -> the member that served each of its requests, in order (None = failed)."""
    return {
        session: [o.member if o.ok else None for o in items]
        for session, items in by_session(outcomes).items()
    }


def failures(outcomes: Iterable[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if not o.ok]


async def under_way(answered: Callable[[], Sized | int], count: int = 50, *,
                    timeout: float = 30.0, what: str = "the load") -> None:
    """Until ``answered()`` (a running load's records, or their number) reaches ``count``."""
    def enough() -> bool:
        got = answered()
        return (got if isinstance(got, int) else len(got)) >= count
    await wait_until(enough, timeout=timeout, what=f"{what} under way ({count} answers)")
