"""A real browser for the page tests: Debian's ``chromium``, headless, driven by
Playwright (the PyPI package; its own browser downloads are never used).

Chromium runs with no network beyond loopback in mind: no background networking,
component updates, sync or first-run pages, a fresh profile per test, and the flags a
container needs (no sandbox, no GPU). Every console message and page error is kept,
so a test can assert that a page ran without errors.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness.clock import scaled

__all__ = ["CHROMIUM_ARGS", "BrowserNotInstalled", "Console", "find_chromium", "open_page",
           "wait_for_js"]

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--no-default-browser-check"]


COMMIT_LAG = 2.0
"""How long after an aborted request's failure the commit of the navigation that
aborted it may be reported (Playwright's events are not ordered across the two)."""


class BrowserNotInstalled(RuntimeError):
    """No chromium (or no playwright package) to run the page tests with."""


def find_chromium() -> str:
    """``MESHXL_CHROMIUM``, else ``chromium`` (Debian's package) on PATH."""
    path = os.environ.get("MESHXL_CHROMIUM") or shutil.which("chromium") \
        or shutil.which("chromium-browser")
    if not path:
        raise BrowserNotInstalled(
            "the page tests need Debian's chromium: apt-get install chromium (scripts/setup.sh "
            "installs it), or set MESHXL_CHROMIUM to a Chromium binary")
    try:
        import playwright  # noqa: F401
    except ImportError:
        raise BrowserNotInstalled("the page tests need the playwright package (the test "
                                  "extra: make setup)") from None
    return path


@dataclass
class Console:
    """What a page said: console messages, uncaught errors and failed requests.

    A request still in flight when the test navigates the page away is aborted by the
    navigation (net::ERR_ABORTED): that is the test's doing, not a failure of the page.
    Any other failure, or an abort with no navigation after the request started, is a
    problem. The order is decided when the failures are read, not as the events arrive:
    Playwright may report the old document's aborted request just before the commit of
    the new document that aborted it (up to :data:`COMMIT_LAG` seconds later counts)."""

    messages: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    failures: list[tuple[int, float, str, str]] = field(default_factory=list)
    """(when the request started, in :meth:`tick` order; when it failed, monotonic; its
    URL; its failure)."""
    navigations: list[tuple[int, float]] = field(default_factory=list)
    """When navigations (requests for a document, and commits) started: tick, monotonic."""
    _clock: int = 0

    def tick(self) -> int:
        """The next instant of the page's event order."""
        self._clock += 1
        return self._clock

    @property
    def failed_requests(self) -> list[str]:
        return [f"{url}: {failure}" for started, failed, url, failure in self.failures
                if not (failure == "net::ERR_ABORTED" and any(
                    n > started and at <= failed + scaled(COMMIT_LAG)
                    for n, at in self.navigations))]

    def navigated(self, tick: int | None = None) -> None:
        self.navigations.append((self.tick() if tick is None else tick, time.monotonic()))

    def problems(self) -> list[str]:
        """Errors and warnings of any kind, one line each."""
        return ([f"console.{kind}: {text}" for kind, text in self.messages
                 if kind in ("error", "warning", "assert")]
                + [f"page error: {e}" for e in self.errors]
                + [f"request failed: {r}" for r in self.failed_requests])


@asynccontextmanager
async def open_page(profile: Path) -> AsyncIterator[tuple[Any, Console]]:
    """A fresh headless Chromium (its profile in ``profile``) and one page in it, with
    every console message, page error and failed request recorded."""
    from playwright.async_api import async_playwright

    executable = find_chromium()
    console = Console()
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(profile), executable_path=executable, headless=True, args=CHROMIUM_ARGS,
            service_workers="block")
        try:
            page = context.pages[0] if context.pages else await context.new_page()
            page.on("console", lambda m: console.messages.append((m.type, m.text)))
            page.on("pageerror", lambda e: console.errors.append(str(e)))
            started: dict[Any, int] = {}

            def on_request(r: Any) -> None:
                started[r] = console.tick()
                if r.is_navigation_request():
                    console.navigated(started[r])

            page.on("request", on_request)
            # A request the old document made after the navigation started is aborted
            # when the new one commits: the commit counts as a navigation too.
            page.on("framenavigated", lambda frame: console.navigated())
            page.on("requestfailed", lambda r: console.failures.append(
                (started.get(r, 0), time.monotonic(), r.url, r.failure)))
            yield page, console
        finally:
            await context.close()


async def wait_for_js(page: Any, expression: str, *, timeout: float = 10.0,
                      what: str | None = None) -> Any:
    """Poll ``expression`` in the page until it is truthy; return its value.

    Playwright's own ``wait_for_function`` evaluates its predicate with ``eval``, which
    a page whose Content-Security-Policy forbids ``unsafe-eval`` refuses; ``evaluate``
    runs through the DevTools protocol, which the policy does not govern."""
    deadline = time.monotonic() + scaled(timeout)
    value = None
    while True:
        value = await page.evaluate(expression)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for "
                                 f"{what or expression} (last value: {value!r})")
        await asyncio.sleep(0.02)
