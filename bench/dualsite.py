"""Two sites over a WAN: what RPO 0 costs a write, and what losing a whole site costs.

Run (as root: network namespaces): ``.venv/bin/python bench/dualsite.py [--quick]
[--rtts 5,20,40] [--writes N] [--sessions N] [--link proxy|netem]``

Per round trip time, one dual-site bed (``meshxl.local.sites.DualSite``): sites east and
west with two members each (the sample counter app and its statesync sidecar), a
control-plane replica and an Envoy each, etcd 2 + 2 + 1 (a witness site), and a user-space
delay proxy on every cross-site path. RTT 0 is the same bed with every site in one place
(no proxy). Measured in the same run, per RTT:

* the link itself: a raw TCP round trip through it (``python -m meshxl.local.wan rtt``);
* a session write through an east sidecar (PUT, one at a time), beside a raw etcd put to
  east's own etcd member, with the etcd leader in east (near) and in west (far);
* a whole-site loss: sticky counter traffic on both sites, all of east blackholed at once
  (members, sidecars, Envoy, control-plane replica, both its etcd members), east's clients
  sent to west's Envoy. Twice: the etcd leader in east (an election is part of it), then,
  the bed healed, the leader in west. Acknowledged writes lost, RTO per east session
  (until west served it with its count), west's failed requests, the election's share;
* once, the same loss on a stretched cluster without a witness (etcd 2 + 2, RTT 20 ms):
  what it does when either site goes (no quorum: nothing is written until it is back).

Targets: 0 acknowledged writes lost, 0 failed requests on the surviving site, RTO max
under Maestro's published 60 s; a sidecar write within 1.5x of a raw etcd put over the
same links. Writes ``bench/results/dualsite.json``. Traffic stays inside the bed's
network namespaces; bounded in count and time; every process is killed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import Verdict, env_info, print_verdicts, quick_requested, write_results

from meshxl.local.netns import netem_unavailable
from meshxl.local.procs import Owner
from meshxl.local.siteloss import site_loss, write_latencies
from meshxl.local.sites import DualSite, unavailable

MAESTRO_RTO_S = 60.0
"""Maestro's published dual-site failover time (seconds)."""


async def stretched(rtt: float, sessions: int, window: float) -> dict[str, Any]:
    """The same loss on a stretched cluster without a witness (etcd 2 + 2): the
    surviving half has no quorum, so no session can be written until the site is back."""
    with tempfile.TemporaryDirectory(prefix="meshxl-dualsite-") as work:
        owner = Owner(Path(work), label="dualsite-stretched")
        async with DualSite(owner, rtt_ms=rtt, witness=False) as bed:
            await bed.move_leader("west")
            loss = (await site_loss(bed, "east", sessions, window=window)).as_dict()
    print(f"\nstretched 2 + 2 without a witness, RTT {rtt:g} ms, east lost: "
          f"{len(loss['unrecovered'])} of {len(loss['unrecovered']) + loss['rto']['count']} "
          f"east sessions never served again in {window:g} s, west failed "
          f"{loss['surviving_failed']} of {loss['surviving_requests']}, "
          f"{len(loss['unreadable'])} sessions ({loss['unverified_writes']} acknowledged "
          f"writes) could not be read back")
    return {"rtt_ms": rtt, "window_s": window, "loss": loss}


async def one_rtt(rtt: float, writes: int, sessions: int, losses: int,
                  link: str = "proxy") -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="meshxl-dualsite-") as work:
        owner = Owner(Path(work), label=f"dualsite-{rtt:g}")
        started = time.monotonic()
        async with DualSite(owner, rtt_ms=rtt, link=link) as bed:
            out: dict[str, Any] = {"rtt_ms": rtt, "link_kind": link,
                                   "start_s": round(time.monotonic() - started, 1)}
            out["link"] = await bed.link_rtt("east", "west")
            await bed.move_leader("east")
            out["writes_leader_near"] = await write_latencies(bed, "east", writes)
            await bed.move_leader("west")
            out["writes_leader_far"] = await write_latencies(bed, "east", writes)
            out["losses"] = []
            for i, leader in enumerate(("east", "west")[:losses]):
                if i:
                    await bed.heal()
                    await bed.wait_healthy(90)
                await bed.move_leader(leader)
                loss = await site_loss(bed, "east", sessions)
                out["losses"].append(loss.as_dict())
            _print(out)
            return out


