"""``meshxl quickstart``: etcd, the control plane, Envoy and three backends, on loopback.

It shows, with real traffic through a real Envoy:

1. sticky load sharing: sessions spread by weight, each session always on one member;
2. high availability: all traffic on the active member; kill -9 it under load and
   traffic moves to the standby with no failed request;
3. administrative failover: ``member down`` on the new active moves traffic to the
   backup in the second site; ``site offline`` and back.
"""

from __future__ import annotations

import asyncio
import collections
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from meshxl import etcd
from meshxl import headers as hdr
from meshxl.etcd.keys import Keys
from meshxl.local.envoy import EnvoyProcess
from meshxl.local.ports import free_ports
from meshxl.local.procs import Owner, remove_if_empty
from meshxl.local.servers import HOST, start_echo, start_etcd
from meshxl.local.wait import wait_until
from meshxl.operator.actions import apply_model, set_member_admin, set_site_admin
from meshxl.proxy.bootstrap import build_bootstrap
from meshxl.xds.app import ControlPlane
from meshxl.xds.config import ControlPlaneConfig

MODEL = """\
clusters:
  - name: shop
    mode: load-sharing
    stickiness: {{algorithm: maglev, header: x-session-id}}
    members:
      - {{name: alpha, address: {host}, port: {p1}, weight: 100}}
      - {{name: bravo, address: {host}, port: {p2}, weight: 100}}
      - {{name: charlie, address: {host}, port: {p3}, weight: 200}}
    listener: {{address: {host}, port: {listen}}}
    route: {{domains: ["shop.local"]}}

  - name: ledger
    mode: high-availability
    stickiness: {{algorithm: ring_hash, cookie: {{name: ledger-session, ttl: 1h}}}}
    sites: [{{name: dc1}}, {{name: dc2}}]
    members:
      - {{name: alpha, address: {host}, port: {p1}, site: dc1}}
      - {{name: bravo, address: {host}, port: {p2}, site: dc1}}
      - {{name: charlie, address: {host}, port: {p3}, site: dc2}}
    listener: {{address: {host}, port: {listen}}}
    route: {{domains: ["ledger.local"]}}
"""


@dataclass
class Tally:
    members: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    session_members: dict[str, set[str]] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return sum(self.members.values()) + sum(self.failures.values())


async def _request(http: aiohttp.ClientSession, url: str, host: str, session: str,
                   tally: Tally) -> None:
    try:
        async with http.get(url, headers={"host": host, hdr.SESSION: session,
                                          "cookie": f"ledger-session={session}"}) as resp:
            if resp.status != 200:
                tally.failures[f"HTTP {resp.status}"] += 1
                return
            member = resp.headers.get(hdr.MEMBER, "?")
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.failures[type(exc).__name__] += 1
        return
    tally.members[member] += 1
    tally.session_members.setdefault(session, set()).add(member)


async def _drive(url: str, host: str, sessions: int, per_session: int,
                 concurrency: int = 16, max_seconds: float = 30.0) -> Tally:
    """Send ``sessions x per_session`` requests, or fewer if ``max_seconds`` runs out."""
    tally = Tally()
    queue = [f"s{i}" for i in range(sessions) for _ in range(per_session)]
    deadline = time.monotonic() + max_seconds
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async def worker(k: int) -> None:
            for session in queue[k::concurrency]:
                if time.monotonic() > deadline:
                    return
                await _request(http, url, host, session, tally)
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return tally


async def _steady(url: str, host: str, sessions: int, seconds: float,
                  concurrency: int = 8) -> Tally:
    """Steady load for ``seconds`` (at most 100,000 requests), sessions in rotation."""
    return await _drive(url, host, sessions, per_session=100_000 // sessions,
                        concurrency=concurrency, max_seconds=seconds)


async def _wait(predicate: Any, what: str, timeout: float = 15.0) -> float:
    """Seconds until ``predicate`` held."""
    start = time.monotonic()
    await wait_until(predicate, timeout=timeout, what=what, interval=0.02)
    return time.monotonic() - start


async def _only_member(url: str, host: str, expected: str) -> bool:
    tally = await _drive(url, host, sessions=20, per_session=1, concurrency=4)
    return set(tally.members) == {expected} and not tally.failures


def _members_table(title: str, tally: Tally, weights: dict[str, int] | None = None) -> Table:
    table = Table(title=title)
    table.add_column("member")
    table.add_column("requests", justify="right")
    table.add_column("share", justify="right")
    if weights:
        table.add_column("weight share", justify="right")
    total = max(1, sum(tally.members.values()))
    weight_total = sum(weights.values()) if weights else 1
    for member in sorted(set(tally.members) | set(weights or {})):
        row = [member, str(tally.members[member]), f"{tally.members[member] / total:.0%}"]
        if weights:
            row.append(f"{weights.get(member, 0) / weight_total:.0%}")
        table.add_row(*row)
    return table


