"""Backend members for tests: ``meshxl.demo.echo`` as real subprocesses.

Real processes (not in-process servers) so a test can SIGKILL one the way a member
crashes, and fail its health check over HTTP without killing it.
"""

# Waits take a `timeout` (ASYNC109) so errors name the member and carry its log.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from meshxl.local import commands
from meshxl.local.ports import free_ports
from meshxl.local.procs import Owner, Process
from meshxl.local.wait import LocalError, wait_until

__all__ = ["Backend", "StartBackends", "start_backends"]


class Backend:
    """One echo member on ``host:port``."""

    def __init__(self, harness: Owner, name: str, port: int, host: str = "127.0.0.1") -> None:
        self.name = name
        self.host = host
        self.port = port
        self.process = Process(f"backend-{name}", commands.echo(name, f"{host}:{port}"),
                               harness.root / f"backend-{name}.log")
        harness.own(self)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def endpoint(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def running(self) -> bool:
        return self.process.running

    async def start(self, timeout: float = 30.0) -> Backend:
        """Spawn (or respawn after a kill, same port) and wait until the port accepts."""
        self.process.start()
        await self.wait_listening(timeout)
        return self

    async def wait_listening(self, timeout: float = 30.0) -> None:
        async def accepts() -> bool:
            async with asyncio.timeout(1.0):
                _, writer = await asyncio.open_connection(self.host, self.port)
            writer.close()
            await writer.wait_closed()
            return True

        await wait_until(accepts, timeout=timeout, interval=0.02, process=self.process,
                         what=f"backend {self.name} to accept connections on "
                              f"{self.host}:{self.port}")

    async def kill9(self) -> None:
        """SIGKILL: the member vanishes mid-flight (connections reset, no goodbye)."""
        await self.process.kill()

    async def kill(self) -> None:
        await self.process.kill()

    async def stop(self) -> None:
        """SIGTERM: graceful exit."""
        await self.process.stop()

    async def set_health(self, ok: bool) -> None:
        """Make ``/healthz`` answer 200 (ok) or 503, so Envoy's health checks eject it."""
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0)) as http,
            http.post(f"{self.url}/admin/health", data="ok" if ok else "fail") as resp,
        ):
            if resp.status != 200:
                raise LocalError(f"backend {self.name}: set_health -> HTTP {resp.status}")

    def logs(self) -> str:
        return self.process.logs()

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def __repr__(self) -> str:
        return f"Backend({self.name}, {self.url}, {'up' if self.running else 'down'})"


async def start_backends(
    harness: Owner,
    members: int | Sequence[str],
    *,
    prefix: str = "m",
    host: str = "127.0.0.1",
    timeout: float = 30.0,
) -> list[Backend]:
    """Start echo members: ``3`` -> m0, m1, m2; or a list of names. All start in parallel."""
    names = [f"{prefix}{i}" for i in range(members)] if isinstance(members, int) else list(members)
    if not names:
        return []
    ports = free_ports(len(names), host)
    backends = [
        Backend(harness, harness.unique_name(name), port, host)
        for name, port in zip(names, ports, strict=True)
    ]
    for backend in backends:
        backend.process.start()
    await asyncio.gather(*(b.wait_listening(timeout) for b in backends))
    return backends


class StartBackends(Protocol):
    """Type of the ``start_backends`` fixture: ``start_backends`` without the harness."""

    def __call__(
        self, members: int | Sequence[str], **options: Any
    ) -> Awaitable[list[Backend]]: ...
