"""The suite's one clock: every deadline and every deliberate pause of a test is scaled
by one factor, ``MESHXL_TEST_TIME_SCALE`` (read here and nowhere else).

A test waits for a condition with a deadline (``meshxl.local.wait.wait_until``, whose
deadlines this module scales through ``wait.set_time_scale``), never for a fixed time.
The deadlines are generous on purpose: they end a wait that would never end, they do
not measure speed (``bench/`` does, side by side). A slower machine sets a larger
scale (``MESHXL_TEST_TIME_SCALE=3 make test``) and waits longer; a condition that holds
early still ends its wait early, so the scale costs nothing on a fast machine.

Two helpers for the rest:

* :func:`scaled` turns a deadline given to anything else (``asyncio.timeout``, a
  client's timeout, a loop's end) into this machine's;
* :func:`window` is the one deliberate pause: a test that proves nothing happens
  during a window (no request reaches a drained member, no write is lost while a
  member is away) lets that window pass, scaled, and says why.
"""

from __future__ import annotations

import asyncio
import os

from meshxl.local import wait

__all__ = ["ENV", "LONG_DRAIN_WINDOW", "SCALE", "scaled", "window"]

#: The environment variable that sets the scale.
ENV = "MESHXL_TEST_TIME_SCALE"


def _read() -> float:
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value >= 1.0 or value != value or value == float("inf"):
        raise SystemExit(f"{ENV}={raw!r}: a time scale is a finite number >= 1 "
                         "(2 waits twice as long)")
    return value


#: This run's factor (1 by default): every deadline and window is multiplied by it.
SCALE = _read()
wait.set_time_scale(SCALE)


def scaled(seconds: float) -> float:
    """``seconds`` on this machine: a deadline not given to ``wait_until``."""
    return seconds * SCALE


LONG_DRAIN_WINDOW = scaled(60.0)
"""A drain window no test outlasts on the suite's clock, for a deployment whose tests
judge planned moves under a steady load of POSTs: the window's end drains the
listener's idle HTTP/1.1 keep-alive connections too, and a POST sent on one as Envoy
closes it fails (docs/model.md, "Drains"). test_protocols measures that end itself."""


async def window(seconds: float, why: str) -> None:
    """Let ``seconds`` (scaled) pass on purpose: ``why`` says what must (not) happen
    meanwhile. Never a wait for something to be ready: that is ``wait_until``."""
    if not why:
        raise ValueError("a window says why time must pass")
    await asyncio.sleep(seconds * SCALE)
