"""What two sites cost and survive, measured on the dual-site bed
(:class:`meshxl.local.sites.DualSite`): ``bench/dualsite.py`` and the tests use these.

* :func:`write_latencies`: a session write through a sidecar of one site (``PUT``, one
  at a time), beside a raw etcd put from the same place over the same links;
* :func:`site_loss`: sticky counter traffic on both sites, then one whole site
  blackholed at once; its clients go to the other site's Envoy. Measured: acknowledged
  writes lost, per lost-site session the time until the surviving site served it with
  its state (RTO), the surviving site's own failed requests, and how long etcd went
  without a leader (the election's share).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from meshxl.local.report import distribution, last_acknowledged, lost_writes
from meshxl.local.sites import PIN, SITES, DualSite, etcd_timings
from meshxl.local.traffic import Record, Traffic, read_back

__all__ = ["SiteLoss", "site_loss", "write_latencies"]


async def write_latencies(bed: DualSite, site: str = "east", count: int = 200,
                          limit: float = 60.0) -> dict[str, Any]:
    """``count`` session writes through a sidecar of ``site``, then ``count`` raw etcd
    puts to the site's own etcd member (its client's nearest), one at a time: their
    latency distributions (ms) and the ratio of the medians."""
    import aetcd

    from meshxl.client import AsyncClient

    member = next(m for m in bed.site_members if m.site == site)
    sidecar: list[float] = []
    raw: list[float] = []
    deadline = time.monotonic() + limit
    async with AsyncClient(bed.sidecar_url(member), token=bed.token) as client:
        for i in range(count):
            if time.monotonic() > deadline:
                break
            started = time.perf_counter()
            await client.put(f"latency-{site}-{i % 16}", {"n": i})
            sidecar.append((time.perf_counter() - started) * 1e3)
    etcd_member = next(m for m in bed.etcd_members if m.site == site)
    host, port = bed.etcd_url(etcd_member).removeprefix("http://").rsplit(":", 1)
    async with aetcd.Client(host=host, port=int(port), timeout=10) as client:
        for i in range(count):
            if time.monotonic() > deadline:
                break
            started = time.perf_counter()
            await client.put(f"/meshxl-latency/{site}/{i % 16}".encode(), b'{"n": 1}')
            raw.append((time.perf_counter() - started) * 1e3)
    mine, theirs = distribution(sidecar), distribution(raw)
    ratio = (round(mine["p50"] / theirs["p50"], 2) if mine.get("p50") and theirs.get("p50")
             else None)
    return {"sidecar_ms": mine, "raw_etcd_ms": theirs, "ratio_p50": ratio}


@dataclass
class SiteLoss:
    """One whole-site loss, as the clients saw it."""

    lost: str
    leader_before: str | None
    blackholed_at: float
    elected_after_s: float | None
    """Until a member outside the lost site reported a leader (0: the leader was not in
    the lost site; None: none within the window)."""
    rto_ms: list[float] = field(default_factory=list)
    unrecovered: list[str] = field(default_factory=list)
    lost_writes: dict[str, int] = field(default_factory=dict)
    """Per session read back after the loss with a count short of its last
    acknowledged one: the writes missing."""
    unverified_writes: dict[str, int] = field(default_factory=dict)
    """Per session that could not be read back at all: its acknowledged writes,
    which nothing shows survived (nor lost: the store may have them and not answer)."""
    acknowledged: int = 0
    surviving_failed: int = 0
    surviving_requests: int = 0
    unreadable: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"lost_site": self.lost, "leader_before": self.leader_before,
                "election_s": self.elected_after_s, "rto": distribution(self.rto_ms),
                "unrecovered": self.unrecovered, "lost_writes": sum(self.lost_writes.values()),
                "lost_sessions": sorted(self.lost_writes),
                "unverified_writes": sum(self.unverified_writes.values()),
                "acknowledged": self.acknowledged,
                "surviving_failed": self.surviving_failed,
                "surviving_requests": self.surviving_requests,
                "unreadable": self.unreadable}


def _rto(records: list[Record], at: float,
         surviving: set[str]) -> tuple[list[float], list[str]]:
    """Per session served before ``at``: until its first success after ``at`` served by
    a member in ``surviving`` with its state (the count went on, not back to 1)."""
    before: dict[str, int] = {}
    after: dict[str, Record] = {}
    for r in sorted(records, key=lambda r: r.ended):
        if not r.ok or r.seq is None:
            continue
        if r.ended <= at:
            before[r.session] = r.seq
        elif (r.sent >= at and r.member in surviving and r.session not in after
              and r.seq > before.get(r.session, 0)):
            after[r.session] = r
    rto = [(after[s].ended - at) * 1e3 for s in sorted(before) if s in after]
    return rto, [s for s in sorted(before) if s not in after]


async def site_loss(bed: DualSite, lost: str = "east", sessions: int = 8,
                    warmup: float = 3.0, window: float = 30.0) -> SiteLoss:
    """Counter traffic on both sites (``sessions`` each, pinned), ``warmup`` seconds,
    then ``lost`` blackholed whole; its clients go to the other site's Envoy at once
    (the clients' own switch, a DNS or GSLB failover, is not measured here). Ends when
    every lost-site session was served again, or after ``window``."""
    surviving = next(s for s in SITES if s != lost)
    members = {m.name for m in bed.site_members if m.site == surviving}
    until = time.time() + warmup + window + 5
    # A write of the surviving site waits for the election of a new etcd leader when
    # the lost site had it: the clients wait longer than an election can take (etcd
    # draws each round's timeout from [T, 2T); two rounds and the commit), so what
    # they count as failed is meshxl's, not their own impatience.
    _, election_ms = etcd_timings(bed.rtt_ms)
    patience = max(5.0, 5 * election_ms / 1000 + 3)
    traffic = {site: Traffic(bed.counter_url(site), sessions, until, max_requests=50_000,
                             prefix=f"{site[0]}-", pin_header=PIN, request_timeout=patience)
               for site in SITES}
    runs = [asyncio.create_task(t.run()) for t in traffic.values()]
    try:
        await asyncio.sleep(warmup)
        leader_before = await bed.leader_site()
        at = await bed.blackhole(lost)
        traffic[lost].redirect(bed.counter_url(surviving))
        elected: float | None = 0.0 if leader_before != lost else None
        deadline = at + window
        while time.time() < deadline:
            if elected is None and await bed.leader_site(exclude=lost) not in (None, lost):
                elected = time.time() - at
            rto, missing = _rto(traffic[lost].records, at, members)
            if not missing and elected is not None:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # a little of the traffic after, for the counts
    finally:
        for t in traffic.values():
            t.until = time.time()
        await asyncio.gather(*runs, return_exceptions=True)
    records = [r for t in traffic.values() for r in t.records]
    final, reads = await read_back(bed.counter_url(surviving), [*traffic[lost].sessions,
                                                        *traffic[surviving].sessions])
    rto, missing = _rto(traffic[lost].records, at, members)
    window_records = [r for r in traffic[surviving].records if r.sent >= at]
    unreadable = sorted(r.session for r in reads if not r.ok)
    short = lost_writes(records, final)
    return SiteLoss(
        lost=lost, leader_before=leader_before, blackholed_at=at, elected_after_s=elected,
        rto_ms=rto, unrecovered=missing,
        lost_writes={s: n for s, n in short.items() if s not in unreadable},
        unverified_writes={s: n for s, n in short.items() if s in unreadable},
        acknowledged=sum(last_acknowledged(records).values()),
        surviving_failed=sum(not r.ok for r in window_records),
        surviving_requests=len(window_records), unreadable=unreadable)
