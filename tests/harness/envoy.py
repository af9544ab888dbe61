"""Real Envoy processes for integration tests, and typed views of their admin API.

``start_envoy`` builds a bootstrap with ``meshxl.proxy.bootstrap.build_bootstrap``,
runs it with ``meshxl.local.envoy.EnvoyProcess`` and returns once the admin endpoint
answers. Envoy then waits (state PRE_INITIALIZING, ``/ready`` 503) until the control
plane answers CDS and LDS, retrying the ADS stream every <= 1 s, so a test may start
Envoy before or after the control plane and then ``await envoy.wait_ready()``.
"""

# Waits take a `timeout` (ASYNC109) so errors name what was awaited and carry the log.
# ruff: noqa: ASYNC109

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, overload

from meshxl.local.envoy import EnvoyProcess
from meshxl.local.ports import free_port
from meshxl.local.procs import Owner
from meshxl.local.wait import wait_until
from meshxl.proxy.admin import EnvoyAdmin, Host
from meshxl.proxy.bootstrap import build_bootstrap

__all__ = ["EnvoyFixture", "Host", "StartEnvoy", "XdsAddress", "start_envoy"]

T = TypeVar("T")

#: A control-plane address: a loopback port, "HOST:PORT", or (host, port).
XdsAddress = int | str | tuple[str, int]


class EnvoyFixture:
    """A running test Envoy plus helpers over its admin API."""

    def __init__(
        self,
        harness: Owner,
        process: EnvoyProcess,
        *,
        node_id: str,
        bootstrap: dict[str, Any],
    ) -> None:
        self.harness = harness
        self.process = process
        self.node_id = node_id
        self.bootstrap = bootstrap
        self.name = process.name
        self._admin: EnvoyAdmin | None = None

    # -- harness protocol --------------------------------------------------------

    def logs(self) -> str:
        return self.process.logs()

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    async def kill(self) -> None:
        """SIGKILL (teardown, or a proxy crash in a test)."""
        await self.process.kill()

    async def stop(self) -> None:
        """SIGTERM, SIGKILL after 5 s."""
        await self.process.stop()

    # -- admin API ---------------------------------------------------------------

    @property
    def admin_url(self) -> str:
        return self.process.admin_url

    @property
    def admin(self) -> EnvoyAdmin:
        """The typed admin client (``meshxl.proxy.admin``), closed with the harness."""
        if self._admin is None:
            self._admin = EnvoyAdmin(self.admin_url)
            self.harness.on_close(self._admin.close)
        return self._admin

    async def get(self, path: str, **params: str) -> tuple[int, str]:
        """GET an admin path; returns (status, body)."""
        return await self.admin.get(path, **params)

    async def post(self, path: str, **params: str) -> tuple[int, str]:
        """POST an admin path; returns (status, body)."""
        return await self.admin.post(path, **params)

    async def get_json(self, path: str, **params: str) -> Any:
        status, body = await self.get(path, **params)
        if status != 200:
            raise AssertionError(f"{self.name}: GET {path} {params} -> HTTP {status}: {body}")
        return json.loads(body)

    async def wait_admin(self, timeout: float = 30.0) -> None:
        await self.process.wait_admin(timeout)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait for LIVE: the control plane has answered CDS and LDS."""
        await self.process.wait_ready(timeout)

    async def ready(self) -> bool:
        return await self.admin.ready()

    async def server_info(self) -> dict[str, Any]:
        data: dict[str, Any] = await self.get_json("/server_info")
        return data

    async def server_state(self) -> str:
        """PRE_INITIALIZING, INITIALIZING, LIVE or DRAINING."""
        return (await self.admin.server_info()).state

    async def config_dump(
        self,
        resource: str | None = None,
        *,
        include_eds: bool = False,
        mask: str | None = None,
        name_regex: str | None = None,
    ) -> dict[str, Any]:
        """``/config_dump``; ``resource`` e.g. ``dynamic_active_clusters``."""
        return await self.admin.config_dump(
            resource, include_eds=include_eds, mask=mask, name_regex=name_regex
        )

    async def dynamic_clusters(self) -> dict[str, dict[str, Any]]:
        """Active clusters received over xDS: name -> Cluster (JSON), plus ``version_info``."""
        return await self.admin.dynamic_clusters()

    async def clusters(self) -> dict[str, list[Host]]:
        """``/clusters?format=json``: cluster name -> hosts with priority/weight/health."""
        return await self.admin.clusters()

    async def hosts(self, cluster: str) -> list[Host]:
        """Hosts of one cluster; [] if Envoy does not know the cluster (yet)."""
        return await self.admin.hosts(cluster)

    async def listeners(self) -> dict[str, tuple[str, int]]:
        """``/listeners?format=json``: listener name -> bound (address, port)."""
        return await self.admin.listeners()

    async def stats(self, filter: str | None = None) -> dict[str, int]:
        """Counters and gauges from ``/stats?format=json`` (``filter`` is a regex)."""
        return await self.admin.stats(filter)

    async def stat(self, name: str) -> int:
        """One counter or gauge; 0 when Envoy has not created it yet."""
        return await self.admin.stat(name) or 0

    @overload
    async def wait_until(
        self, predicate: Callable[[], Awaitable[T]], *, timeout: float = ..., what: str = ...
    ) -> T: ...

    @overload
    async def wait_until(
        self, predicate: Callable[[], T], *, timeout: float = ..., what: str = ...
    ) -> T: ...

    async def wait_until(
        self,
        predicate: Callable[[], Any],
        *,
        timeout: float = 15.0,
        what: str = "condition",
    ) -> Any:
        """``meshxl.local.wait.wait_until``, with this Envoy's name in the message."""
        return await wait_until(predicate, timeout=timeout, what=f"{what} on {self.name}")

    async def wait_hosts(
        self,
        cluster: str,
        predicate: Callable[[list[Host]], bool] = bool,
        timeout: float = 15.0,
        what: str | None = None,
    ) -> list[Host]:
        """Wait until cluster ``cluster`` exists and ``predicate(hosts)`` holds; return hosts."""

        async def check() -> list[Host] | None:
            hosts = await self.hosts(cluster)
            return hosts if hosts and predicate(hosts) else None

        result = await self.wait_until(check, timeout=timeout,
                                       what=what or f"hosts of cluster {cluster!r}")
        assert result is not None
        return result

    def __repr__(self) -> str:
        return f"EnvoyFixture({self.name}, node={self.node_id}, admin={self.admin_url})"