def _print(r: dict[str, Any]) -> None:
    near, far, link = r["writes_leader_near"], r["writes_leader_far"], r["link"]
    print(f"\nRTT {r['rtt_ms']:g} ms (link p50 {link['p50_ms']} ms, bed up in {r['start_s']} s)")
    for name, w in (("leader near", near), ("leader far", far)):
        print(f"  write, {name}: sidecar p50 {w['sidecar_ms']['p50']} / p99 "
              f"{w['sidecar_ms']['p99']} ms; raw etcd p50 {w['raw_etcd_ms']['p50']} / p99 "
              f"{w['raw_etcd_ms']['p99']} ms; ratio {w['ratio_p50']}x")
    for loss in r["losses"]:
        rto = loss["rto"]
        print(f"  east lost (leader was in {loss['leader_before']}): RTO p50 {rto['p50']} / "
              f"p99 {rto['p99']} / max {rto['max']} ms over {rto['count']} sessions, "
              f"election {loss['election_s'] or 0:.2f} s, lost writes {loss['lost_writes']} "
              f"and {loss.get('unverified_writes', 0)} not read back "
              f"of {loss['acknowledged']}, west failed {loss['surviving_failed']} of "
              f"{loss['surviving_requests']}, unrecovered {len(loss['unrecovered'])}")


def verdicts(result: dict[str, Any]) -> list[Verdict]:
    out = []
    runs = [r for r in result["rtts"] if r["rtt_ms"] > 0]
    base = next((r for r in result["rtts"] if r["rtt_ms"] == 0), None)
    for r in runs:
        rtt = f"RTT {r['rtt_ms']:g} ms"
        losses = r["losses"]
        worst = max((loss["rto"]["max"] or 0) / 1000 for loss in losses) if losses else None
        unrecovered = sum(len(loss["unrecovered"]) for loss in losses)
        out += [
            Verdict(f"{rtt}: acknowledged writes lost in a site loss",
                    sum(loss["lost_writes"] for loss in losses), 0, "writes"),
            Verdict(f"{rtt}: acknowledged writes not read back after it",
                    sum(loss.get("unverified_writes", 0) for loss in losses), 0, "writes",
                    reference="sessions the surviving site could not read"),
            Verdict(f"{rtt}: failed requests on the surviving site",
                    sum(loss["surviving_failed"] for loss in losses), 0, "requests"),
            Verdict(f"{rtt}: sessions never served again", unrecovered, 0, "sessions"),
            Verdict(f"{rtt}: site-loss RTO, worst session", worst, MAESTRO_RTO_S, "s",
                    reference=f"Maestro publishes < {MAESTRO_RTO_S:g} s"),
        ]
        near = r["writes_leader_near"]
        ref = f"raw etcd put p50 {near['raw_etcd_ms']['p50']} ms over the same links"
        if base is not None:
            one_place = base["writes_leader_near"]["sidecar_ms"]["p50"]
            ref += f"; sites in one place: sidecar {one_place} ms"
        out.append(Verdict(f"{rtt}: sidecar write / raw etcd put (p50)", near["ratio_p50"],
                           1.5, "x", reference=ref))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rtts", default="5,20,40",
                        help="round trip times between the sites, ms (comma-separated)")
    parser.add_argument("--writes", type=int, default=300, help="writes per latency run")
    parser.add_argument("--sessions", type=int, default=12, help="sessions per site")
    parser.add_argument("--link", choices=("proxy", "netem"), default="proxy",
                        help="the user-space delay proxy (any kernel) or the kernel's netem "
                             "(where it has sch_netem)")
    args = parser.parse_args()
    reason = unavailable()
    if reason is not None:
        print(f"dualsite: {reason}", file=sys.stderr)
        return 2
    quick = quick_requested(args.quick)
    try:
        rtts = [0.0, *(float(x) for x in args.rtts.split(",") if x.strip())]
    except ValueError:
        parser.error(f"--rtts must be numbers, got {args.rtts!r}")
    if quick:
        rtts, writes, sessions, losses = [20.0], 30, 6, 1
    else:
        writes, sessions, losses = args.writes, args.sessions, 2
    if args.link == "netem" and (problem := netem_unavailable()) is not None:
        print(f"dualsite: --link netem: {problem}", file=sys.stderr)
        return 2
    print(f"dual site: RTTs {', '.join(f'{r:g}' for r in rtts)} ms, {writes} writes, "
          f"{sessions} sessions per site, {losses} site loss(es) per RTT")
    results = [asyncio.run(one_rtt(rtt, writes, sessions, 0 if rtt == 0 else losses,
                                   args.link)) for rtt in rtts]
    result: dict[str, Any] = {"rtts": results, "quick": quick}
    if not quick:
        result["stretched_without_witness"] = asyncio.run(stretched(20.0, sessions, 15.0))
    found = verdicts(result)
    print_verdicts("dualsite", found)
    path = write_results("dualsite", {"env": env_info(), **result}, found)
    print(f"\nwrote {path}")
    return 0 if all(v.met for v in found) else 1


if __name__ == "__main__":
    sys.exit(main())
