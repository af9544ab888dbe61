"""Signals of a sick member, measured in the sidecar where they are true: how late its
event loop runs, how long etcd takes to commit its writes, and the CPU pressure its
container is under (docs/statesync.md, "Signals of a sick member").

Each costs next to nothing when idle: the event-loop lag is one timer callback every
:data:`LAG_INTERVAL` seconds (no task, no thread); the commit latency is one append per
write batch, taken from the time the store already measures; the CPU pressure is one
small file read when asked for (``/metrics``, ``/v1/status``), never on a timer. The
windows are bounded in time and in count, and percentiles are computed only when read.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshxl.stats import quantile

__all__ = ["LAG_INTERVAL", "WINDOW", "LoopLag", "Pressure", "Signals", "Window",
           "cgroup_v2_path", "parse_psi_some_avg10", "pressure_source"]

WINDOW = 10.0
"""Seconds of samples a window keeps."""
LAG_INTERVAL = 0.25
"""Seconds between two event-loop lag samples."""
WINDOW_SAMPLES = 1024
"""Samples a window keeps at most (a busy store commits many batches a second: the
window is then the last this many of them, less than :data:`WINDOW` seconds)."""
QUANTILE = 0.99


class Window:
    """The samples of the last ``span`` seconds (at most ``limit`` of them)."""

    def __init__(self, span: float = WINDOW, limit: int = WINDOW_SAMPLES,
                 clock: Callable[[], float] = time.monotonic):
        self.span = span
        self._clock = clock
        self._samples: deque[tuple[float, float]] = deque(maxlen=limit)
        self._summarized: tuple[int, tuple[float, float] | None, dict[str, Any]] = (
            0, None, {"samples": 0})
        """The last summary, with the count and newest sample it was made of: the
        figures of one scrape are read one by one, the samples sorted once."""

    def add(self, value: float) -> None:
        """One sample, now; what is older than the window goes (an unread window
        holds no more than a read one)."""
        now = self._clock()
        self._samples.append((now, value))
        self._prune(now)

    def _prune(self, now: float | None = None) -> None:
        oldest = (self._clock() if now is None else now) - self.span
        samples = self._samples
        while samples and samples[0][0] < oldest:
            samples.popleft()

    def __len__(self) -> int:
        self._prune()
        return len(self._samples)

    def summary(self) -> dict[str, Any]:
        """``{"samples": n, "last": ..., "p99": ..., "max": ...}`` in seconds; with no
        sample in the window only ``{"samples": 0}``: nothing measured, not zero."""
        self._prune()
        samples = self._samples
        newest = samples[-1] if samples else None
        count, made_of, summary = self._summarized
        if count == len(samples) and made_of is newest:
            return dict(summary)
        values = [v for _, v in samples]
        summary = {"samples": len(values)}
        if values:
            summary.update(last=values[-1], p99=quantile(values, QUANTILE),
                           max=max(values))
        self._summarized = (len(values), newest, summary)
        return dict(summary)

    def stat(self, name: str) -> float:
        """One figure of :meth:`summary` (``last``, ``p99``, ``max``); NaN without
        samples (what Prometheus shows for "no value")."""
        value = self.summary().get(name)
        return math.nan if value is None else float(value)


class LoopLag:
    """How late the event loop runs a timer due every ``interval`` seconds: a loop
    blocked (a long callback, a collection, CPU starvation) delays every request it
    holds by as much."""

    def __init__(self, interval: float = LAG_INTERVAL, window: Window | None = None):
        self.interval = interval
        self.window = window if window is not None else Window()
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        """Start sampling on the running loop (again: no effect)."""
        if self._handle is None:
            self._schedule(asyncio.get_running_loop())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._due = loop.time() + self.interval
        self._handle = loop.call_at(self._due, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self.window.add(max(0.0, loop.time() - self._due))
        self._schedule(loop)


# -- CPU pressure (PSI) ---------------------------------------------------------------


def parse_psi_some_avg10(text: str) -> float:
    """``avg10`` of the ``some`` line of a PSI file (``/proc/pressure/cpu``, a cgroup's
    ``cpu.pressure``), in percent: the share of the last 10 s in which at least one
    runnable task waited for a CPU. ValueError when there is no such line or it is
    malformed."""
    for line in text.splitlines():
        kind, _, fields = line.partition(" ")
        if kind != "some":
            continue
        for field in fields.split():
            name, _, value = field.partition("=")
            if name == "avg10":
                figure = float(value)
                if not 0.0 <= figure <= 100.0:
                    raise ValueError(f"avg10 out of range in {line!r}")
                return figure
        raise ValueError(f"no avg10 in {line!r}")
    raise ValueError("no 'some' line")


def cgroup_v2_path(proc_self_cgroup: str) -> str | None:
    """The process's cgroup v2 path (``0::/path`` in ``/proc/self/cgroup``), or None
    (cgroup v1 only)."""
    for line in proc_self_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "" and path.startswith("/"):
            return path
    return None


def pressure_source(root: Path = Path("/")) -> tuple[str, Path] | None:
    """Where the CPU pressure is read: ``("cgroup", .../cpu.pressure)`` of the
    process's own cgroup v2 when the file exists, else ``("system",
    /proc/pressure/cpu)``, else None (no PSI: a kernel without it, or cgroup v1 and
    PSI off)."""
    try:
        path = cgroup_v2_path((root / "proc/self/cgroup").read_text())
    except OSError:
        path = None
    if path is not None:
        candidate = root / "sys/fs/cgroup" / path.lstrip("/") / "cpu.pressure"
        if candidate.is_file():
            return "cgroup", candidate
    system = root / "proc/pressure/cpu"
    if system.is_file():
        return "system", system
    return None


class Pressure:
    """The CPU pressure of this process's cgroup or of the whole machine, read when
    asked; the source is found once (a process does not change its cgroup)."""

    def __init__(self, source: tuple[str, Path] | None = None, *, find: bool = True):
        self.source = source if source is not None or not find else pressure_source()

    def read(self) -> dict[str, Any]:
        """``{"source": "cgroup" | "system" | None, "some_avg10": percent | None}``, and
        ``error`` when the file could not be read or parsed."""
        if self.source is None:
            return {"source": None, "some_avg10": None}
        kind, path = self.source
        try:
            return {"source": kind, "some_avg10": parse_psi_some_avg10(path.read_text())}
        except (OSError, ValueError) as exc:
            return {"source": kind, "some_avg10": None, "error": f"{path}: {exc}"}

    def ratio(self) -> float:
        """``some avg10`` as a ratio (0-1; NaN when unreadable), for Prometheus."""
        figure = self.read()["some_avg10"]
        return math.nan if figure is None else figure / 100.0


class Signals:
    """The sidecar's signals: the loop's lag, etcd's commit time, the CPU pressure."""

    def __init__(self, pressure: Pressure | None = None):
        self.loop_lag = LoopLag()
        self.commits = Window()
        self.pressure = pressure or Pressure()

    def on_batch(self, kind: str, seconds: float) -> None:
        if kind == "write":
            self.commits.add(seconds)

    def status(self) -> dict[str, Any]:
        """``/v1/status``'s ``signals``: each window's summary (seconds), the pressure."""
        return {"window_seconds": self.commits.span,
                "event_loop_lag": self.loop_lag.window.summary(),
                "etcd_commit": self.commits.summary(),
                "cpu_pressure": self.pressure.read()}
