"""The one owner of local child processes: the demo's, the benchmarks' and the tests'.

A :class:`Process` runs in its own process group with stdout+stderr appended to a log
file (its command line first). An :class:`Owner` holds a work directory and every
process started in it; ``aclose`` kills them all, whatever happened before, and keeps
their log tails for reports (pytest failure sections, a benchmark's error message).

Children never outlive their parent: on Linux each one runs with ``PR_SET_PDEATHSIG``
(SIGKILL when the process that started it dies, even by SIGKILL, when no cleanup code
can run; see :func:`die_with_parent`), and an ``atexit`` hook kills the process group
of anything still alive when the interpreter exits without closing its owner. The
death signal is tied to the *thread* that forked: start processes from the event-loop
thread, never from ``asyncio.to_thread``.
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
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from meshxl.local.wait import LocalError, WaitTimeout, wait_until

__all__ = [
    "LOG_TAIL_LINES",
    "Owned",
    "Owner",
    "Process",
    "die_with_parent",
    "remove_if_empty",
    "run",
    "tail",
]

#: Lines of each process log in a report (env MESHXL_TEST_LOG_LINES, for the tests).
LOG_TAIL_LINES = int(os.environ.get("MESHXL_TEST_LOG_LINES", "150"))

_live_pids: dict[int, str] = {}


def _remember_pid(pid: int, name: str) -> None:
    _live_pids[pid] = name


def _forget_pid(pid: int | None) -> None:
    if pid is not None:
        _live_pids.pop(pid, None)


@atexit.register
def _kill_leftovers() -> None:
    """The safety net when an owner was never closed (its process groups get SIGKILL)."""
    for pid in list(_live_pids):
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        _live_pids.pop(pid, None)


# Set in the child between fork and exec, PR_SET_PDEATHSIG would need a ``preexec_fn``,
# which makes Python fork() instead of posix_spawn: fork handlers of libraries with
# threads (gRPC's event engine) then run in the child and break it (aborts, "epoll_wait
# error: Bad file descriptor" on stderr). So a small program sets it and exec()s the
# command: util-linux's ``setpriv``, else this interpreter (Linux only either way).
# The signal is armed only once the wrapper runs, a few milliseconds after the spawn (tens
# for the interpreter): a parent killed in between would leave the command orphaned.
# So after arming it the wrapper checks that its parent is still the process that
# spawned it (else that one is gone already) and exits instead of running the command.
_SETPRIV = shutil.which("setpriv")
_SHIM = ("import ctypes, os, signal, sys; "
         "ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0); "
         "os.getppid() == int(sys.argv[1]) or os._exit(1); "
         "os.execvp(sys.argv[2], sys.argv[2:])")
_PARENT_CHECK = 'if [ "$PPID" != "$0" ]; then exit 1; fi; exec "$@"'


def die_with_parent(argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped so the command gets SIGKILL when the process that started it
    dies (``PR_SET_PDEATHSIG``, kept across exec), and never starts once that process
    is gone; unchanged where Linux is not."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    parent = str(os.getpid())
    if _SETPRIV:
        return [_SETPRIV, "--pdeathsig", "KILL", "--", "/bin/sh", "-c", _PARENT_CHECK,
                parent, *argv]
    return [sys.executable, "-c", _SHIM, parent, *argv]


def tail(text: str, lines: int) -> str:
    """The last ``lines`` lines of ``text``, saying how many were left out."""
    parts = text.splitlines()
    if len(parts) <= lines:
        return text
    return f"[... {len(parts) - lines} earlier lines ...]\n" + "\n".join(parts[-lines:])


class Process:
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

    def start(self) -> Process:
        """Spawn (again, after an exit: restarts reuse the same log, appended)."""
        if self.running:
            raise LocalError(f"{self.name} is already running (pid {self.pid})")
        if shutil.which(self.argv[0], path=(self.env or os.environ).get("PATH")) is None:
            # Said here: behind the death-signal wrapper it would only be an exit code.
            raise LocalError(f"cannot start {self.name}: {self.argv[0]} is not an "
                             "executable program")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(self.argv)}\n".encode())
            log.flush()
            try:
                self._popen = subprocess.Popen(
                    die_with_parent(self.argv),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.cwd,
                    env=self.env,
                    start_new_session=True,
                )
            except OSError as exc:
                raise LocalError(f"cannot start {self.name} ({self.argv[0]}): {exc}") from exc
        _remember_pid(self._popen.pid, self.name)
        return self

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the whole process group (it is ours alone)."""
        if self._popen is not None and self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._popen.pid, sig)

    async def wait_exit(self, timeout: float = 10.0) -> int:
        """Wait for the process to exit; its exit code."""
        popen = self._popen
        if popen is None:
            raise LocalError(f"{self.name} was never started")
        await wait_until(lambda: popen.poll() is not None, timeout=timeout,
                         what=f"{self.name} to exit", interval=0.01)
        _forget_pid(popen.pid)
        code = popen.poll()
        assert code is not None
        return code

    async def kill(self) -> None:
        """SIGKILL the process group and reap (a crash, as far as anyone can tell)."""
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
        except WaitTimeout:
            await self.kill()

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 40) -> str:
        return tail(self.logs(), lines)

    def __repr__(self) -> str:
        return f"Process({self.name}, pid={self.pid}, {'running' if self.running else 'stopped'})"


