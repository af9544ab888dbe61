"""One typed client of Envoy's admin API (aiohttp), used by every reader in meshxl and
its tests: ``meshxl verify`` (node id, live endpoints, ``connected_state``), the drill's
per-endpoint request counters, local deployments waiting for healthy members, and the
test harness.

"Healthy host" is defined once, here (:attr:`Host.healthy`), after Envoy's admin API
(``envoy.admin.v3.HostHealthStatus`` in ``/clusters?format=json``): a host takes
traffic as a *healthy* host when its EDS status is HEALTHY or UNKNOWN (UNKNOWN is what
Envoy reports for an endpoint the control plane sent without a health status) and none
of the flags in :data:`FAILURE_FLAGS` is set:

- ``failed_active_health_check``: the active health check failed (a new host also
  carries it until its first check passes, beside ``pending_active_hc``);
- ``failed_outlier_check``: ejected by outlier detection;
- ``failed_active_degraded_check``: the health check answered "degraded": Envoy then
  routes to the host only when too few healthy hosts remain, so it is not healthy;
- ``excluded_via_immediate_hc_fail``: taken out of rotation by the upstream's
  ``x-envoy-immediate-health-check-fail``;
- ``active_hc_timeout``: the active health check timed out.

``pending_dynamic_removal`` and ``pending_active_hc`` alone do not take a host out of
load balancing (the first marks a host removed from discovery that still serves until
its health check fails; the second always comes with ``failed_active_health_check``
when it matters), so they do not count. EDS DRAINING, UNHEALTHY, TIMEOUT and DEGRADED
are not healthy either.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aiohttp

__all__ = [
    "FAILURE_FLAGS",
    "HEALTHY_EDS_STATUSES",
    "EnvoyAdmin",
    "Host",
    "ServerInfo",
    "parse_clusters",
    "parse_stats",
]

#: Boolean ``health_status`` flags of ``/clusters`` that take a host out of healthy
#: load balancing (see the module docstring for why these and not the others).
FAILURE_FLAGS = frozenset(
    {
        "failed_active_health_check",
        "failed_outlier_check",
        "failed_active_degraded_check",
        "excluded_via_immediate_hc_fail",
        "active_hc_timeout",
    }
)

#: EDS health statuses under which Envoy treats a host as healthy.
HEALTHY_EDS_STATUSES = frozenset({"HEALTHY", "UNKNOWN"})


@dataclass(frozen=True, kw_only=True)
class Host:
    """One upstream host of a cluster as Envoy sees it (``/clusters?format=json``)."""

    address: str
    port: int
    priority: int = 0
    weight: int = 1
    #: Boolean health flags that are set, e.g. {"failed_active_health_check"}.
    flags: frozenset[str] = frozenset()
    #: EDS health status: HEALTHY, UNHEALTHY, DRAINING, TIMEOUT, DEGRADED or UNKNOWN.
    eds_health_status: str = "UNKNOWN"
    region: str = ""
    zone: str = ""
    sub_zone: str = ""
    hostname: str = ""
    stats: dict[str, int] = field(default_factory=dict, compare=False, hash=False)

    @property
    def endpoint(self) -> str:
        """``address:port``, handy for sets and messages."""
        return f"{self.address}:{self.port}"

    @property
    def healthy(self) -> bool:
        """True when Envoy sends this host traffic as a healthy host (module docstring)."""
        return not (self.flags & FAILURE_FLAGS) and self.eds_health_status in HEALTHY_EDS_STATUSES

    @property
    def draining(self) -> bool:
        """The control plane marked the endpoint DRAINING (admin state down/offline)."""
        return self.eds_health_status == "DRAINING"

    @property
    def rq_total(self) -> int:
        """Requests Envoy sent this host (0 before the first)."""
        return self.stats.get("rq_total", 0)

    @classmethod
    def from_admin(cls, raw: Mapping[str, Any]) -> Host:
        """One entry of ``host_statuses`` in ``/clusters?format=json``."""
        sock = raw.get("address", {}).get("socket_address", {})
        health = dict(raw.get("health_status", {}))
        eds = str(health.pop("eds_health_status", "UNKNOWN"))
        flags = frozenset(k for k, v in health.items() if v is True)
        locality = raw.get("locality", {}) or {}
        stats = {str(s.get("name")): int(s.get("value", 0)) for s in raw.get("stats", [])}
        return cls(
            address=str(sock.get("address", "")),
            port=int(sock.get("port_value", 0)),
            priority=int(raw.get("priority", 0)),
            weight=int(raw.get("weight", 1)),
            flags=flags,
            eds_health_status=eds,
            region=str(locality.get("region", "")),
            zone=str(locality.get("zone", "")),
            sub_zone=str(locality.get("sub_zone", "")),
            hostname=str(raw.get("hostname", "")),
            stats=stats,
        )


@dataclass(frozen=True, kw_only=True)
class ServerInfo:
    """The parts of ``/server_info`` meshxl reads."""

    #: PRE_INITIALIZING, INITIALIZING, LIVE or DRAINING.
    state: str
    node_id: str | None
    version: str = ""
    zone: str = ""
    """The node's locality zone (what picks a site's view of its clusters)."""

    @classmethod
    def from_admin(cls, raw: Mapping[str, Any]) -> ServerInfo:
        node = raw.get("node", {}) or {}
        locality = node.get("locality", {}) or {}
        return cls(state=str(raw.get("state", "")), node_id=node.get("id"),
                   version=str(raw.get("version", "")), zone=str(locality.get("zone", "")))


def parse_clusters(data: Mapping[str, Any]) -> dict[str, list[Host]]:
    """``/clusters?format=json`` -> cluster name -> hosts."""
    return {
        str(c.get("name", "")): [Host.from_admin(h) for h in c.get("host_statuses", [])]
        for c in data.get("cluster_statuses", [])
    }


def parse_stats(data: Mapping[str, Any]) -> dict[str, int]:
    """``/stats?format=json`` -> counters and gauges by name (histograms and text
    readouts such as ``control_plane.identifier`` left out)."""
    out: dict[str, int] = {}
    for item in data.get("stats", []):
        value = item.get("value")
        if "name" in item and isinstance(value, int) and not isinstance(value, bool):
            out[str(item["name"])] = value
    return out


class EnvoyAdmin:
    """A client of one Envoy's admin endpoint (``http://HOST:PORT``).

    Pass an ``aiohttp.ClientSession`` to share one, or use the client as an async
    context manager (or call :meth:`close`) to own one. Non-2xx answers raise
    ``aiohttp.ClientResponseError``; unreachable admin endpoints raise
    ``aiohttp.ClientError`` or ``TimeoutError``.
    """

    def __init__(self, url: str, *, session: aiohttp.ClientSession | None = None,
                 timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self._http = session
        self._owned = session is None
        self._timeout = timeout

    async def __aenter__(self) -> EnvoyAdmin:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owned and self._http is not None:
            await self._http.close()
            self._http = None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout))
            self._owned = True
        return self._http

    # -- raw ----------------------------------------------------------------------------

    async def get(self, path: str, **params: str) -> tuple[int, str]:
        """GET an admin path; (status, body) whatever the status."""
        async with self._session().get(self.url + path, params=params) as resp:
            return resp.status, await resp.text()

    async def post(self, path: str, **params: str) -> tuple[int, str]:
        """POST an admin path; (status, body) whatever the status."""
        async with self._session().post(self.url + path, params=params) as resp:
            return resp.status, await resp.text()

    async def get_json(self, path: str, **params: str) -> Any:
        """GET an admin path that answers JSON; raises on a non-2xx answer."""
        async with self._session().get(self.url + path, params=params) as resp:
            resp.raise_for_status()
            return json.loads(await resp.text())

    # -- typed --------------------------------------------------------------------------

    async def ready(self) -> bool:
        """``/ready`` answers 200: Envoy is LIVE (initial CDS and LDS applied)."""
        status, _ = await self.get("/ready")
        return status == 200

    async def server_info(self) -> ServerInfo:
        return ServerInfo.from_admin(await self.get_json("/server_info"))

    async def clusters(self) -> dict[str, list[Host]]:
        """``/clusters?format=json``: cluster name -> hosts with priority, weight, health."""
        return parse_clusters(await self.get_json("/clusters", format="json"))

    async def hosts(self, cluster: str) -> list[Host]:
        """Hosts of one cluster; [] if Envoy does not know the cluster (yet)."""
        return (await self.clusters()).get(cluster, [])

    async def stats(self, filter: str | None = None) -> dict[str, int]:
        """Counters and gauges from ``/stats?format=json`` (``filter`` is a regex)."""
        params = {"format": "json"}
        if filter:
            params["filter"] = filter
        return parse_stats(await self.get_json("/stats", **params))

    async def stat(self, name: str) -> int | None:
        """One counter or gauge; None when Envoy has not created it (yet)."""
        return (await self.stats(filter=f"^{re.escape(name)}$")).get(name)

    async def config_dump(
        self,
        resource: str | None = None,
        *,
        include_eds: bool = False,
        mask: str | None = None,
        name_regex: str | None = None,
    ) -> dict[str, Any]:
        """``/config_dump``; ``resource`` e.g. ``dynamic_active_clusters``."""
        params: dict[str, str] = {}
        if resource:
            params["resource"] = resource
        if include_eds:
            params["include_eds"] = ""
        if mask:
            params["mask"] = mask
        if name_regex:
            params["name_regex"] = name_regex
        data: dict[str, Any] = await self.get_json("/config_dump", **params)
        return data

    async def dynamic_clusters(self) -> dict[str, dict[str, Any]]:
        """Active clusters received over xDS: name -> Cluster (JSON), plus ``version_info``."""
        dump = await self.config_dump("dynamic_active_clusters")
        out: dict[str, dict[str, Any]] = {}
        for item in dump.get("configs", []):
            cluster = dict(item.get("cluster", {}))
            cluster["version_info"] = item.get("version_info", "")
            out[str(cluster.get("name"))] = cluster
        return out

    async def listeners(self) -> dict[str, tuple[str, int]]:
        """``/listeners?format=json``: listener name -> bound (address, port)."""
        data = await self.get_json("/listeners", format="json")
        out: dict[str, tuple[str, int]] = {}
        for item in data.get("listener_statuses", []):
            sock = item.get("local_address", {}).get("socket_address", {})
            out[str(item.get("name"))] = (str(sock.get("address")), int(sock.get("port_value", 0)))
        return out
