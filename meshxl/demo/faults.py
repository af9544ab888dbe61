"""Injected faults for the sample app: a sick member on demand (``bench/grayfailure.py``).

The app's ``--faults FILE`` names a small JSON file it re-reads when it changed (its
modification time is looked at ten times a second, so a fault starts within 0.1 s).
The knob is a local file, not an HTTP route, so no client can reach it through Envoy;
a missing file means no fault. Every field is optional::

    {"delay_ms": 30,         # every /counter request answered this much later
     "fail_fraction": 0.2,   # this fraction of /counter requests answered 503 at once
     "jitter_ms": 2,         # plus a random delay, lognormal with this median ...
     "jitter_sigma": 0.5,    # ... and this sigma (normal jitter, not a fault)
     "pause_ms": 50,         # the whole process stalls this long (a GC pause) ...
     "pause_every_s": 20}    # ... about this often (randomly, 0.5x to 1.5x)

``/healthz`` is never delayed or failed: a sick member's health check passes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshxl.errors import InputError

__all__ = ["FaultError", "FaultFile", "Faults", "parse_faults"]

log = logging.getLogger("meshxl.demo.faults")

MAX_DELAY_MS = 60_000.0
RELOAD_INTERVAL = 0.1
"""How often the file's modification time is looked at."""

_LIMITS: dict[str, tuple[float, float]] = {
    "delay_ms": (0.0, MAX_DELAY_MS),
    "fail_fraction": (0.0, 1.0),
    "jitter_ms": (0.0, MAX_DELAY_MS),
    "jitter_sigma": (0.0, 3.0),
    "pause_ms": (0.0, 10_000.0),
    "pause_every_s": (0.1, 3600.0),
}


class FaultError(InputError):
    """A faults file that is not a JSON object of the known fields within their bounds."""


@dataclass(frozen=True)
class Faults:
    """What the app does wrong on purpose (all zero: nothing)."""

    delay_ms: float = 0.0
    fail_fraction: float = 0.0
    jitter_ms: float = 0.0
    jitter_sigma: float = 0.5
    pause_ms: float = 0.0
    pause_every_s: float = 20.0

    def delay(self, rng: random.Random) -> float:
        """Seconds to hold one request: the fixed delay plus the jitter drawn."""
        extra = rng.lognormvariate(math.log(self.jitter_ms), self.jitter_sigma) \
            if self.jitter_ms > 0 else 0.0
        return (self.delay_ms + extra) / 1000.0

    def fails(self, rng: random.Random) -> bool:
        return self.fail_fraction > 0 and rng.random() < self.fail_fraction

    def next_pause(self, rng: random.Random) -> float:
        """Seconds until the next stall (0.5x to 1.5x ``pause_every_s``)."""
        return self.pause_every_s * rng.uniform(0.5, 1.5)


def parse_faults(text: str) -> Faults:
    """The faults a file's text asks for; :class:`FaultError` when it is not valid."""
    try:
        raw: Any = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise FaultError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise FaultError("a JSON object is expected")
    unknown = sorted(set(raw) - set(_LIMITS))
    if unknown:
        raise FaultError(f"unknown fields: {', '.join(unknown)} (known: "
                         f"{', '.join(_LIMITS)})")
    values: dict[str, float] = {}
    for name, value in raw.items():
        low, high = _LIMITS[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or \
                not math.isfinite(value) or not low <= value <= high:
            raise FaultError(f"{name} must be a number within {low:g}..{high:g}, got "
                             f"{value!r}")
        values[name] = float(value)
    return Faults(**values)


class FaultFile:
    """The faults file, read again when it changed (looked at once per ``interval``).
    A missing file is no fault; an invalid one keeps the faults read before (and says
    why in :attr:`error`)."""

    def __init__(self, path: Path, interval: float = RELOAD_INTERVAL,
                 clock: Any = time.monotonic) -> None:
        self.path = path
        self.interval = interval
        self._clock = clock
        self._checked = -math.inf
        self._stamp: tuple[int, int] | None = None
        self.faults = Faults()
        self.error = ""

    def current(self) -> Faults:
        now = self._clock()
        if now - self._checked >= self.interval:
            self._checked = now
            self._reload()
        return self.faults

    def _reload(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self.faults, self.error = None, Faults(), ""
            return
        except OSError as exc:
            self.error = f"{self.path}: {exc}"
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self.faults, self.error = parse_faults(self.path.read_text()), ""
        except (OSError, UnicodeDecodeError, FaultError) as exc:
            self.error = f"{self.path}: {exc}"
            log.warning("faults file ignored, the faults before stay: %s", self.error)
