"""The bed of ``bench/vsls.py``: one pool of members serving many virtual systems
through real etcd, the control plane and Envoy, on loopback, with sticky load.

Each member is either the sample counter app beside one statesync sidecar serving
every VS of the pool (``meshxl serve statesync --pool``; the app takes each request's
VS from its Host: ``stateful``), or the echo backend (no state). Every process is owned
by one :class:`~meshxl.local.procs.Owner` and killed at the end, also on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from meshxl import headers as hdr
from meshxl.etcd.keys import Keys
from meshxl.local import commands
from meshxl.local.ports import free_ports
from meshxl.local.procs import Owner, Process, run
from meshxl.local.servers import HOST, start_etcd
from meshxl.local.wait import LocalError, wait_http, wait_until
from meshxl.proxy.admin import EnvoyAdmin

POOL = "web"
DOMAIN = "tenants.example"
REQUEST_TIMEOUT = 5.0


def pool_hosting_available() -> bool:
    """Whether this checkout has a sidecar serving a pool's VSs and an app taking each
    request's VS from its Host (``meshxl serve statesync --pool``, ``--clusters-by-host``)."""
    return "clusters_by_host" in inspect.signature(commands.app).parameters


def vs_names(count: int) -> list[str]:
    return [f"v{i:02d}" for i in range(1, count + 1)]


@dataclass
class Member:
    name: str
    site: str
    port: int
    """The app's (or echo's) port: what the pool lists."""
    sidecar_port: int
    procs: list[Process] = field(default_factory=list)


def model_text(members: Sequence[Member], listener_port: int, vss: Sequence[str],
               quota_wps: int | None = None, quota_burst: int | None = None,
               replication: str = "all") -> str:
    listed = "".join(f"\n      - {{name: {m.name}, address: {HOST}, port: {m.port}, "
                     f"site: {m.site}}}" for m in members)
    burst = f", writes_burst: {quota_burst}" if quota_burst else ""
    parts = [f"replication: {replication}"] if replication != "all" else []
    if quota_wps:
        parts.append(f"quota: {{writes_per_second: {quota_wps}{burst}}}")
    quota = f"\n    sessions: {{{', '.join(parts)}}}" if parts else ""
    return f"""pools:
  - name: {POOL}
    listener: {{address: {HOST}, port: {listener_port}}}
    sites: [{{name: a}}, {{name: b}}]
    members:{listed}
virtual_systems:
  - names: [{", ".join(vss)}]
    pool: {POOL}
    stickiness: {{header: {hdr.SESSION}}}{quota}
"""


