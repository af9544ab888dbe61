"""Real etcd servers for integration tests: one member, or a 3-member cluster.

Each member runs on free loopback ports (or in a network namespace) with its own data
directory under the test's owner root; the command line is
:func:`meshxl.local.commands.etcd` (short raft timings, pre-vote), optionally with
client TLS.
"""

# Waits take a `timeout` (ASYNC109) so errors name the member and carry its log.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import json
import os
import ssl
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aetcd
import aiohttp

from meshxl import binaries
from meshxl.local import commands
from meshxl.local.ports import free_ports
from meshxl.local.procs import Owner, Process
from meshxl.local.wait import LocalError, wait_until

if TYPE_CHECKING:
    from tests.harness.netns import Network

__all__ = [
    "EtcdCluster",
    "EtcdNotInstalled",
    "EtcdServer",
    "find_etcd",
    "start_etcd",
    "start_etcd_cluster",
]

HOST = "127.0.0.1"


class EtcdNotInstalled(LocalError):
    """No ``etcd`` binary on PATH."""


def find_etcd() -> str:
    try:
        return binaries.find_etcd()
    except binaries.MissingBinary as exc:
        raise EtcdNotInstalled(f"integration tests need a real etcd 3.4+ server: {exc} "
                               "(or run `make setup`)") from None


class EtcdServer:
    """One etcd member. ``start`` spawns it; ``wait_healthy`` waits for ``/health``."""

    def __init__(
        self,
        harness: Owner,
        *,
        name: str,
        client_port: int,
        peer_port: int,
        initial_cluster: str,
        token: str,
        data_dir: Path,
        host: str = HOST,
        wrap: Callable[[list[str]], list[str]] | None = None,
        state: str = "new",
        tls: commands.EtcdTls | None = None,
    ) -> None:
        """``state`` "existing": join a running cluster; ``tls``: serve clients over
        https and require client certificates; ``wrap``: e.g. run in a namespace."""
        self.harness = harness
        self.name = name
        self.host = host
        self.client_port = client_port
        self.peer_port = peer_port
        self.data_dir = data_dir
        self._token = token
        self._initial_cluster = initial_cluster
        self._state = state
        self.tls = tls
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        self.process = Process(
            name,
            wrap(self._argv()) if wrap is not None else self._argv(),
            harness.root / f"{name}.log",
            cwd=data_dir.parent,
            env=env,
        )
        harness.own(self)

    def _argv(self) -> list[str]:
        return commands.etcd(
            name=self.name, data_dir=self.data_dir, client_url=self.url,
            peer_url=self.peer_url, initial_cluster=self._initial_cluster, token=self._token,
            state=self._state, tls=self.tls, binary=find_etcd())

    # -- addresses ---------------------------------------------------------------

    @property
    def url(self) -> str:
        """Client URL, ``http://127.0.0.1:PORT`` (https with ``tls``)."""
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{self.host}:{self.client_port}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """How to reach the client URL: None for plain http (``SecureEtcd`` overrides)."""
        return None

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def endpoint(self) -> tuple[str, int]:
        """``(host, client_port)``: what ``aetcd.Client(host=, port=)`` takes."""
        return (self.host, self.client_port)

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        """Same shape as ``EtcdCluster.endpoints``, so code can take either."""
        return [self.endpoint]

    # -- lifecycle ---------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.process.running

    async def start(self, *, wait: bool = True, timeout: float = 30.0) -> EtcdServer:
        """Spawn the member (or restart it on its existing data) and, by default, wait."""
        self.process.start()
        if wait:
            await self.wait_healthy(timeout)
        return self

    async def wait_healthy(self, timeout: float = 30.0) -> None:
        """Poll ``/health`` until it reports ``true`` (there is a leader, reads work)."""
        context = self.ssl_context()
        connector = aiohttp.TCPConnector(ssl=context) if context is not None else None
        async with aiohttp.ClientSession(connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=2.0)) as http:

            async def healthy() -> bool:
                async with http.get(f"{self.url}/health") as resp:
                    body = await resp.text()
                    if resp.status == 200 and json.loads(body).get("health") == "true":
                        return True
                    raise LocalError(f"HTTP {resp.status}: {body.strip()[:200]}")

            await wait_until(healthy, timeout=timeout, process=self.process,
                             what=f"etcd {self.name} healthy at {self.url}/health")

    async def kill(self) -> None:
        """SIGKILL: the member dies without a word to its peers."""
        await self.process.kill()

    async def stop(self) -> None:
        """SIGTERM (graceful), SIGKILL after 5 s."""
        await self.process.stop()

    # -- access ------------------------------------------------------------------

    def client(self, **kwargs: Any) -> aetcd.Client:
        """A new aetcd client for this member; use ``async with`` (it must be closed)."""
        return aetcd.Client(host=self.host, port=self.client_port, **kwargs)

    async def status(self) -> dict[str, Any]:
        """``Maintenance.Status`` over etcd's JSON gateway: member id, leader, revision."""
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as http,
            http.post(f"{self.url}/v3/maintenance/status", json={}) as resp,
        ):
            resp.raise_for_status()
            data: dict[str, Any] = await resp.json(content_type=None)
            return data

    def logs(self) -> str:
        return self.process.logs()

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EtcdServer({self.name}, {self.url}, {state})"


