"""Processes started by tests: log capture, per-test ownership, guaranteed cleanup.

Every process a test starts is registered with that test's ``Harness``. At teardown the
harness kills them all (also when the test errored) and removes its temporary
directory; when the test failed, their log tails are attached to the failure report
(see ``tests/conftest.py``). An ``atexit`` hook kills anything still alive if the
interpreter exits without teardown, and on Linux children also get SIGKILL when pytest
itself dies (``setpriv --pdeathsig``).
"""

# ruff: noqa: ASYNC109  (timeouts here produce errors naming the process and its log)

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

__all__ = [
    "Harness",
    "HarnessError",
    "ManagedProcess",
    "Owned",
    "forget_pid",
    "remember_pid",
]

#: Lines of each process log attached to a failure report (env MESHXL_TEST_LOG_LINES).
LOG_TAIL_LINES = int(os.environ.get("MESHXL_TEST_LOG_LINES", "150"))

_live_pids: dict[int, str] = {}


def remember_pid(pid: int, name: str) -> None:
    """Let the atexit safety net kill this process group if teardown never runs."""
    _live_pids[pid] = name


def forget_pid(pid: int | None) -> None:
    if pid is not None:
        _live_pids.pop(pid, None)


@atexit.register
def _kill_leftovers() -> None:
    for pid in list(_live_pids):
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        _live_pids.pop(pid, None)


class HarnessError(RuntimeError):
    """A test process could not be started or did not become ready."""


class Owned(Protocol):
    """What the harness needs from anything it cleans up and reports on."""

    name: str

    def logs(self) -> str: ...

    async def kill(self) -> None: ...


def _tail(text: str, lines: int) -> str:
    parts = text.splitlines()
    if len(parts) <= lines:
        return text
    return f"[... {len(parts) - lines} earlier lines ...]\n" + "\n".join(parts[-lines:])


_SETPRIV = shutil.which("setpriv")


class ManagedProcess:
    """A child process with stdout+stderr in a log file, in its own process group."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll() if self._popen else None

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def start(self) -> None:
        """Spawn (again, after an exit: restarts reuse the same log, appended)."""
        if self.running:
            raise HarnessError(f"{self.name} is already running (pid {self.pid})")
        argv = self.argv
        if _SETPRIV:
            # The child dies with pytest even on SIGKILL, when atexit cannot run.
            argv = [_SETPRIV, "--pdeathsig", "KILL", "--", *argv]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(self.argv)}\n".encode())
            log.flush()
            try:
                self._popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.cwd,
                    env=self.env,
                    start_new_session=True,
                )
            except OSError as exc:
                raise HarnessError(f"cannot start {self.name} ({self.argv[0]}): {exc}") from exc
        remember_pid(self._popen.pid, self.name)

    def signal(self, sig: signal.Signals) -> None:
        if self._popen is not None and self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._popen.pid, sig)

    async def wait_exit(self, timeout: float = 10.0) -> int:
        """Wait for the process to exit (polling: Popen has no asyncio wait)."""
        if self._popen is None:
            raise HarnessError(f"{self.name} was never started")
        deadline = time.monotonic() + timeout
        while (code := self._popen.poll()) is None:
            if time.monotonic() >= deadline:
                raise HarnessError(f"{self.name} did not exit within {timeout:g}s")
            await asyncio.sleep(0.01)
        forget_pid(self._popen.pid)
        return code

    async def kill(self) -> None:
        """SIGKILL and reap."""
        if self._popen is None:
            return
        self.signal(signal.SIGKILL)
        await self.wait_exit(10.0)

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM; SIGKILL if it is still alive after ``timeout`` seconds."""
        if self._popen is None:
            return
        self.signal(signal.SIGTERM)
        try:
            await self.wait_exit(timeout)
        except HarnessError:
            await self.kill()

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 40) -> str:
        return _tail(self.logs(), lines)

    def check_alive(self, what: str) -> None:
        """Raise with the log tail if the process has exited (e.g. while waiting for it)."""
        code = self.returncode
        if self._popen is not None and code is not None:
            raise HarnessError(
                f"{self.name} exited with code {code} while waiting for {what}; "
                f"log tail:\n{self.tail()}"
            )


class Harness:
    """One test's processes and temporary directory.

    ``root`` is removed at teardown unless MESHXL_KEEP_TMP=1; logs of a failed test are
    attached to its report first.
    """

    def __init__(self, label: str = "test") -> None:
        safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in label)[-60:]
        self.root = Path(tempfile.mkdtemp(prefix=f"meshxl-{safe}-"))
        self._owned: list[Owned] = []
        self._names: set[str] = set()
        self._final_logs: list[tuple[str, str]] | None = None
        self._closers: list[object] = []
        self.closed = False

    def unique_name(self, base: str) -> str:
        """``base``, or ``base-2``, ``base-3``... so logs and dirs never collide."""
        name, n = base, 1
        while name in self._names:
            n += 1
            name = f"{base}-{n}"
        self._names.add(name)
        return name

    def path(self, name: str) -> Path:
        """A fresh directory under the harness root."""
        p = self.root / name
        p.mkdir(parents=True, exist_ok=True)
        return p

    def own(self, thing: Owned) -> None:
        """Kill ``thing`` at teardown and show its log if the test fails."""
        if self.closed:
            raise HarnessError("the harness is already closed")
        self._owned.append(thing)

    def on_close(self, closer: object) -> None:
        """An async callable (``aiohttp.ClientSession.close``...) to await at teardown."""
        self._closers.append(closer)

    def log_sections(self, lines: int = LOG_TAIL_LINES) -> list[tuple[str, str]]:
        """(title, log tail) for every owned process, for pytest report sections."""
        if self._final_logs is not None:
            return self._final_logs
        sections = []
        for thing in self._owned:
            path = getattr(thing, "log_path", None)
            title = f"log of {Path(path).stem} [{path}]" if path else f"log of {thing.name}"
            sections.append((title, _tail(thing.logs(), lines)))
        return sections

    async def aclose(self, *, keep_dir: bool = False) -> None:
        """Kill every owned process, run closers, remove the temporary directory."""
        if self.closed:
            return
        self.closed = True
        for closer in reversed(self._closers):
            with contextlib.suppress(Exception):
                result = closer()  # type: ignore[operator]
                if asyncio.iscoroutine(result):
                    await asyncio.wait_for(result, 5.0)
        results = await asyncio.gather(
            *(thing.kill() for thing in self._owned), return_exceptions=True
        )
        self._final_logs = self.log_sections()
        if not keep_dir and os.environ.get("MESHXL_KEEP_TMP") != "1":
            await asyncio.to_thread(shutil.rmtree, self.root, True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise HarnessError(f"could not kill all test processes: {errors!r}")