async def quickstart(console: Console, work_dir: Path | None = None,
                     etcd_url: str | None = None) -> int:
    """Run the tour; returns a process exit code (non-zero if any request failed)."""
    work = work_dir or Path(tempfile.mkdtemp(prefix="meshxl-quickstart-"))
    owner = Owner(work, grace=3.0)
    plane: ControlPlane | None = None
    envoy: EnvoyProcess | None = None
    failed = 0
    try:
        p1, p2, p3, listen, xds, admin = free_ports(6)
        with console.status("starting etcd, control plane, backends and Envoy..."):
            url = etcd_url or (await start_etcd(owner))[0]
            keys = Keys(f"/meshxl-quickstart-{int(time.time())}")
            model = MODEL.format(host=HOST, p1=p1, p2=p2, p3=p3, listen=listen)
            async with etcd.client(url) as client:
                await apply_model(client, keys, model, "quickstart model")
            plane = ControlPlane(ControlPlaneConfig(listen=f"{HOST}:{xds}", etcd=url,
                                                    etcd_root=keys.root))
            await plane.start()
            backends = {name: await start_echo(owner, name, port)
                        for name, port in (("alpha", p1), ("bravo", p2), ("charlie", p3))}
            envoy = EnvoyProcess(build_bootstrap("quickstart", [(HOST, xds)], admin_port=admin),
                                 work, log_level="warning")
            await envoy.start()
            await envoy.wait_ready(30)
        console.print(f"[bold]meshxl quickstart[/] (logs in {escape(str(work))})\n"
                      f"  etcd {escape(url)}, xDS {HOST}:{xds}, Envoy listener "
                      f"{HOST}:{listen}, admin http://{HOST}:{admin}")
        endpoint = f"http://{HOST}:{listen}/"
        await _wait(lambda: _only_member(endpoint, "ledger.local", "alpha"),
                    "Envoy to route the ledger cluster to its active member")

        # 1. Sticky load sharing.
        tally = await _drive(endpoint, "shop.local", sessions=300, per_session=5)
        moved = sum(1 for members in tally.session_members.values() if len(members) > 1)
        console.print(_members_table("1. load sharing: 300 sessions x 5 requests (shop)",
                                     tally, {"alpha": 100, "bravo": 100, "charlie": 200}))
        console.print(f"   sessions that ever changed member: [bold]{moved}[/] of "
                      f"{len(tally.session_members)}; failed requests: "
                      f"{sum(tally.failures.values())}")
        failed += sum(tally.failures.values())

        # 2. High availability: kill -9 the active under load.
        async def kill_active() -> None:
            await asyncio.sleep(0.7)
            await backends["alpha"].kill()

        load = asyncio.create_task(_steady(endpoint, "ledger.local", sessions=50, seconds=2.0))
        await kill_active()
        tally = await load
        console.print(_members_table("2. high availability: kill -9 the active member "
                                     "(alpha) under load (ledger)", tally))
        console.print(f"   failed requests: [bold]{sum(tally.failures.values())}[/] of "
                      f"{tally.requests} {dict(tally.failures) or ''}")
        failed += sum(tally.failures.values())

        # 3. Administrative failover and site failover, through etcd.
        async with etcd.client(url) as client:
            start = time.monotonic()
            await set_member_admin(client, keys, "ledger", "bravo", down=True,
                                   reason="quickstart")
            took = await _wait(lambda: _only_member(endpoint, "ledger.local", "charlie"),
                               "traffic to move to the dc2 backup")
            console.print(f"3. meshxl member down ledger bravo: traffic on [bold]charlie[/] "
                          f"(site dc2) after {1000 * (time.monotonic() - start):.0f} ms")
            await set_member_admin(client, keys, "ledger", "bravo", down=False)
            await _wait(lambda: _only_member(endpoint, "ledger.local", "bravo"),
                        "traffic to return to bravo")
            console.print("   meshxl member up ledger bravo: traffic back on [bold]bravo[/]")
            await set_site_admin(client, keys, "dc1", offline=True, reason="quickstart")
            took = await _wait(lambda: _only_member(endpoint, "ledger.local", "charlie"),
                               "traffic to leave site dc1")
            console.print(f"   meshxl site offline dc1: traffic on [bold]charlie[/] after "
                          f"{1000 * took:.0f} ms")
            await set_site_admin(client, keys, "dc1", offline=False)
            await client.delete_prefix(keys.base.encode())
        verdict = "[green]ok[/]" if failed == 0 else f"[red]{failed} failed requests[/]"
        console.print(f"\nquickstart done: {verdict}")
        return 0 if failed == 0 else 1
    finally:
        if envoy is not None:
            await envoy.stop()
        if plane is not None:
            await plane.stop()
        await owner.aclose()
        if work_dir is None:
            remove_if_empty(work)
