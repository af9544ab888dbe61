"""Wait for a condition instead of sleeping a fixed time: the one poll loop.

``await wait_until(predicate, timeout=..., what=...)`` polls ``predicate`` (sync or
async) until it returns something truthy and returns that value. Everything that waits
for a local process (an HTTP endpoint answering, an etcd member healthy, a process
exiting, Envoy seeing its hosts) goes through it, so every timeout names what was
awaited and, when a process is being watched, carries that process's log tail.

Every deadline given here is multiplied by one factor, :func:`time_scale` (1 unless
:func:`set_time_scale` changed it): the test suite sets it from
``MESHXL_TEST_TIME_SCALE`` (``tests/harness/clock.py``), so a slower machine waits
longer rather than failing. The factor stretches deadlines only: a condition that
holds early ends the wait as early.
"""

# ruff: noqa: ASYNC109  (timeouts here produce errors naming what was awaited)

from __future__ import annotations

import asyncio
import inspect
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar, overload

import aiohttp

from meshxl.errors import ProcessError

__all__ = [
    "LocalError",
    "ProcessExited",
    "WaitTimeout",
    "Watched",
    "http_ok",
    "port_open",
    "set_time_scale",
    "time_scale",
    "wait_http",
    "wait_port",
    "wait_until",
]

T = TypeVar("T")

_scale = 1.0


def time_scale() -> float:
    """The factor every deadline of this module is multiplied by (1 by default)."""
    return _scale


def set_time_scale(factor: float) -> None:
    """Multiply every deadline of this module by ``factor`` (>= 1: a slower machine)."""
    global _scale
    if not factor >= 1.0:
        raise ValueError(f"a time scale is a number >= 1, got {factor!r}")
    _scale = float(factor)


class LocalError(ProcessError, RuntimeError):
    """A local process could not be started, or did not become ready."""


class ProcessExited(LocalError):
    """The watched process exited while something was waited for."""


class WaitTimeout(LocalError, AssertionError):
    """A condition did not hold in time (an AssertionError too, so pytest shows a test
    waiting in vain as a failure rather than an error)."""


class Watched(Protocol):
    """A process whose death ends a wait at once (``meshxl.local.procs.Process``)."""

    name: str

    @property
    def returncode(self) -> int | None: ...

    def tail(self, lines: int = ...) -> str: ...


@overload
async def wait_until(
    predicate: Callable[[], Awaitable[T]],
    *,
    timeout: float = ...,
    what: str = ...,
    interval: float = ...,
    process: Watched | None = ...,
    explain: Callable[[], Any] | None = ...,
) -> T: ...


@overload
async def wait_until(
    predicate: Callable[[], T],
    *,
    timeout: float = ...,
    what: str = ...,
    interval: float = ...,
    process: Watched | None = ...,
    explain: Callable[[], Any] | None = ...,
) -> T: ...


async def wait_until(
    predicate: Callable[[], Any],
    *,
    timeout: float = 10.0,
    what: str = "condition",
    interval: float = 0.05,
    process: Watched | None = None,
    explain: Callable[[], Any] | None = None,
) -> Any:
    """Poll ``predicate`` until it returns something truthy; return that value.

    Exceptions raised by the predicate count as "not yet" (an endpoint that is not up
    yet, an etcd member that is electing); the last value or exception is reported in
    the :class:`WaitTimeout` raised when ``timeout`` (times :func:`time_scale`) expires,
    together with ``what`` and ``explain()`` (sync or async, e.g. the state that was
    wrong). ``process``: raise :class:`ProcessExited` with its log tail as soon as it
    has exited.
    """
    start = time.monotonic()
    deadline = start + timeout * _scale
    last: str = "never evaluated"
    while True:
        if process is not None and (code := process.returncode) is not None:
            raise ProcessExited(f"{process.name} exited with code {code} while waiting for "
                                f"{what}; log tail:\n{process.tail()}")
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            last = f"last value: {value!r}"[:2000]
        except Exception as exc:  # noqa: BLE001 - polled conditions may fail until they hold
            last = f"last error: {type(exc).__name__}: {exc}"[:2000]
        now = time.monotonic()
        if now >= deadline:
            detail = ""
            if explain is not None:
                try:
                    shown = explain()
                    if inspect.isawaitable(shown):
                        shown = await shown
                    detail = f"; {shown}"[:2000]
                except Exception as exc:  # noqa: BLE001 - best effort for the message
                    detail = f"; (explain failed: {exc})"
            tail = f"; log tail:\n{process.tail()}" if process is not None else ""
            raise WaitTimeout(f"timed out after {now - start:.1f}s waiting for {what} "
                              f"({last}){detail}{tail}")
        await asyncio.sleep(min(interval, max(0.0, deadline - now)))


async def http_ok(url: str, *, expect: int = 200, ssl_context: ssl.SSLContext | None = None,
                  request_timeout: float = 1.0) -> bool:
    """One GET of ``url``: did it answer ``expect``? (Errors propagate: "not yet".)"""
    connector = aiohttp.TCPConnector(ssl=ssl_context) if ssl_context is not None else None
    async with (
        aiohttp.ClientSession(connector=connector,
                              timeout=aiohttp.ClientTimeout(total=request_timeout)) as http,
        http.get(url) as resp,
    ):
        if resp.status != expect:
            raise LocalError(f"HTTP {resp.status}: {(await resp.text()).strip()[:200]}")
        return True


async def wait_http(url: str, *, process: Watched | None = None, timeout: float = 15.0,
                    expect: int = 200, interval: float = 0.05) -> None:
    """Until ``url`` answers ``expect``; fail fast if ``process`` exits meanwhile."""
    name = f"{process.name} at " if process is not None else ""
    await wait_until(lambda: http_ok(url, expect=expect), timeout=timeout,
                     what=f"{name}{url} to answer {expect}", interval=interval,
                     process=process)


async def port_open(host: str, port: int) -> bool:
    """Does ``host:port`` accept a TCP connection? (Errors propagate: "not yet".)"""
    async with asyncio.timeout(1.0):
        _, writer = await asyncio.open_connection(host, port)
    writer.close()
    return True


async def wait_port(host: str, port: int, *, process: Watched | None = None,
                    timeout: float = 15.0, interval: float = 0.05) -> None:
    """Until ``host:port`` accepts connections; fail fast if ``process`` exits meanwhile."""
    name = f"{process.name} at " if process is not None else ""
    await wait_until(lambda: port_open(host, port), timeout=timeout,
                     what=f"{name}{host}:{port} to accept connections", interval=interval,
                     process=process)
