"""Local processes for the demo and benchmarks: etcd and sample backends on loopback.

Each process logs to a file in a work directory and is killed when the owning
:class:`LocalStack` closes, whatever happened before.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp

from meshxl.binaries import find_etcd
from meshxl.errors import ProcessError

HOST = "127.0.0.1"


class LocalError(ProcessError):
    """A local process could not be started or did not become ready."""


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_ports(count: int, host: str = HOST) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port(host))
    return sorted(ports)


class LocalProcess:
    """A child process in its own process group, logging to a file."""

    def __init__(self, name: str, argv: list[str], log_path: Path):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> LocalProcess:
        log = open(self.log_path, "ab")  # noqa: ASYNC230 - local log file, handed to the child
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdout=log, stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def kill(self) -> None:
        """SIGKILL the whole process group (a crash, as far as anyone can tell)."""
        if self.running:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()

    async def stop(self, grace: float = 3.0) -> None:
        if not self.running:
            return
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), grace)
        except TimeoutError:
            await self.kill()


async def wait_http(url: str, process: LocalProcess, timeout: float = 15.0,
                    expect: int = 200) -> None:
    """Poll ``url`` until it answers ``expect``; fail fast if the process died."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as http:
        while True:
            if not process.running:
                raise LocalError(f"{process.name} exited early; log:\n{process.tail()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(url) as resp:
                    if resp.status == expect:
                        return
            if time.monotonic() > deadline:
                raise LocalError(f"{process.name} not ready at {url} after {timeout:g}s; "
                                 f"log:\n{process.tail()}")
            await asyncio.sleep(0.05)


class LocalStack:
    """Owns every local process of a demo or benchmark run; ``close`` kills them all."""

    def __init__(self, work_dir: Path):
        self.work_dir = work_dir
        work_dir.mkdir(parents=True, exist_ok=True)
        self.processes: list[LocalProcess] = []

    async def spawn(self, name: str, argv: list[str]) -> LocalProcess:
        proc = LocalProcess(name, argv, self.work_dir / f"{name}.log")
        self.processes.append(proc)
        return await proc.start()

    async def etcd(self, name: str = "etcd") -> str:
        """A single-member etcd in the work directory; returns its client URL."""
        client, peer = free_ports(2)
        url, peer_url = f"http://{HOST}:{client}", f"http://{HOST}:{peer}"
        proc = await self.spawn(name, [
            find_etcd(), "--name", name, "--data-dir", str(self.work_dir / f"{name}.data"),
            "--listen-client-urls", url, "--advertise-client-urls", url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"{name}={peer_url}",
            "--heartbeat-interval", "50", "--election-timeout", "500",
            # etcd 3.4 runs without pre-vote: a member rejoining after a partition
            # would force an election (3.5 has it on).
            "--pre-vote",
        ])
        await wait_http(f"{url}/health", proc)
        return url

    async def echo(self, name: str, port: int) -> LocalProcess:
        """A sample backend (``meshxl.demo.echo``) answering with its member name."""
        proc = await self.spawn(name, [sys.executable, "-m", "meshxl.demo.echo",
                                       "--name", name, "--listen", f"{HOST}:{port}"])
        await wait_http(f"http://{HOST}:{port}/healthz", proc)
        return proc

    async def close(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.processes), return_exceptions=True)
