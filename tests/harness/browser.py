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
    """What a page said: console messages and uncaught errors."""

    messages: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)

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
            # A request still in flight when the test navigates the page away is
            # aborted by the navigation (net::ERR_ABORTED): that is the test's doing,
            # not a failure of the page. Any other failure, or an abort with no
            # navigation after the request started, is recorded.
            started: dict[Any, int] = {}
            navigations: list[int] = []
            order = iter(range(1 << 62))

            def on_request(r: Any) -> None:
                started[r] = next(order)
                if r.is_navigation_request():
                    navigations.append(started[r])

            def on_failed(r: Any) -> None:
                aborted = r.failure == "net::ERR_ABORTED" and any(
                    n > started.get(r, -1) for n in navigations)
                if not aborted:
                    console.failed_requests.append(f"{r.url}: {r.failure}")

            page.on("request", on_request)
            # A request the old document made after the navigation started is aborted
            # when the new one commits: the commit counts as a navigation too.
            page.on("framenavigated", lambda frame: navigations.append(next(order)))
            page.on("requestfailed", on_failed)
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
