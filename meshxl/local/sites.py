"""Two sites and a witness across a wide-area link, on one machine: the dual-site test
bed (docs/sites.md) of the tests, ``bench/dualsite.py`` and ``meshxl drill`` over a WAN.

Each site is a network namespace (:mod:`meshxl.local.netns`) holding what a data
center would: its etcd members, a control-plane replica, its members (the sample
counter app and its statesync sidecar each) and an Envoy whose node locality zone is
the site. The witness site holds one etcd member only, so etcd keeps a quorum when
either big site is lost (2 + 2 + 1). Every cross-site TCP connection goes through the
source site's delay proxy (:mod:`meshxl.local.wan`), which adds the round trip; the
test process (the *driver*) reaches every site directly, as a site's own clients do.

Ports are fixed inside a namespace (each has its own address); the driver reaches a
site at :meth:`DualSite.ip`. Use it as an async context manager::

    async with DualSite(Owner(), rtt_ms=20) as bed:
        bed.url("east")           # east's Envoy listener
        await bed.blackhole("east")
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from meshxl import headers as hdr
from meshxl.etcd.keys import Keys
from meshxl.local import commands
from meshxl.local.netns import Network, netem_unavailable, unavailable
from meshxl.local.procs import Owner, Process
from meshxl.local.wait import LocalError, wait_http, wait_until

__all__ = ["CLUSTER", "PIN", "SITES", "WITNESS", "DualSite", "SiteMember", "dualsite_model",
           "etcd_timings", "unavailable"]

CLUSTER = "orders"
SITES = ("east", "west")
WITNESS = "witness"
PIN = "x-meshxl-pin"
"""The header Envoy keeps a session's member in (``stickiness.pin``)."""

_HOST = {"east": 0, "west": 1, WITNESS: 2}
_ETCD_CLIENT, _ETCD_PEER = 2379, 2380  # + 10 x the member's index in its site
_XDS, _XDS_ADMIN = 18000, 18001
_APP, _SIDECAR = 9000, 9100  # + the member's index in its site
_ENVOY_ADMIN, LISTENER = 9901, 10000
_PROXY, _ECHO = 15999, 15998


def etcd_timings(rtt_ms: float) -> tuple[int, int]:
    """(heartbeat, election timeout) in ms: etcd's tuning guide wants a heartbeat about
    the round trip between members and an election timeout of ten heartbeats; never
    below 100 / 1,000 ms, so a busy two-core machine does not elect for nothing."""
    heartbeat = max(100, round(rtt_ms * 1.5))
    return heartbeat, 10 * heartbeat


def dualsite_model(affinity: str = "local") -> str:
    """The bed's cluster: load sharing over both sites (one failover rank), registered
    members, each site's Envoy preferring its own members (``site_affinity``)."""
    return f"""\
clusters:
  - name: {CLUSTER}
    mode: load-sharing
    membership: registered
    site_affinity: {affinity}
    stickiness: {{header: {hdr.SESSION}, pin: {{header: {PIN}}}}}
    sites: [{{name: east, failover_rank: 0}}, {{name: west, failover_rank: 0}}]
    health_check: {{path: /healthz}}
    listener: {{address: 0.0.0.0, port: {LISTENER}}}
    sessions: {{ttl: 10m}}
"""


@dataclass
class SiteMember:
    name: str
    site: str
    index: int
    app: Process | None = None
    sidecar: Process | None = None


@dataclass
class _Etcd:
    name: str
    site: str
    index: int
    process: Process | None = None
    member_id: str = ""


