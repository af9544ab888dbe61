"""The meshxl xDS control plane for integration tests: in-process, or as a process.

In-process (:func:`start_control_plane`) gives direct access to the cache, the ADS
server and node status; the process form (:class:`ControlPlaneProcess`, the real
``meshxl serve xds`` command) can be killed with SIGKILL and restarted on its ports.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp

from meshxl.local import commands
from meshxl.local.ports import free_ports
from meshxl.local.procs import Owner, Process
from meshxl.local.wait import wait_until
from meshxl.xds.app import ControlPlane
from meshxl.xds.config import ControlPlaneConfig

__all__ = ["ControlPlaneProcess", "InProcessControlPlane", "start_control_plane"]

HOST = "127.0.0.1"


class InProcessControlPlane:
    """Adapter so the harness can stop an in-process plane and show its log."""

    def __init__(self, plane: ControlPlane, log_path: Path):
        self.plane = plane
        self.name = f"control-plane-{plane.config.replica}"
        self.log_path = log_path
        self._handler = logging.FileHandler(log_path)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: "
                                                     "%(message)s"))
        logging.getLogger("meshxl").addHandler(self._handler)
        logging.getLogger("meshxl").setLevel(logging.DEBUG)

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    async def kill(self) -> None:
        try:
            await self.plane.stop()
        finally:
            logging.getLogger("meshxl").removeHandler(self._handler)
            self._handler.close()


async def start_control_plane(harness: Owner, *, config_path: Path | str | None = None,
                              etcd: str | None = None, host: str = HOST,
                              **options: Any) -> ControlPlane:
    """Start a control plane in this process on a free port (``plane.port``) of ``host``
    (an address of a test network's driver, for Envoys in network namespaces)."""
    (port,) = free_ports(1, host)
    config = ControlPlaneConfig(listen=f"{host}:{port}",
                                config_path=Path(config_path) if config_path else None,
                                etcd=etcd, **options)
    plane = ControlPlane(config)
    owner = InProcessControlPlane(plane, harness.root / f"control-plane-{config.replica}.log")
    harness.own(owner)
    await plane.start()
    return plane


class ControlPlaneProcess:
    """``meshxl serve xds`` as a child process with an HTTP status endpoint."""

    def __init__(self, harness: Owner, *, name: str = "xds", config_path: Path | None = None,
                 etcd: str | None = None, extra_args: tuple[str, ...] = ()):
        self.port, self.admin_port = free_ports(2)
        argv = commands.xds(listen=f"{HOST}:{self.port}", admin=f"{HOST}:{self.admin_port}",
                            replica=name, log_level="debug", config=config_path, etcd=etcd,
                            extra=extra_args)
        self.name = name
        self.process = Process(name, argv, harness.root / f"{name}.log")
        self.log_path = self.process.log_path
        harness.own(self)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    async def start(self, timeout: float = 30.0) -> ControlPlaneProcess:
        """Start (or restart on the same ports) and wait until it serves a snapshot."""
        self.process.start()

        async def ready() -> bool:
            return (await self.get("/readyz"))[0] == 200

        await wait_until(ready, timeout=timeout, what=f"{self.name} ready",
                         process=self.process)
        return self

    async def get(self, path: str) -> tuple[int, Any]:
        url = f"http://{HOST}:{self.admin_port}{path}"
        async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http,
                    http.get(url) as resp):
            return resp.status, await resp.json(content_type=None)

    async def status(self) -> dict[str, Any]:
        code, body = await self.get("/v1/status")
        assert code == 200, body
        return dict(body)

    async def kill(self) -> None:
        await self.process.kill()

    async def stop(self) -> None:
        await self.process.stop()

    def logs(self) -> str:
        return self.process.logs()