class Owned(Protocol):
    """What an owner needs from anything it cleans up and reports on."""

    name: str

    def logs(self) -> str: ...

    async def kill(self) -> object: ...


class Owner:
    """Every process of one run (a demo, a benchmark, a test) and its work directory.

    ``root``: the work directory, kept at close; None makes a temporary one, removed at
    close unless MESHXL_KEEP_TMP=1. In a kept root, what :meth:`scratch` names (etcd's
    data: its write-ahead log preallocates 64 MB) is removed at close all the same, so a
    kept directory holds logs and results, not tens of megabytes per run. ``aclose``
    ends everything owned and records the log tails (``log_sections``): with SIGKILL,
    or, given ``grace``, with SIGTERM and SIGKILL for what is still alive ``grace``
    seconds later (a demo's processes flush their traces and withdraw their
    registrations).
    """

    def __init__(self, root: Path | None = None, *, label: str = "run",
                 grace: float | None = None) -> None:
        if root is None:
            safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in label)[-60:]
            self.root = Path(tempfile.mkdtemp(prefix=f"meshxl-{safe}-"))
            self._remove_root = True
        else:
            root.mkdir(parents=True, exist_ok=True)
            self.root = root
            self._remove_root = False
        self.name = label if root is None else root.name
        self.grace = grace
        self._owned: list[Owned] = []
        self._names: set[str] = set()
        self._final_logs: list[tuple[str, str]] | None = None
        self._closers: list[Callable[[], object]] = []
        self._scratch: list[Path] = []
        self.closed = False

    @property
    def processes(self) -> list[Process]:
        """The :class:`Process` objects owned (in start order)."""
        return [p for p in self._owned if isinstance(p, Process)]

    def unique_name(self, base: str) -> str:
        """``base``, or ``base-2``, ``base-3``... so logs and dirs never collide."""
        name, n = base, 1
        while name in self._names:
            n += 1
            name = f"{base}-{n}"
        self._names.add(name)
        return name

    def path(self, name: str) -> Path:
        """A directory under the root (created)."""
        p = self.root / name
        p.mkdir(parents=True, exist_ok=True)
        return p

    def own(self, thing: Owned) -> None:
        """Kill ``thing`` at close and report its log. ``thing`` may be another owner
        (a deployment's): its processes then appear in this owner's report too."""
        if self.closed:
            raise LocalError("the owner is already closed")
        self._owned.append(thing)

    def process(self, name: str, argv: Sequence[str], *, cwd: Path | None = None,
                env: Mapping[str, str] | None = None) -> Process:
        """A new owned process logging to ``root/NAME.log`` (not started yet)."""
        proc = Process(name, argv, self.root / f"{name}.log", cwd=cwd, env=env)
        self.own(proc)
        return proc

    def spawn(self, name: str, argv: Sequence[str], *, cwd: Path | None = None,
              env: Mapping[str, str] | None = None) -> Process:
        """:meth:`process`, started."""
        return self.process(name, argv, cwd=cwd, env=env).start()

    def scratch(self, path: Path) -> Path:
        """``path``, removed at close once everything owned has ended (the class
        docstring); returned for convenience."""
        self._scratch.append(path)
        return path

    def on_close(self, closer: Callable[[], object]) -> None:
        """An async callable (``aiohttp.ClientSession.close``...) to await at close."""
        self._closers.append(closer)

    def log_sections(self, lines: int = LOG_TAIL_LINES) -> list[tuple[str, str]]:
        """(title, log tail) for everything owned (also after close)."""
        if self._final_logs is not None:
            return self._final_logs
        sections: list[tuple[str, str]] = []
        seen: set[object] = set()
        for thing in self._owned:
            if isinstance(thing, Owner):
                sections += thing.log_sections(lines)
                continue
            path = getattr(thing, "log_path", None)
            if path is not None and path in seen:
                continue  # restarted under the same log (a new object, same file)
            seen.add(path)
            title = f"log of {Path(path).stem} [{path}]" if path else f"log of {thing.name}"
            sections.append((title, tail(thing.logs(), lines)))
        return sections

    def logs(self) -> str:
        """All log tails as one text (``Owned``: an owner may own another)."""
        return self.report(LOG_TAIL_LINES)

    async def kill(self) -> None:
        await self.aclose()

    async def _end(self, thing: Owned) -> object:
        stop = getattr(thing, "stop", None)
        if self.grace is not None and stop is not None and not isinstance(thing, Owner):
            await stop(self.grace)
        return await thing.kill()

    def report(self, lines: int = 20) -> str:
        """The log tails as one text, for an error message."""
        return "\n".join(f"--- {title}:\n{text}" for title, text in self.log_sections(lines))

    async def aclose(self, *, keep_dir: bool = False) -> None:
        """Run closers, kill everything owned, remove a temporary root."""
        if self.closed:
            return
        self.closed = True
        for closer in reversed(self._closers):
            with contextlib.suppress(Exception):
                result = closer()
                if asyncio.iscoroutine(result):
                    async with asyncio.timeout(5.0):
                        await result
        results = await asyncio.gather(
            *(self._end(thing) for thing in self._owned), return_exceptions=True
        )
        self._final_logs = self.log_sections()
        if not keep_dir and os.environ.get("MESHXL_KEEP_TMP") != "1":
            for path in [self.root] if self._remove_root else self._scratch:
                await asyncio.to_thread(shutil.rmtree, path, True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise LocalError(f"could not kill all processes: {errors!r}")


def remove_if_empty(path: Path) -> None:
    """Remove the directory ``path`` when no file is in it at any depth: a run that
    stopped before writing anything leaves no empty directory behind."""
    with contextlib.suppress(OSError):
        if not any(p.is_file() or p.is_symlink() for p in path.rglob("*")):
            shutil.rmtree(path)


async def run(argv: Sequence[str], *, timeout: float = 30.0, cwd: Path | None = None,
              env: Mapping[str, str] | None = None,
              stdin: bytes | None = None) -> tuple[int, str, str]:
    """Run a short command to completion: ``(exit code, stdout, stderr)``.

    Killed (its process group) on timeout or cancellation, and dies with its parent.
    """
    piped = asyncio.subprocess.PIPE
    proc = await asyncio.create_subprocess_exec(
        *die_with_parent(argv), stdin=piped if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=cwd,
        env=dict(env) if env is not None else None, start_new_session=True)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(stdin)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def run_sync(argv: Sequence[str], *, timeout: float = 20.0) -> tuple[int, str, str]:
    """:func:`run` for code that cannot await (an ``atexit`` hook, a worker thread):
    ``(exit code, stdout, stderr)``; killed on timeout."""
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          check=False)
    return done.returncode, done.stdout, done.stderr