class Bed:
    """etcd, ``members`` pool members, one control plane and one Envoy."""

    def __init__(self, owner: Owner, vss: Sequence[str], members: int, *, stateful: bool,
                 quota_wps: int | None = None, quota_burst: int | None = None,
                 replication: str = "all") -> None:
        self.owner = owner
        self.vss = list(vss)
        self.stateful = stateful
        self.quota_wps = quota_wps
        self.quota_burst = quota_burst
        self.replication = replication
        self.keys = Keys(f"/meshxl-bench-vsls-{os.getpid()}")
        self.members = [self._new_member(i) for i in range(members)]
        self.listener_port, self.xds_port, self.xds_admin, self.envoy_admin = free_ports(4)
        self.etcd_url = ""
        self.envoy: Any = None
        self.xds: Process | None = None

    def _new_member(self, i: int) -> Member:
        port, sidecar_port = free_ports(2)
        return Member(f"w{i + 1}", "ab"[i % 2], port, sidecar_port)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.listener_port}"

    @property
    def envoy_admin_url(self) -> str:
        return f"http://{HOST}:{self.envoy_admin}"

    def model(self, members: Sequence[Member] | None = None) -> str:
        return model_text(members or self.members, self.listener_port, self.vss,
                          self.quota_wps, self.quota_burst, self.replication)

    def member(self, name: str) -> Member:
        return next(m for m in self.members if m.name == name)

    # -- start -------------------------------------------------------------------------

    async def start(self) -> None:
        from meshxl.local.envoy import EnvoyProcess
        from meshxl.proxy.bootstrap import build_bootstrap

        self.etcd_url, _ = await start_etcd(self.owner)
        await self.apply(self.model())
        await asyncio.gather(*(self.start_member(m) for m in self.members))
        self.xds = self.owner.spawn("xds", commands.xds(
            listen=f"{HOST}:{self.xds_port}", etcd=self.etcd_url, etcd_prefix=self.keys.root,
            admin=f"{HOST}:{self.xds_admin}", replica="xds-0", log_level="warning"))
        await wait_http(f"http://{HOST}:{self.xds_admin}/readyz", process=self.xds, timeout=60)
        bootstrap = build_bootstrap("meshxl-vsls", [(HOST, self.xds_port)],
                                    admin_port=self.envoy_admin)
        self.envoy = EnvoyProcess(bootstrap, self.owner.root, log_level="warning")
        self.owner.own(self.envoy)
        await self.envoy.start()
        await self.envoy.wait_ready(60)
        await self.wait_hosts(lambda hs: len(hs) == len(self.members) and
                              all(h.healthy for h in hs), "every member healthy in every VS")

    async def apply(self, text: str) -> None:
        from meshxl import etcd
        from meshxl.operator.actions import apply_model

        async with etcd.client(self.etcd_url) as client:
            await apply_model(client, self.keys, text, "bench/vsls")

    async def start_member(self, m: Member) -> None:
        """The member's processes (again after a kill: new processes, same ports)."""
        if self.stateful:
            sidecar = self.owner.spawn(self.owner.unique_name(f"sidecar-{m.name}"),
                                       commands.statesync(
                cluster=None, pool=POOL, member=m.name, app=f"{HOST}:{m.port}", site=m.site,
                listen=f"{HOST}:{m.sidecar_port}", etcd=self.etcd_url,
                etcd_prefix=self.keys.root, log_level="warning"))
            app = self.owner.spawn(self.owner.unique_name(f"app-{m.name}"), commands.app(
                m.name, cluster=None, listen=f"{HOST}:{m.port}",
                sidecar=f"http://{HOST}:{m.sidecar_port}", clusters_by_host=True))
            m.procs = [app, sidecar]
            await wait_http(f"http://{HOST}:{m.port}/healthz", process=app, timeout=60)
        else:
            echo = self.owner.spawn(self.owner.unique_name(f"echo-{m.name}"),
                                    commands.echo(m.name, f"{HOST}:{m.port}"))
            m.procs = [echo]
            await wait_http(f"http://{HOST}:{m.port}/healthz", process=echo, timeout=30)

    def kill9(self, m: Member) -> float:
        """kill -9 of every process of the member (process groups); the time."""
        killed = time.time()
        for p in m.procs:
            p.signal(signal.SIGKILL)
        return killed

    async def reap(self, m: Member) -> None:
        for p in m.procs:
            await p.kill()

    async def add_member(self) -> Member:
        m = self._new_member(len(self.members))
        await self.start_member(m)
        self.members.append(m)
        return m

    # -- observe -----------------------------------------------------------------------

    async def clusters(self) -> dict[str, Any]:
        async with EnvoyAdmin(self.envoy_admin_url, timeout=5.0) as admin:
            return await admin.clusters()

    async def health_checks(self) -> int:
        """Envoy's health-check attempts so far, every VS's cluster summed."""
        async with EnvoyAdmin(self.envoy_admin_url, timeout=5.0) as admin:
            stats = await admin.stats(r"health_check\.attempt$")
        return sum(stats.values())

    async def wait_hosts(self, ok: Any, what: str, timeout: float = 60.0) -> None:
        async def check() -> bool:
            seen = await self.clusters()
            return all(ok(seen.get(vs, [])) for vs in self.vss)
        await wait_until(check, timeout=timeout, interval=0.25, what=what)

    async def vs_list(self) -> dict[str, Any]:
        """``meshxl vs list --output json``, as an operator runs it."""
        code, out, err = await run([
            sys.executable, "-m", "meshxl.cli", "vs", "list", "--output", "json",
            "--etcd", self.etcd_url, "--etcd-prefix", self.keys.root], timeout=60)
        if code != 0:
            raise LocalError(f"meshxl vs list: exit {code}: {err[-500:]}")
        report: dict[str, Any] = json.loads(out)
        return report


# -- load ---------------------------------------------------------------------------------


@dataclass
class Rec:
    vs: str
    session: str
    sent: float
    ended: float
    status: int
    member: str | None
    seq: int | None
    write: bool
    error: str = ""
    """A failed request's answer (its first bytes) or the client's error."""

    @property
    def ok(self) -> bool:
        return self.status == 200


