"""Backend members for tests: ``meshxl.demo.echo`` as real subprocesses.

Real processes (not in-process servers) so a test can SIGKILL one the way a member
crashes, and fail its health check over HTTP without killing it.
"""

# Waits take a `timeout` (ASYNC109) so errors name the member and carry its log.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from tests.harness.ports import free_ports
from tests.harness.procs import Harness, HarnessError, ManagedProcess

__all__ = ["Backend", "StartBackends", "start_backends"]


class Backend:
    """One echo member on ``host:port``."""

    def __init__(self, harness: Harness, name: str, port: int, host: str = "127.0.0.1") -> None:
        self.name = name
        self.host = host
        self.port = port
        self.process = ManagedProcess(
            f"backend-{name}",
            [sys.executable, "-u", "-m", "meshxl.demo.echo", "--name", name,
             "--listen", f"{host}:{port}"],
            harness.root / f"backend-{name}.log",
        )  # fmt: skip
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

    async def start(self, timeout: float = 15.0) -> Backend:
        """Spawn (or respawn after a kill, same port) and wait until the port accepts."""
        self.process.start()
        await self.wait_listening(timeout)
        return self

    async def wait_listening(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            self.process.check_alive(f"{self.host}:{self.port} to accept connections")
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), 1.0
                )
                writer.close()
                await writer.wait_closed()
                return
            except (OSError, TimeoutError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise HarnessError(
                    f"backend {self.name} not listening on {self.host}:{self.port} after "
                    f"{timeout:g}s ({last}); log tail:\n{self.process.tail()}"
                )
            await asyncio.sleep(0.02)

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
                raise HarnessError(f"backend {self.name}: set_health -> HTTP {resp.status}")

    def logs(self) -> str:
        return self.process.logs()

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def __repr__(self) -> str:
        return f"Backend({self.name}, {self.url}, {'up' if self.running else 'down'})"


async def start_backends(
    harness: Harness,
    members: int | Sequence[str],
    *,
    prefix: str = "m",
    host: str = "127.0.0.1",
    timeout: float = 15.0,
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
