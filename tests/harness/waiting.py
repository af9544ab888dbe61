"""Wait for a condition instead of sleeping a fixed time."""

# ruff: noqa: ASYNC109  (timeouts here produce errors naming what was awaited)

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

__all__ = ["WaitTimeout", "wait_for"]

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """A condition did not hold in time; an AssertionError so pytest shows it as a failure."""


@overload
async def wait_for(
    predicate: Callable[[], Awaitable[T]],
    timeout: float = ...,
    what: str = ...,
    *,
    interval: float = ...,
) -> T: ...


@overload
async def wait_for(
    predicate: Callable[[], T],
    timeout: float = ...,
    what: str = ...,
    *,
    interval: float = ...,
) -> T: ...


async def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    what: str = "condition",
    *,
    interval: float = 0.05,
) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy; return it.

    Exceptions raised by the predicate count as "not yet" (an admin endpoint that is not
    up yet, an etcd member that is electing); the last value or exception is reported
    when ``timeout`` expires, together with ``what``.
    """
    start = time.monotonic()
    deadline = start + timeout
    last: str = "never evaluated"
    while True:
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
            raise WaitTimeout(f"timed out after {now - start:.1f}s waiting for {what} ({last})")
        await asyncio.sleep(min(interval, max(0.0, deadline - now)))
