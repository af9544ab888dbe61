"""The demo processes' one way to run until they are told to stop."""

from __future__ import annotations

import asyncio
import signal

__all__ = ["until_stopped"]


async def until_stopped() -> None:
    """Return on the first SIGTERM or SIGINT (the process's own loop handles both)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
