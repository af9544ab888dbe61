"""CPU throttling of running processes, as a CPU-starved pod is: a sick member for tests
and benchmarks (``bench/grayfailure.py``).

:class:`CpuThrottle` moves processes into a child of cgroup v1's cpu controller
(``/sys/fs/cgroup/cpu/<name>``) whose ``cpu.cfs_quota_us`` is ``share`` of
``cpu.cfs_period_us`` (100 ms): together they get at most that fraction of one core, as
a pod's CPU limit does. Where that controller is missing or not writable it falls back
to a duty cycle of SIGSTOP and SIGCONT over the same period (coarser: the processes run
in bursts). Either way it is undone on exit (processes moved back to the root group or
continued, the child group removed), also when the owner dies by an exception; a
process-exit hook removes what a crash left behind::

    async with CpuThrottle("meshxl-bench-a", [app_pid, sidecar_pid], share=0.05) as t:
        ...  # t.mode: "cgroup" or "sigstop"
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import os
import signal
from collections.abc import Iterable
from pathlib import Path

from meshxl.errors import ProcessError

__all__ = ["CGROUP_CPU", "PERIOD_US", "CpuThrottle", "ThrottleError", "cgroup_unavailable",
           "duty_cycle", "quota_us", "remove_stale"]

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000
"""``cpu.cfs_period_us``: the kernel's default CFS period, 100 ms."""
MIN_QUOTA_US = 1_000
"""The smallest quota the kernel accepts (1 ms)."""
_REMOVE_ATTEMPTS = 50


class ThrottleError(ProcessError):
    """Throttling could not be set up (a bad share, no such process)."""


def quota_us(share: float, period_us: int = PERIOD_US) -> int:
    """``cpu.cfs_quota_us`` for ``share`` of one core over ``period_us``."""
    if not 0 < share <= 1:
        raise ThrottleError(f"share must be within (0, 1], got {share}")
    return max(MIN_QUOTA_US, round(share * period_us))


def duty_cycle(share: float, period_us: int = PERIOD_US) -> tuple[float, float]:
    """(seconds running, seconds stopped) per period for the SIGSTOP fallback."""
    run = quota_us(share, period_us) / 1e6
    return run, max(0.0, period_us / 1e6 - run)


def cgroup_unavailable(root: Path = CGROUP_CPU) -> str | None:
    """Why a child cgroup cannot be used here (None: it can)."""
    if not (root / "cpu.cfs_quota_us").exists():
        return f"no cgroup v1 cpu controller at {root}"
    if not os.access(root, os.W_OK):
        return f"{root} is not writable (needs root)"
    return None


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (from ``/proc/PID/stat``)."""
    out: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            # the command name (2nd field) may hold spaces: split after its ")"
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(entry.name)] = int(fields[1])
    return out


def _descendants(pid: int) -> list[int]:
    """``pid`` and its children's pids, recursively (a pod's processes)."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found: list[int] = []
    todo = [pid]
    while todo and len(found) < 1000:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def remove_stale(prefix: str, root: Path = CGROUP_CPU) -> list[str]:
    """Remove the empty child groups named ``prefix...`` a killed run left behind
    (the kernel refuses to remove one that still holds a process); their names."""
    if not prefix or "/" in prefix:
        raise ThrottleError(f"a plain cgroup name prefix is expected, got {prefix!r}")
    removed = []
    with contextlib.suppress(OSError):
        for child in root.iterdir():
            if child.is_dir() and child.name.startswith(prefix) and \
                    str(child) not in _LIVE:
                with contextlib.suppress(OSError):
                    child.rmdir()
                    removed.append(child.name)
    return removed


_LIVE: dict[str, CpuThrottle] = {}


def _undo_all() -> None:
    for throttle in list(_LIVE.values()):
        throttle.undo()


atexit.register(_undo_all)


class CpuThrottle:
    """At most ``share`` of one core for ``pids`` (and their children) while entered."""

    def __init__(self, name: str, pids: Iterable[int], share: float,
                 root: Path = CGROUP_CPU, period_us: int = PERIOD_US,
                 force_sigstop: bool = False) -> None:
        if not name or "/" in name or name.startswith("."):
            raise ThrottleError(f"a plain cgroup name is expected, got {name!r}")
        self.share = share
        self.quota_us = quota_us(share, period_us)
        self.period_us = period_us
        self.pids = [p for pid in pids for p in _descendants(pid)]
        if not self.pids:
            raise ThrottleError("no process to throttle")
        self.root = root
        self.path = root / name
        reason = "forced" if force_sigstop else cgroup_unavailable(root)
        self.mode = "sigstop" if reason is not None else "cgroup"
        self.fallback_reason = reason
        self._cycle: asyncio.Task[None] | None = None

    async def __aenter__(self) -> CpuThrottle:
        _LIVE[str(self.path)] = self
        try:
            if self.mode == "cgroup":
                self._enter_cgroup()
            else:
                self._cycle = asyncio.create_task(self._duty_cycle())
        except BaseException:
            self.undo()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._cycle is not None:
            self._cycle.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cycle
            self._cycle = None
        self.undo()

    # -- cgroup v1 ------------------------------------------------------------------------

    def _enter_cgroup(self) -> None:
        self.path.mkdir(exist_ok=True)
        (self.path / "cpu.cfs_period_us").write_text(str(self.period_us))
        (self.path / "cpu.cfs_quota_us").write_text(str(self.quota_us))
        moved = 0
        for pid in self.pids:
            try:
                (self.path / "cgroup.procs").write_text(str(pid))
                moved += 1
            except ProcessLookupError:
                continue
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    raise
        if not moved:
            raise ThrottleError(f"none of the processes {self.pids} is running")

    def members(self) -> list[int]:
        """The pids in the child cgroup now (empty in the SIGSTOP mode or once undone)."""
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    # -- SIGSTOP / SIGCONT ------------------------------------------------------------------

    def _signal(self, sig: signal.Signals) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    async def _duty_cycle(self) -> None:
        run, stop = duty_cycle(self.share, self.period_us)
        try:
            while True:
                self._signal(signal.SIGSTOP)
                await asyncio.sleep(stop)
                self._signal(signal.SIGCONT)
                await asyncio.sleep(run)
        finally:
            self._signal(signal.SIGCONT)

    # -- undo -------------------------------------------------------------------------------

    def undo(self) -> None:
        """Back to normal: processes continued or moved back to the root group, the
        child group removed. Safe to call twice."""
        _LIVE.pop(str(self.path), None)
        if self.mode == "sigstop":
            self._signal(signal.SIGCONT)
            return
        if not self.path.exists():
            return
        for _ in range(_REMOVE_ATTEMPTS):
            for pid in self.members():
                with contextlib.suppress(OSError):
                    (self.root / "cgroup.procs").write_text(str(pid))
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as exc:  # EBUSY: a process moved in meanwhile
                if exc.errno != errno.EBUSY:
                    raise