@dataclass
class DualSite:
    """The bed: ``rtt_ms`` between any two sites (0: every site in one place, no
    proxy), ``members`` per big site, ``etcd`` members per big site plus one witness
    (``witness=False``: a stretched cluster without one, to show what it does)."""

    owner: Owner
    rtt_ms: float = 20.0
    members: int = 2
    etcd: int = 2
    witness: bool = True
    affinity: str = "local"
    link: str = "proxy"
    """How the round trip is added: ``proxy`` (the user-space delay proxy, any kernel)
    or ``netem`` (the kernel's ``sch_netem`` on each site's egress to the other sites;
    refused where the kernel lacks it)."""
    keys: Keys = field(default_factory=lambda: Keys(f"/meshxl-sites-{os.getpid()}"))
    net: Network | None = None
    site_members: list[SiteMember] = field(default_factory=list)
    etcd_members: list[_Etcd] = field(default_factory=list)
    replicas: dict[str, Process] = field(default_factory=dict)
    envoys: dict[str, Any] = field(default_factory=dict)
    proxies: dict[str, Process] = field(default_factory=dict)
    blackholed: set[str] = field(default_factory=set)
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    """The sidecars' API token (they listen on the site's address, not loopback)."""

    async def __aenter__(self) -> DualSite:
        try:
            await self.start()
        except BaseException:
            await self.owner.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.owner.aclose()

    # -- addresses ------------------------------------------------------------------

    @property
    def sites(self) -> tuple[str, ...]:
        return (*SITES, WITNESS) if self.witness else SITES

    def ip(self, site: str) -> str:
        assert self.net is not None, "start() first"
        return self.net.ip(_HOST[site])

    def url(self, site: str) -> str:
        """The site's Envoy listener (what the site's clients use)."""
        return f"http://{self.ip(site)}:{LISTENER}"

    def counter_url(self, site: str) -> str:
        """The sample app's counter through the site's Envoy."""
        return f"{self.url(site)}/counter"

    def envoy_admin(self, site: str) -> str:
        return f"http://{self.ip(site)}:{_ENVOY_ADMIN}"

    def xds_admin(self, site: str) -> str:
        return f"http://{self.ip(site)}:{_XDS_ADMIN}"

    def sidecar_url(self, member: SiteMember) -> str:
        return f"http://{self.ip(member.site)}:{_SIDECAR + member.index}"

    def etcd_url(self, member: _Etcd) -> str:
        return f"http://{self.ip(member.site)}:{_ETCD_CLIENT + 10 * member.index}"

    def etcd_urls(self, site: str | None = None) -> list[str]:
        """Every member's client URL, ``site``'s own first."""
        ordered = sorted(self.etcd_members, key=lambda m: m.site != site)
        return [self.etcd_url(m) for m in ordered]

    def _wrap(self, site: str) -> Any:
        assert self.net is not None
        return functools.partial(self.net.wrap, _HOST[site])

    def spawn(self, site: str, name: str, argv: list[str]) -> Process:
        """A process of the caller's in ``site``'s namespace, owned by the bed (a peer
        measured beside meshxl: its cross-site connections take the same link)."""
        return self.owner.spawn(name, self._wrap(site)(argv))

    # -- start ----------------------------------------------------------------------

    async def start(self) -> None:
        from meshxl import etcd as etcd_client
        from meshxl.operator.actions import apply_model

        reason = unavailable()
        if reason is not None:
            raise LocalError(f"the dual-site bed needs network namespaces: {reason}")
        token_file = self.owner.root / "sidecar.token"
        token_file.write_text(self.token + "\n")
        token_file.chmod(0o600)
        self.net = await Network(self.owner, 3, label="mxs").create()
        if self.link not in ("proxy", "netem"):
            raise ValueError(f"link must be proxy or netem, got {self.link!r}")
        if self.rtt_ms > 0:
            if self.link == "netem":
                await self._start_netem()
            else:
                await self._start_links()
        await self._start_etcd()
        async with etcd_client.client(",".join(self.etcd_urls("east")), timeout=10) as client:
            await apply_model(client, self.keys, dualsite_model(self.affinity), "dual-site")
        for site in SITES:
            self._start_replica(site)
            for i in range(self.members):
                self._start_member(SiteMember(f"{site[0]}{i + 1}", site, i))
        await asyncio.gather(*(wait_http(f"{self.xds_admin(s)}/readyz",
                                         process=self.replicas[s], timeout=40) for s in SITES))
        await asyncio.gather(*(self.wait_member(m) for m in self.site_members))
        for site in SITES:
            await self._start_envoy(site)
        await self.wait_healthy()

    async def _start_links(self) -> None:
        """A delay proxy per site, and the rules that send every connection to another
        site through it (iptables nat OUTPUT, the proxy's own connections excepted)."""
        from meshxl.local.wan import MARK

        assert self.net is not None
        delay_ms = self.rtt_ms / 2
        for site in self.sites:
            listen = f"{self.ip(site)}:{_PROXY}"
            proxy = self.owner.spawn(f"wan-{site}", self._wrap(site)([
                *commands.PYTHON, "-m", "meshxl.local.wan", "proxy", "--listen", listen,
                "--delay-ms", f"{delay_ms:g}"]))
            self.proxies[site] = proxy
            for other in self.sites:
                if other != site:
                    await self.net.redirect(_HOST[site], self.ip(other), listen, mark=MARK)
            await wait_until(functools.partial(self._listening, site, _PROXY), timeout=15,
                             what=f"the delay proxy of {site}", process=proxy)

    async def _start_netem(self) -> None:
        """The kernel's netem instead of the proxy: on each site's egress, packets to
        another site wait RTT/2 (a prio qdisc's fourth band, chosen by destination), so
        a round trip between two sites waits the RTT; the driver's traffic, in the
        other bands, is not delayed."""
        assert self.net is not None
        problem = await asyncio.to_thread(netem_unavailable)
        if problem is not None:
            raise LocalError(f"link netem: {problem}; use the delay proxy (link proxy)")
        for site in self.sites:
            await self.net.delay(_HOST[site], [self.ip(o) for o in self.sites if o != site],
                                 self.rtt_ms / 2)

    async def _listening(self, site: str, port: int) -> bool:
        try:
            async with asyncio.timeout(1):
                _, writer = await asyncio.open_connection(self.ip(site), port)
        except (OSError, TimeoutError):
            return False
        writer.close()
        return True

    async def _start_etcd(self) -> None:
        layout = [(s, i) for s in SITES for i in range(self.etcd)]
        if self.witness:
            layout.append((WITNESS, 0))
        self.etcd_members = [_Etcd(f"{site}-{i + 1}", site, i) for site, i in layout]
        peers = ",".join(f"{m.name}=http://{self.ip(m.site)}:{_ETCD_PEER + 10 * m.index}"
                         for m in self.etcd_members)
        heartbeat, election = etcd_timings(self.rtt_ms)
        token = f"mxs-{os.getpid()}-{time.time_ns()}"
        for m in self.etcd_members:
            argv = commands.etcd(
                name=m.name, data_dir=self.owner.scratch(self.owner.root / f"etcd-{m.name}"),
                client_url=self.etcd_url(m),
                peer_url=f"http://{self.ip(m.site)}:{_ETCD_PEER + 10 * m.index}",
                initial_cluster=peers, token=token, heartbeat_ms=heartbeat,
                election_ms=election)
            m.process = self.owner.spawn(f"etcd-{m.name}", self._wrap(m.site)(argv))
        await asyncio.gather(*(wait_http(f"{self.etcd_url(m)}/health", process=m.process,
                                         timeout=60) for m in self.etcd_members))
        for m in self.etcd_members:
            m.member_id = str((await self._etcd_status(m))["header"]["member_id"])

    def _start_replica(self, site: str) -> None:
        argv = commands.xds(listen=f"{self.ip(site)}:{_XDS}",
                            admin=f"{self.ip(site)}:{_XDS_ADMIN}",
                            etcd=",".join(self.etcd_urls(site)), etcd_prefix=self.keys.root,
                            replica=f"xds-{site}")
        self.replicas[site] = self.owner.spawn(f"xds-{site}", self._wrap(site)(argv))

    def _start_member(self, m: SiteMember) -> None:
        ip = self.ip(m.site)
        _, election = etcd_timings(self.rtt_ms)
        wrap = self._wrap(m.site)
        token_file = self.owner.root / "sidecar.token"
        m.sidecar = self.owner.spawn(f"sidecar-{m.name}", wrap(commands.statesync(
            cluster=CLUSTER, member=m.name, app=f"{ip}:{_APP + m.index}", site=m.site,
            listen=f"{ip}:{_SIDECAR + m.index}", etcd=",".join(self.etcd_urls(m.site)),
            etcd_prefix=self.keys.root, lease_ttl=max(2.0, 2 * election / 1000),
            token_file=token_file)))
        m.app = self.owner.spawn(f"app-{m.name}", wrap([
            "env", f"MESHXL_STATESYNC_TOKEN_FILE={token_file}", *commands.app(
                m.name, cluster=CLUSTER, listen=f"{ip}:{_APP + m.index}",
                sidecar=self.sidecar_url(m))]))
        self.site_members.append(m)

    async def wait_member(self, m: SiteMember) -> None:
        assert m.app is not None and m.sidecar is not None
        await wait_http(f"{self.sidecar_url(m)}/readyz", process=m.sidecar, timeout=40)
        await wait_http(f"http://{self.ip(m.site)}:{_APP + m.index}/healthz", process=m.app,
                        timeout=40)

    async def _start_envoy(self, site: str) -> None:
        from meshxl.local.envoy import EnvoyProcess
        from meshxl.proxy.bootstrap import build_bootstrap

        other = next(s for s in SITES if s != site)
        bootstrap = build_bootstrap(
            f"envoy-{site}", [(self.ip(site), _XDS), (self.ip(other), _XDS)],
            admin_port=_ENVOY_ADMIN, admin_address=self.ip(site), zone=site)
        envoy = EnvoyProcess(bootstrap, self.owner.path(f"envoy-{site}"), log_level="warning",
                             name=f"envoy-{site}", wrap=self._wrap(site), hot_restart=False)
        self.owner.own(envoy)
        await envoy.start()
        await envoy.wait_ready(40)
        self.envoys[site] = envoy

    async def hosts(self, site: str) -> list[Any]:
        from meshxl.proxy.admin import EnvoyAdmin

        async with EnvoyAdmin(self.envoy_admin(site), timeout=2.0) as admin:
            return await admin.hosts(CLUSTER)

    async def wait_healthy(self, timeout: float = 40) -> None:
        """Until both Envoys see every member healthy."""
        want = len(self.site_members)

        async def healthy() -> bool:
            for site in SITES:
                hosts = await self.hosts(site)
                if len(hosts) != want or not all(h.healthy for h in hosts):
                    return False
            return True

        await wait_until(healthy, timeout=timeout, what=f"both Envoys to see all {want} "
                         "members healthy", explain=lambda: self.hosts(SITES[0]))

    # -- etcd -----------------------------------------------------------------------

    async def _etcd_status(self, m: _Etcd, timeout: float = 2.0) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http,
            http.post(f"{self.etcd_url(m)}/v3/maintenance/status", json={}) as resp,
        ):
            resp.raise_for_status()
            data: dict[str, Any] = await resp.json(content_type=None)
            return data

    async def leader_site(self, exclude: str | None = None) -> str | None:
        """The site of the etcd leader as a member outside ``exclude`` reports it
        (None: none reports one)."""
        for m in self.etcd_members:
            if m.site == exclude or m.site in self.blackholed:
                continue
            try:
                status = await self._etcd_status(m, timeout=1.0)
            except (aiohttp.ClientError, TimeoutError):
                continue
            leader = str(status.get("leader", ""))
            for candidate in self.etcd_members:
                if candidate.member_id == leader and leader != "0":
                    return candidate.site
        return None

    async def move_leader(self, site: str, timeout: float = 20.0) -> None:
        """Make an etcd member of ``site`` the leader (Maintenance.MoveLeader)."""
        target = next(m for m in self.etcd_members if m.site == site)

        async def moved() -> bool:
            current = await self.leader_site()
            if current == site:
                return True
            for m in self.etcd_members:
                if m.site == current:
                    try:
                        async with (aiohttp.ClientSession(
                                timeout=aiohttp.ClientTimeout(total=5)) as http,
                                http.post(f"{self.etcd_url(m)}/v3/maintenance/transfer-leadership",
                                          json={"targetID": target.member_id}) as resp):
                            await resp.read()
                    except (aiohttp.ClientError, TimeoutError):
                        pass
            return False

        await wait_until(moved, timeout=timeout, interval=0.5,
                         what=f"the etcd leader to move to {site}")

    # -- faults and measurements ----------------------------------------------------

    async def blackhole(self, site: str) -> float:
        """Drop every packet between ``site`` and the other sites at once (its members,
        sidecars, Envoy, control-plane replica and etcd members alike); the driver still
        reaches it. Returns the time (Unix seconds)."""
        assert self.net is not None
        at = time.time()
        await self.net.isolate(_HOST[site])
        for other in self.sites:
            if other != site:
                await self.net.cut(_HOST[other], self.ip(site))
        self.blackholed.add(site)
        return at

    async def heal(self) -> None:
        """Every blackholed site back."""
        assert self.net is not None
        await self.net.heal()
        self.blackholed.clear()

    async def link_rtt(self, source: str = "east", target: str = "west",
                       count: int = 20) -> dict[str, float]:
        """The link itself: a raw TCP round trip from ``source`` to an echo server in
        ``target`` (through the delay proxy), in milliseconds."""
        from meshxl.local.procs import run

        key = f"echo-{target}"
        if key not in self.proxies:
            self.proxies[key] = self.owner.spawn(key, self._wrap(target)([
                *commands.PYTHON, "-m", "meshxl.local.wan", "echo", "--listen",
                f"{self.ip(target)}:{_ECHO}"]))
            await wait_until(functools.partial(self._listening, target, _ECHO), timeout=15,
                             what=f"the echo server of {target}", process=self.proxies[key])
        code, out, err = await run(self._wrap(source)([
            *commands.PYTHON, "-m", "meshxl.local.wan", "rtt", f"{self.ip(target)}:{_ECHO}",
            "--count", str(count)]), timeout=60)
        if code != 0:
            raise LocalError(f"link probe {source} -> {target} failed: {err.strip()}")
        result: dict[str, float] = json.loads(out)
        return result