def _xds_list(xds: XdsAddress | Sequence[XdsAddress]) -> list[str | tuple[str, int]]:
    items: Iterable[XdsAddress]
    if isinstance(xds, int | str) or (
        isinstance(xds, tuple) and len(xds) == 2 and isinstance(xds[1], int)
    ):
        items = [xds]  # type: ignore[list-item]
    else:
        items = xds  # type: ignore[assignment]
    out: list[str | tuple[str, int]] = []
    for item in items:
        if isinstance(item, bool):
            raise ValueError(f"bad control-plane address {item!r}")
        if isinstance(item, int):
            out.append(("127.0.0.1", item))
        else:
            out.append(item)
    return out


async def start_envoy(
    harness: Owner,
    node_id: str,
    xds: XdsAddress | Sequence[XdsAddress],
    *,
    admin_port: int | None = None,
    delta: bool = False,
    wait: Literal["admin", "ready", "none"] = "admin",
    timeout: float = 30.0,
    log_level: str = "info",
    component_log_level: str | None = None,
    concurrency: int = 1,
    customize: Callable[[dict[str, Any]], None] | None = None,
    wrap: Callable[[list[str]], list[str]] | None = None,
    **bootstrap_options: Any,
) -> EnvoyFixture:
    """Start Envoy as xDS node ``node_id`` against control plane(s) ``xds``.

    ``xds`` is a port on 127.0.0.1, ``"HOST:PORT"``, ``(host, port)`` or a list of those
    (order = preference). Extra keyword arguments go to ``build_bootstrap`` (``zone``,
    ``initial_fetch_timeout``...); ``customize`` may edit the bootstrap dict in place.
    ``wait`` is "admin" (default: admin endpoint answers), "ready" (LIVE) or "none".
    ``wrap`` turns the command line into the one to run (``Network.wrap``: Envoy in a
    network namespace; give ``admin_address`` an address the test reaches there). A
    wrapped Envoy runs without hot restart: its shared memory in /dev/shm is common to
    every network namespace, its base-id sockets are not, so two could pick one id.
    """
    name = harness.unique_name(f"envoy-{node_id}")
    admin_port = admin_port or free_port()
    bootstrap = build_bootstrap(
        node_id, _xds_list(xds), admin_port=admin_port, delta=delta, **bootstrap_options
    )
    if customize is not None:
        customize(bootstrap)
    options: dict[str, Any] = {"log_level": log_level, "concurrency": concurrency,
                               "component_log_level": component_log_level, "name": name}
    process = EnvoyProcess(bootstrap, harness.path(name), wrap=wrap,
                           hot_restart=wrap is None, **options)
    envoy = EnvoyFixture(harness, process, node_id=node_id, bootstrap=bootstrap)
    harness.own(envoy)
    await process.start()
    if wait == "admin":
        await process.wait_admin(timeout)
    elif wait == "ready":
        await process.wait_ready(timeout)
    return envoy


class StartEnvoy(Protocol):
    """Type of the ``start_envoy`` fixture: ``start_envoy`` without the harness argument."""

    def __call__(
        self,
        node_id: str,
        xds: XdsAddress | Sequence[XdsAddress],
        **options: Any,
    ) -> Awaitable[EnvoyFixture]: ...