async def ask(http: aiohttp.ClientSession, url: str, vs: str, session: str, *,
              write: bool, stateful: bool) -> Rec:
    """One request of ``session`` to ``vs`` by its Host: a counter's POST (a write) or
    GET with state, the echo's GET without."""
    sent = time.time()
    method = "POST" if write and stateful else "GET"
    path = "/counter" if stateful else "/"
    try:
        async with http.request(method, f"{url}{path}", headers={
                "Host": f"{vs}.{DOMAIN}", hdr.SESSION: session}) as resp:
            body = await resp.read()
            seq = None
            if resp.status == 200 and stateful:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    seq = int(json.loads(body)["seq"])
            return Rec(vs, session, sent, time.time(), resp.status,
                       resp.headers.get(hdr.MEMBER), seq, method == "POST",
                       "" if resp.status == 200 else body[:160].decode(errors="replace"))
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Rec(vs, session, sent, time.time(), 0, None, None, method == "POST",
                   f"{type(exc).__name__}: {exc}"[:160])


class Load:
    """Sticky sessions, one request at a time each, ``interval`` apart; bounded in time
    (``until``, which may be moved) and count."""

    def __init__(self, url: str, sessions: Sequence[tuple[str, str]], interval: float,
                 until: float, max_requests: int, *, stateful: bool) -> None:
        self.url = url
        self.sessions = list(sessions)
        self.interval = interval
        self.until = until
        self.max_requests = max_requests
        self.stateful = stateful
        self.records: list[Rec] = []

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=len(self.sessions) + 4)
        async with aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)) as http:
            await asyncio.gather(*(self._one(http, vs, s, k)
                                   for k, (vs, s) in enumerate(self.sessions)))

    async def _one(self, http: aiohttp.ClientSession, vs: str, session: str, k: int) -> None:
        await asyncio.sleep(self.interval * k / max(1, len(self.sessions)))
        while time.time() < self.until and len(self.records) < self.max_requests:
            self.records.append(await ask(http, self.url, vs, session, write=True,
                                          stateful=self.stateful))
            await asyncio.sleep(self.interval)


async def read_back(url: str, sessions: Sequence[tuple[str, str]]) -> dict[tuple[str, str],
                                                                          int | None]:
    """Every session's counter once the load is over (GET, a few tries each)."""
    out: dict[tuple[str, str], int | None] = {}
    gate = asyncio.Semaphore(16)
    async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)) as http:
        async def one(vs: str, s: str) -> None:
            async with gate:
                for _ in range(3):
                    r = await ask(http, url, vs, s, write=False, stateful=True)
                    if r.ok:
                        break
                    await asyncio.sleep(0.2)
                out[vs, s] = r.seq if r.ok else None
        await asyncio.gather(*(one(vs, s) for vs, s in sessions))
    return out


def lost_writes(records: Sequence[Rec], final: dict[tuple[str, str], int | None]) -> int:
    """Acknowledged writes undone: a session's acknowledged counter going back (one
    request at a time per session), or the final read below the last acknowledged."""
    last: dict[tuple[str, str], int] = {}
    lost = 0
    for r in sorted(records, key=lambda r: r.sent):
        if not (r.write and r.ok and r.seq is not None):
            continue
        key = (r.vs, r.session)
        if key in last and r.seq <= last[key]:
            lost += last[key] - r.seq + 1
        last[key] = max(last.get(key, 0), r.seq)
    for key, seq in last.items():
        got = final.get(key)
        if got is None or got < seq:
            lost += seq - (got or 0)
    return lost


def served_by(records: Sequence[Rec], since: float, until: float) -> dict[str, dict[str, int]]:
    """VS -> member -> answers (200) between ``since`` and ``until``."""
    out: dict[str, dict[str, int]] = {}
    for r in records:
        if r.ok and r.member and since <= r.sent < until:
            per = out.setdefault(r.vs, {})
            per[r.member] = per.get(r.member, 0) + 1
    return out


__all__ = ["DOMAIN", "POOL", "Bed", "Load", "Member", "Rec", "ask", "lost_writes",
           "model_text", "pool_hosting_available", "read_back", "served_by", "vs_names"]
