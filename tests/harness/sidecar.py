"""The statesync sidecar (``meshxl serve statesync``) as a killable, pausable process.

Modelled on :class:`tests.harness.controlplane.ControlPlaneProcess`: a free loopback
port kept across restarts, the log in the harness directory (shown when a test fails),
and small async HTTP helpers that return ``(status, headers, body)`` through one
aiohttp session per sidecar, closed by the harness at teardown.
"""

# Waits take a `timeout` (ASYNC109) so errors name the sidecar and carry its log.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import aiohttp
from multidict import CIMultiDictProxy

from meshxl.local import commands
from meshxl.local.ports import free_port
from meshxl.local.procs import Owner, Process
from meshxl.local.wait import wait_until
from tests.harness.clock import scaled

__all__ = ["Reply", "SidecarProcess"]

HOST = "127.0.0.1"


class Reply(NamedTuple):
    """One HTTP answer of the sidecar: unpacks as ``status, headers, body``."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def etag(self) -> str | None:
        return self.headers.get("ETag")

    @property
    def source(self) -> str | None:
        return self.headers.get("X-Meshxl-Source")

    @property
    def owner(self) -> str | None:
        return self.headers.get("X-Meshxl-Owner")


class SidecarProcess:
    """``meshxl serve statesync`` for one member, on a fixed free port."""

    def __init__(self, harness: Owner, *, cluster: str, member: str, etcd: str,
                 app_port: int, app_host: str = HOST, site: str | None = None,
                 log_level: str = "debug", unix_socket: str | None = None,
                 host: str = HOST, wrap: Callable[[list[str]], list[str]] | None = None,
                 token: str | None = None, **cli_options: Any) -> None:
        """``host``: the address its API listens on (a network namespace's, with ``wrap``
        running it inside that namespace; off loopback, the API wants a ``token``, which
        every request of these helpers then carries)."""
        self.cluster = cluster
        self.member = member
        self.host = host
        self.port = free_port()
        self.unix_socket = unix_socket
        """The API's Unix socket too (``--listen unix:PATH``); requests still use TCP."""
        self.token = token
        if token is not None:
            token_file = harness.path("tokens") / f"{member}-{self.port}"
            token_file.write_text(token + "\n")
            token_file.chmod(0o600)
            cli_options["token_file"] = token_file
        listen = [f"{host}:{self.port}"] + ([f"unix:{unix_socket}"] if unix_socket else [])
        argv = commands.statesync(cluster=cluster, member=member, app=f"{app_host}:{app_port}",
                                  listen=listen, etcd=etcd, log_level=log_level,
                                  site=site, **cli_options)
        if wrap is not None:
            argv = wrap(argv)
        self.name = harness.unique_name(f"sidecar-{cluster}-{member}")
        self.process = Process(self.name, argv, harness.root / f"{self.name}.log")
        self.log_path = self.process.log_path
        self._http: aiohttp.ClientSession | None = None
        self._harness = harness
        harness.own(self)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process.running

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, *, wait_ready: bool = True, timeout: float = 30.0) -> SidecarProcess:
        """Start (or restart on the same port); by default wait until /readyz is 200."""
        self.process.start()
        if wait_ready:
            await self.wait_ready(timeout)
        return self

    async def wait_ready(self, timeout: float = 30.0) -> None:
        async def ready() -> bool:
            return (await self.request("GET", "/readyz")).status == 200

        await wait_until(ready, timeout=timeout, what=f"{self.name} ready",
                         process=self.process)

    async def wait_listening(self, timeout: float = 30.0) -> None:
        """Until the API answers at all (ready or not)."""
        async def answers() -> bool:
            return (await self.request("GET", "/healthz")).status == 200

        await wait_until(answers, timeout=timeout, what=f"{self.name} listening",
                         interval=0.005, process=self.process)

    async def restart(self, *, wait_ready: bool = True, timeout: float = 30.0) -> SidecarProcess:
        """Kill (if alive) and start again: same port, same member, same log."""
        await self.process.kill()
        return await self.start(wait_ready=wait_ready, timeout=timeout)

    async def kill9(self) -> None:
        """SIGKILL: no lease revoke, no goodbye (what a crash looks like)."""
        await self.process.kill()

    async def kill(self) -> None:
        await self.process.kill()

    async def stop(self) -> None:
        await self.process.stop()

    def pause(self) -> None:
        """SIGSTOP: the process is frozen (keeps its sockets, answers nothing)."""
        self.process.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.signal(signal.SIGCONT)

    def logs(self) -> str:
        return self.process.logs()

    # -- HTTP --------------------------------------------------------------------------

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
            self._harness.on_close(self._http.close)
        return self._http

    async def request(self, method: str, path: str, *, data: Any = None,
                      headers: Mapping[str, str] | None = None) -> Reply:
        sent = dict(headers or {})
        if self.token is not None:
            sent.setdefault("Authorization", f"Bearer {self.token}")
        async with self._session().request(method, self.url + path, data=data,
                                           headers=sent) as resp:
            return Reply(resp.status, resp.headers, await resp.read())

    @staticmethod
    def _encode(state: Any, content_type: str | None) -> tuple[Any, str]:
        if isinstance(state, bytes | str):
            return state, content_type or "application/octet-stream"
        return json.dumps(state).encode(), content_type or "application/json"

    async def put(self, session: str, state: Any, *, content_type: str | None = None,
                  if_match: str | None = None, headers: Mapping[str, str] | None = None
                  ) -> Reply:
        """PUT a session: dicts/lists as JSON, bytes/str verbatim (octet-stream)."""
        data, ctype = self._encode(state, content_type)
        hdrs = {"Content-Type": ctype, **(headers or {})}
        if if_match is not None:
            hdrs["If-Match"] = if_match
        return await self.request("PUT", f"/v1/sessions/{session}", data=data, headers=hdrs)

    async def get(self, session: str) -> Reply:
        return await self.request("GET", f"/v1/sessions/{session}")

    async def patch(self, session: str, patch: Any, *,
                    content_type: str = "application/merge-patch+json",
                    if_match: str | None = None) -> Reply:
        data = patch if isinstance(patch, bytes | str) else json.dumps(patch).encode()
        hdrs = {"Content-Type": content_type}
        if if_match is not None:
            hdrs["If-Match"] = if_match
        return await self.request("PATCH", f"/v1/sessions/{session}", data=data, headers=hdrs)

    async def delete(self, session: str, *, if_match: str | None = None) -> Reply:
        hdrs = {"If-Match": if_match} if if_match is not None else {}
        return await self.request("DELETE", f"/v1/sessions/{session}", headers=hdrs)

    async def post_json(self, path: str, body: Any) -> Reply:
        return await self.request("POST", path, data=json.dumps(body).encode(),
                                  headers={"Content-Type": "application/json"})

    async def bulk_get(self, sessions: list[str]) -> Reply:
        return await self.post_json("/v1/sessions:bulkGet", {"sessions": sessions})

    async def bulk_save(self, items: list[dict[str, Any]]) -> Reply:
        return await self.post_json("/v1/sessions:bulkSave", {"items": items})

    async def transaction(self, operations: list[dict[str, Any]]) -> Reply:
        return await self.post_json("/v1/sessions:transaction", {"operations": operations})

    async def status(self, starting_for: float = 10.0) -> dict[str, Any]:
        """``/v1/status``; asked again while the sidecar's start is still under way (503,
        "the sidecar is starting": it registers before its start is done, so a test that
        waited for its registration can ask in between), for up to ``starting_for`` s."""
        deadline = time.monotonic() + scaled(starting_for)
        while True:
            reply = await self.request("GET", "/v1/status")
            if reply.status != 503 or b"the sidecar is starting" not in reply.body \
                    or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        assert reply.status == 200, reply
        return dict(reply.json())

    async def readyz(self) -> Reply:
        return await self.request("GET", "/readyz")

    async def set_problem(self, name: str, detail: str = "") -> Reply:
        return await self.request("PUT", f"/v1/problems/{name}",
                                  data=json.dumps({"detail": detail}).encode(),
                                  headers={"Content-Type": "application/json"})

    async def clear_problem(self, name: str) -> Reply:
        return await self.request("DELETE", f"/v1/problems/{name}")

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"SidecarProcess({self.name}, {self.url}, {state})"