class EtcdCluster:
    """``size`` etcd members forming one cluster (fault tests kill some of them)."""

    def __init__(self, harness: Owner, size: int = 3, name: str = "etcd",
                 network: Network | None = None) -> None:
        """``network``: member i runs in host i's namespace (``tests/harness/netns.py``),
        on its address, ports 2379/2380."""
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if network is not None and len(network.hosts) < size:
            raise ValueError(f"the network has {len(network.hosts)} hosts, not {size}")
        ports = free_ports(2 * size) if network is None else [2379, 2380] * size
        hosts = [HOST if network is None else network.ip(i) for i in range(size)]
        token = f"meshxl-test-{uuid.uuid4().hex[:12]}"
        names = [harness.unique_name(f"{name}-{i}") for i in range(size)]
        initial = ",".join(f"{n}=http://{hosts[i]}:{ports[2 * i + 1]}"
                           for i, n in enumerate(names))
        self.members: list[EtcdServer] = [
            EtcdServer(
                harness,
                name=n,
                client_port=ports[2 * i],
                peer_port=ports[2 * i + 1],
                initial_cluster=initial,
                token=token,
                data_dir=harness.path(n) / "data",
                host=hosts[i],
                wrap=None if network is None else partial(network.wrap, i),
            )
            for i, n in enumerate(names)
        ]

    def __getitem__(self, index: int) -> EtcdServer:
        return self.members[index]

    def __len__(self) -> int:
        return len(self.members)

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        """``(host, client_port)`` of every member, in member order."""
        return [m.endpoint for m in self.members]

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.members]

    @property
    def running(self) -> list[EtcdServer]:
        return [m for m in self.members if m.running]

    async def start(self, timeout: float = 40.0) -> EtcdCluster:
        """Start all members together (they must meet to elect) and wait for health."""
        for member in self.members:
            member.process.start()
        await asyncio.gather(*(m.wait_healthy(timeout) for m in self.members))
        return self

    def client(self, *, alive_only: bool = True, **kwargs: Any) -> aetcd.Client:
        """An aetcd client whose gRPC channel knows several members (failover inside gRPC).

        aetcd takes one host; a gRPC ``ipv4:`` target with a comma-separated address list
        makes the channel move to another member when the one it uses dies. In-flight
        requests to a killed member still fail: retry them (``wait_for``). Pass
        ``timeout=1`` in fault tests: a follower that lost its leader holds a request
        about 6 s before failing it.
        """
        members = self.running if alive_only else self.members
        if not members:
            raise LocalError("no running etcd member to connect to")
        addresses = [f"{m.host}:{m.client_port}" for m in members]
        head, last = addresses[:-1], members[-1]
        host = "ipv4:" + ",".join([*head, last.host])
        return aetcd.Client(host=host, port=last.client_port, **kwargs)

    async def leader(self) -> EtcdServer:
        """The member that is leader now, according to the running members."""
        for member in self.running:
            try:
                status = await member.status()
            except (aiohttp.ClientError, TimeoutError):
                continue
            leader_id = status.get("leader")
            for candidate in self.running:
                try:
                    cstatus = await candidate.status()
                except (aiohttp.ClientError, TimeoutError):
                    continue
                if leader_id and cstatus.get("header", {}).get("member_id") == leader_id:
                    return candidate
        raise LocalError("no etcd member reports a reachable leader")

    async def kill(self, index: int) -> EtcdServer:
        """SIGKILL member ``index``; returns it (``await member.start()`` to bring it back)."""
        await self.members[index].kill()
        return self.members[index]

    def logs(self) -> str:
        return "\n".join(f"--- {m.name}\n{m.logs()}" for m in self.members)


async def start_etcd(harness: Owner, name: str = "etcd", timeout: float = 30.0) -> EtcdServer:
    """Start a single-member etcd and wait until it is healthy."""
    name = harness.unique_name(name)
    client_port, peer_port = free_ports(2)
    server = EtcdServer(
        harness,
        name=name,
        client_port=client_port,
        peer_port=peer_port,
        initial_cluster=f"{name}=http://{HOST}:{peer_port}",
        token=f"meshxl-test-{uuid.uuid4().hex[:12]}",
        data_dir=harness.path(name) / "data",
    )
    return await server.start(timeout=timeout)


async def start_etcd_cluster(
    harness: Owner, size: int = 3, name: str = "etcd", timeout: float = 40.0
) -> EtcdCluster:
    """Start a ``size``-member etcd cluster and wait until every member is healthy."""
    return await EtcdCluster(harness, size, name).start(timeout)
