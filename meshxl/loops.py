"""The event loop meshxl's statesync sidecar runs on.

uvloop where it is installed (Linux and macOS: a dependency there): the sidecar's cost
per session write is mostly event-loop and transport work, which uvloop does in C
(docs/performance.md, "The sidecar's HTTP server"). ``MESHXL_LOOP=asyncio`` chooses
the standard loop instead (to compare, or to debug with asyncio's debug mode).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from meshxl.errors import InputError

__all__ = ["LOOP_ENV", "loop_factory"]

LOOP_ENV = "MESHXL_LOOP"
_CHOICES = ("uvloop", "asyncio")


def loop_factory(environ: dict[str, str] | None = None
                 ) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """``asyncio.Runner``'s ``loop_factory``: uvloop's, or None for asyncio's own (when
    chosen, or when uvloop is not installed)."""
    choice = (os.environ if environ is None else environ).get(LOOP_ENV) or "uvloop"
    if choice not in _CHOICES:
        raise InputError(f"{LOOP_ENV}={choice[:40]!r}: choose one of {', '.join(_CHOICES)}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
