"""``meshxl status --watch`` as an operator runs it: on a terminal (a pseudo-terminal
here) the tables are redrawn in place as etcd changes, and piped each change is
printed again; Ctrl-C ends it with exit 0 and no traceback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import re
import signal
import sys
import time
from typing import Any

import aetcd
import pytest

from meshxl.etcd.keys import Keys
from meshxl.operator.actions import apply_model
from tests.harness.cli import REPO, meshxl
from tests.harness.clock import scaled

pytestmark = pytest.mark.integration

MODEL = """\
clusters:
- name: shop
  sites: [{name: dc1}]
  members:
  - {name: alpha, address: 127.0.0.1, port: 8080}
  - {name: beta, address: 127.0.0.1, port: 8081}
"""
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


UNBLOCKED = ("import os, signal, sys; signal.pthread_sigmask(signal.SIG_UNBLOCK, "
             "{signal.SIGINT}); signal.signal(signal.SIGINT, signal.SIG_DFL); "
             "os.execv(sys.argv[1], sys.argv[1:])")
"""Exec the rest of argv with SIGINT unblocked and at its default disposition."""


class Watch:
    """``meshxl status --watch`` in a child process, its output collected as it comes."""

    def __init__(self, *args: str, terminal: bool) -> None:
        self.args = args
        self.terminal = terminal
        self.output = b""
        self.stderr = b""
        self.proc: Any = None
        self._master = -1

    async def __aenter__(self) -> Watch:
        # PYTHONFAULTHANDLER: a watch that outlives Ctrl-C is aborted by interrupt() and
        # prints where each of its threads was.
        env = {**os.environ, "COLUMNS": "160", "LINES": "60", "TERM": "xterm",
               "PYTHONFAULTHANDLER": "1"}
        # Started as a shell starts a foreground job: SIGINT unblocked and at its
        # default. A child inherits its parent's signal mask across exec, and a test
        # worker's main thread at times has SIGINT blocked (a thread some library
        # started under it): Ctrl-C then never reached the watch (reproduced by
        # starting the test with SIGINT blocked).
        argv = [sys.executable, "-c", UNBLOCKED, sys.executable, "-m", "meshxl.cli",
                "status", "--watch", *self.args]
        if self.terminal:
            self._master, slave = pty.openpty()
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=slave, stdout=slave, stderr=asyncio.subprocess.PIPE, cwd=REPO,
                env=env)
            os.close(slave)
            os.set_blocking(self._master, False)
        else:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, cwd=REPO, env=env)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._master >= 0:
            os.close(self._master)

    async def _read(self) -> None:
        if self.terminal:
            with contextlib.suppress(BlockingIOError, OSError):
                while chunk := os.read(self._master, 65536):
                    self.output += chunk
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    self.output += await self.proc.stdout.read(65536)

    def text(self) -> str:
        return ANSI.sub("", self.output.decode("utf-8", "replace"))

    async def wait_for(self, text: str, timeout: float = 15.0, after: int = 0) -> int:
        """Until ``text`` is printed (after position ``after``); its position."""
        deadline = time.monotonic() + scaled(timeout)
        while (at := self.text().find(text, after)) < 0:
            if self.proc.returncode is not None or time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not printed (exit {self.proc.returncode}):\n"
                                     f"{self.text()[-3000:]}\n{self.stderr.decode()}")
            await self._read()
            await asyncio.sleep(0.05)
        return at

    async def interrupt(self, timeout: float = 10.0) -> int:
        """Ctrl-C; the exit code."""
        self.proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + scaled(timeout)
        while self.proc.returncode is None and time.monotonic() < deadline:
            await self._read()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await self.proc.wait()
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGABRT)  # faulthandler: every thread's stack
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(scaled(5.0)):
                    await self.proc.wait()
            stderr = await self.proc.stderr.read()
            raise AssertionError(f"still running {timeout:g} s after Ctrl-C; its threads:\n"
                                 f"{stderr.decode(errors='replace')[-6000:]}")
        await self._read()
        self.stderr = await self.proc.stderr.read()
        return int(self.proc.returncode)


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "piped"])
async def test_watch_refreshes_until_ctrl_c(terminal: bool, etcd: Any,
                                            etcd_client: aetcd.Client) -> None:
    await apply_model(etcd_client, Keys(), MODEL, "test")
    async with Watch("--interval", "0.2", "--etcd", etcd.url, terminal=terminal) as watch:
        first = await watch.wait_for("cluster shop")
        await watch.wait_for("alpha", after=first)
        assert "admin-down" not in watch.text()
        code, out, err = await meshxl("member", "down", "shop", "alpha", "--reason",
                                      "[bold]patch[/]", "--etcd", etcd.url)
        assert code == 0, err
        # The next refresh shows the change, and the reason as typed.
        changed = await watch.wait_for("admin-down", after=first)
        await watch.wait_for("[bold]patch[/]", after=changed)
        if terminal:
            # Redrawn in place: rich's Live moves the cursor back up over the last frame.
            assert re.search(rb"\x1b\[\d*A", watch.output), watch.output[-500:]
        else:
            # Piped: the view is printed again on each change, not on every refresh.
            assert watch.text().count("cluster shop") == 2, watch.text()
        assert "Ctrl-C to stop" in watch.text()
        code = await watch.interrupt()
    assert code == 0, (watch.stderr.decode(), watch.text()[-2000:])
    assert b"Traceback" not in watch.stderr and b"Traceback" not in watch.output


async def test_watch_fails_like_status_and_refuses_json(etcd: Any) -> None:
    code, out, err = await meshxl("status", "--watch", "--etcd", etcd.url)
    assert code == 1 and out == ""
    assert err.startswith("meshxl: no model stored under etcd prefix") and "\n" == err[-1]
    code, out, err = await meshxl("status", "--watch", "--output", "json", "--etcd", etcd.url)
    assert code == 2 and "--watch shows tables" in err
    code, out, err = await meshxl("status", "--watch", "--interval", "0", "--etcd", etcd.url)
    assert code == 2 and "--interval" in err
