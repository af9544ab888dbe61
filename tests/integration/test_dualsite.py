"""Two sites and a witness over a 20 ms WAN (the dual-site bed, ``meshxl.local.sites``):
real etcd 2 + 2 + 1, a control-plane replica, two members and an Envoy per site, a
user-space delay proxy on every cross-site path. One bed, in order:

* the link is what it claims (a raw TCP round trip through it);
* each site's Envoy prefers its own members (``site_affinity: local``), and ``meshxl
  verify`` expects each Envoy's own site view;
* ``meshxl drill --site east`` under traffic on both sites passes, its data check reads
  every session written before and during the drill back through west's sidecars;
* RPO 0 has its price: a session write waits for a cross-site round trip;
* all of east (and the etcd leader with it) is blackholed at once: no acknowledged write
  is lost, every east session is served again by west with its count, west's own
  clients see no failure; the benchmark's verdicts (``bench/dualsite.py``, whose quick
  mode this is) hold.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meshxl import etcd
from meshxl.local.netns import netem_unavailable
from meshxl.local.procs import Owner
from meshxl.local.siteloss import site_loss, write_latencies
from meshxl.local.sites import DualSite, unavailable
from meshxl.local.traffic import Traffic
from meshxl.local.wait import LocalError, wait_until
from meshxl.operator.drill import PASSED, DrillConfig, run_drill

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import dualsite  # noqa: E402

from tests.harness.load import under_way

pytestmark = [pytest.mark.integration, pytest.mark.heavy]

RTT_MS = 20.0


async def sidecar_status(url: str, token: str) -> dict[str, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http, \
            http.get(f"{url}/v1/status", headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 200, await r.text()
        status: dict[str, Any] = await r.json()
        return status


async def test_two_sites_over_a_wan(harness: Owner, tmp_path: Path) -> None:
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"the dual-site bed needs network namespaces: {reason}")
    async with DualSite(harness, rtt_ms=RTT_MS) as bed:
        link = await bed.link_rtt("east", "west")
        assert RTT_MS <= link["p50_ms"] < RTT_MS + 30, link

        # Each sidecar uses an etcd member of its own site (the nearest).
        async def near_members() -> bool:
            for m in bed.site_members:
                status = await sidecar_status(bed.sidecar_url(m), bed.token)
                (current,) = [e for e in status["etcd_members"] if e["current"]]
                if not current["endpoint"].startswith(f"{bed.ip(m.site)}:"):
                    return False
            return True

        await wait_until(near_members, timeout=15, what="every sidecar on a near etcd member")

        # Each Envoy: its own site's members in tier 0, the other site's in tier 1 (once
        # every member is in: one that restarted its lease while the bed started is held
        # below its tier until it has caught up, as any returning member).
        async def own_site_first() -> dict[str, dict[str, int]] | None:
            seen = {}
            for site, other in (("east", "west"), ("west", "east")):
                tiers = {h.hostname: h.priority for h in await bed.hosts(site)}
                seen[site] = tiers
                if {p for n, p in tiers.items() if n.startswith(site[0])} != {0} or \
                        {p for n, p in tiers.items() if n.startswith(other[0])} != {1}:
                    return None
            return seen

        async def both_tiers() -> dict[str, dict[str, int]]:
            return {s: {h.hostname: h.priority for h in await bed.hosts(s)}
                    for s in ("east", "west")}

        await wait_until(own_site_first, timeout=20, what="each site's members first in its "
                         "Envoy", explain=both_tiers)

        # The drill, under traffic on both sites, with the data check through west.
        west_sidecars = [bed.sidecar_url(m) for m in bed.site_members if m.site == "west"]
        traffic = [Traffic(bed.counter_url(s), 4, float("inf"), 5_000, prefix=f"d{s[0]}-",
                           pin_header="x-meshxl-pin") for s in ("east", "west")]
        runs = [asyncio.create_task(t.run()) for t in traffic]
        try:
            for t in traffic:
                await under_way(lambda t=t: t.records, 20)
            cfg = DrillConfig(site="east", output_dir=tmp_path / "drill", duration=2.0,
                              envoy_admin=[bed.envoy_admin(s) for s in ("east", "west")],
                              check_sidecars=west_sidecars, sidecar_token=bed.token,
                              converge_timeout=20)
            async with etcd.client(",".join(bed.etcd_urls("east")), timeout=10) as client:
                code, report = await run_drill(client, bed.keys, cfg, say=print)
        finally:
            for t in traffic:
                t.until = 0
            await asyncio.gather(*runs)
        assert code == PASSED, report
        assert [r["ok"] for r in report["data"]] == [True, True], report["data"]
        data = report["data"][0]
        assert data["sessions"] >= 8 and data["matched"] == data["sessions"], data
        assert data["written_during"] > 0, data
        assert report["traffic"]["failed_requests"] == 0, report["traffic"]
        assert "Data check through w1" in (tmp_path / "drill" / "drill.md").read_text()

        # Synchronous replication: a write waits for the other site.
        await bed.move_leader("east")
        writes = await write_latencies(bed, "east", count=20)
        assert writes["sidecar_ms"]["p50"] >= link["min_ms"], writes

        # The whole of east, the etcd leader with it, gone at once.
        loss = await site_loss(bed, "east", sessions=6, window=30)
        result = loss.as_dict()
        assert loss.leader_before == "east" and loss.elected_after_s, result
        assert loss.lost_writes == {} and loss.unverified_writes == {}, result
        assert loss.acknowledged > 0, result
        assert loss.unrecovered == [] and len(loss.rto_ms) == 6, result
        assert loss.surviving_failed == 0 and not loss.unreadable, result

    measured = {"rtt_ms": RTT_MS, "link": link, "writes_leader_near": writes,
                "losses": [result]}
    verdicts = dualsite.verdicts({"rtts": [measured]})
    # What nothing may lose (writes, reads, requests, sessions) holds here; how fast (the
    # site-loss RTO, a write against a raw etcd put) is bench/dualsite.py's to say.
    lossless = [v for v in verdicts if v.unit in ("writes", "requests", "sessions")]
    assert len(lossless) == 4 and all(v.met for v in lossless), [v.line() for v in verdicts]


async def test_the_kernels_netem_is_used_only_where_it_exists(harness: Owner) -> None:
    """``link: netem`` asks for the kernel's delay: where the kernel lacks sch_netem
    (this machine's), the bed refuses at once, saying so, rather than measuring a link
    with no delay."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"the dual-site bed needs network namespaces: {reason}")
    problem = netem_unavailable()
    if problem is None:
        async with DualSite(harness, rtt_ms=RTT_MS, link="netem") as bed:
            link = await bed.link_rtt("east", "west")
            assert RTT_MS <= link["p50_ms"] < RTT_MS + 30, link
        return
    with pytest.raises(LocalError, match="link netem: the kernel has no netem"):
        await DualSite(harness, rtt_ms=RTT_MS, link="netem").start()
