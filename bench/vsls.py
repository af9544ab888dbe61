"""Virtual systems (VSX VSLS): 60 VSs on one pool of 4 members, through real etcd, the
control plane and Envoy, under sticky load with state.

Run: ``.venv/bin/python bench/vsls.py [--quick] [--replication all] [--flood-rounds N]
[--writes-burst N] [--quota-wps N] [--output FILE]``
(``BENCH_QUICK=1``: quick, 12 VSs and short windows, no results file; ``--writes-burst``:
every VS's ``sessions.quota.writes_burst``, else the model's default; ``--quota-wps``:
every VS's ``sessions.quota.writes_per_second``, default 10). docs/vsls.md,
"Measured", reads it.

The bed (``bench/vsls_bed.py``): etcd, ``meshxl serve xds``, one Envoy, four pool
members on two sites; each member is the sample counter app beside ONE statesync
sidecar serving every VS of the pool (``meshxl serve statesync --pool web``; the app
takes each request's VS from its Host), so every acknowledged ``POST /counter`` is an
acknowledged write in statesync (without pool hosting in the checkout, echo members:
no state, and the write targets read NOT MEASURED). Each VS has a few sessions, each
sending one request at a time to ``VS.tenants.example`` through the pool's one listener,
for the whole run. The parts, in order, each its own window of that load:

* ``placement``: the busiest member's active weight over its fair share, from the live
  ``meshxl vs list --output json``, and as served (the member answering each VS);
* ``kill``: kill -9 of the busiest member (its app and sidecar): the VSs whose answering
  member changed must be exactly its own, each now on its standby; the other VSs
  answered by the same member with no failure; RTO per moved VS (kill -> first answer
  from its standby); then the member is started again and takes its roles back;
* ``join``: a fifth member started, then appended to the pool in the model
  (``apply_model``): active and standby roles moved over the ideal number (the new
  member's fair share of each), from ``meshxl vs list`` before and after, and as served;
* ``flood`` (with quotas in the checkout): one tenant, from a process of its own
  (``bench/vsls_flooder.py``), writes as fast as it can against its
  ``sessions.quota.writes_per_second`` (no pause, ``Retry-After`` ignored); the other
  tenants' write p99 in those windows over windows without it; windows alternate, a
  few seconds each, with windows of the tenant paced at its quota (reported beside),
  and each kind's p99 is the median of its windows' (the pooled p99s are reported);
* ``auth`` (with ``meshxl etcd grant`` in the checkout): an etcd with authentication on,
  per-VS users; one tenant's credentials reading another tenant's session: refused by
  etcd.

Acknowledged writes lost are counted over the whole run (a counter going back, and the
final read-back of every session). Loopback only; every load bounded in time and count;
every process killed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import (
    Verdict,
    print_verdicts,
    quick_requested,
    run_benchmark,
    stop_load,
    summary_ms,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vsls_bed import (  # noqa: E402
    Bed,
    Load,
    lost_writes,
    pool_hosting_available,
    read_back,
    served_by,
    vs_names,
)
from vsls_flooder import MAX_SPAN  # noqa: E402
from vsls_parts import (  # noqa: E402
    FLOODER_START,
    KINDS,
    auth_part,
    flood_part,
    join_moves,
    quotas_available,
    roles_of,
)

from meshxl.local.procs import Owner  # noqa: E402
from meshxl.local.wait import LocalError  # noqa: E402
from meshxl.stats import quantile  # noqa: E402

NAME = "vsls"
TARGET_SHARE = 1.1
TARGET_JOIN = 1.1
TARGET_FLOOD = 1.2
TARGET_REFUSALS = 2.0
"""The flood's refused writes a second over its quota, at most: its 8 writers each wait
for their answers, and a refusal's answer is held until a token would be there for it
(``hold_refused``), so they come back about as often as the quota mints tokens (the
window's edges and one per writer a second at most once each is held the longest)."""
TARGET_RTO_S = 1.0


@dataclass(frozen=True)
class Plan:
    vss: int
    members: int
    sessions_per_vs: int
    interval: float
    """Seconds between one session's requests."""
    steady: float
    """The placement window (seconds of load before the kill)."""
    after_kill: float
    join: float
    flood: float
    """Each of the flood part's windows (seconds)."""
    flood_rounds: int
    """Rounds of the flood part's windows: quiet, flood, at quota (vsls_parts.KINDS)."""
    quota_wps: int
    """Every VS's ``writes_per_second``, the rate the flooding tenant is held to. The full
    run's 10 is five times a tenant's own rate in the flood part (2 sessions writing once
    a second) and about a twelfth of the other tenants' writes together: a quota that
    leaves room for a tenant's bursts without letting it take the pool's capacity.
    docs/vsls.md ("Measured") shows how the other tenants' p99 follows the quota's share
    of the pool's writes (10, 20 and 40)."""
    quota_burst: int | None
    """Every VS's ``writes_burst`` (None: the model's default, one second's worth)."""
    replication: str
    """Every VS's ``sessions.replication``: ``narrow``, as docs/vsls.md advises for a pool
    (each VS's writes reach its active and its standby), or ``all``."""
    flood_interval: float
    """The other tenants' pause between requests in the flood part: a load the machine
    carries, so that the flood, not the load itself, is what the p99 shows."""


FULL = Plan(vss=60, members=4, sessions_per_vs=2, interval=0.25, steady=8.0, after_kill=10.0,
            join=10.0, flood=1.5, flood_rounds=24, quota_wps=10,
            quota_burst=None, flood_interval=1.0, replication="narrow")
QUICK = Plan(vss=12, members=4, sessions_per_vs=1, interval=0.2, steady=1.5, after_kill=3.0,
             join=2.0, flood=1.0, flood_rounds=2, quota_wps=10,
             quota_burst=None, flood_interval=0.5, replication="narrow")


def p(values: Sequence[float], q: float) -> float | None:
    v = quantile(list(values), q)
    return None if v is None else round(v, 3)


def share_of_served(served: Mapping[str, Mapping[str, int]], members: Sequence[str],
                    weights: Mapping[str, int]) -> dict[str, Any]:
    """Each VS's answering member (the one answering most), each member's weight of
    VSs so served, and the busiest over the mean (equal capacities)."""
    held = dict.fromkeys(members, 0)
    for vs, per in served.items():
        top = max(per.items(), key=lambda kv: kv[1])[0]
        held[top] = held.get(top, 0) + weights.get(vs, 1)
    mean = sum(held.values()) / len(members)
    return {"held": held, "ratio": round(max(held.values()) / mean, 3) if mean else None}


async def run(work: Path, plan: Plan, stateful: bool, quotas: bool) -> dict[str, Any]:
    owner = Owner(work, grace=2.0)
    vss = vs_names(plan.vss)
    bed = Bed(owner, vss, plan.members, stateful=stateful,
              quota_wps=plan.quota_wps if quotas and stateful else None,
              quota_burst=plan.quota_burst, replication=plan.replication)
    sessions = [(vs, f"s{k}") for vs in vss for k in range(plan.sessions_per_vs)]
    res: dict[str, Any] = {"plan": plan.__dict__, "stateful": stateful, "quotas": quotas}
    load: asyncio.Task[None] | None = None
    traffic: Load | None = None
    step = "starting the bed"
    try:
        t0 = time.perf_counter()
        await bed.start()
        res["start_s"] = round(time.perf_counter() - t0, 1)
        print(f"  bed up in {res['start_s']} s ({len(vss)} VSs, {plan.members} members, "
              f"{'app + pool sidecar' if stateful else 'echo'})", flush=True)
        budget = (plan.steady + plan.after_kill + plan.join + 3 * plan.flood_rounds * plan.flood
                  + 300)
        traffic = Load(bed.url, sessions, plan.interval, time.time() + budget,
                       max_requests=int(len(sessions) * budget / plan.interval),
                       stateful=stateful)
        load = asyncio.create_task(traffic.run())

        step = "placement"
        report = await bed.vs_list()
        roles = roles_of(report)
        weights = {v["name"]: v["weight"] for v in report["virtual_systems"]}
        members = [m["name"] for m in report["pools"][0]["members"]]
        start, checked = time.time(), await bed.health_checks()
        await asyncio.sleep(plan.steady)
        checks = (await bed.health_checks() - checked) / (time.time() - start)
        served = served_by(traffic.records, start + plan.interval * 2, time.time())
        steady = [(r.ended - r.sent) * 1000 for r in traffic.records
                  if r.ok and r.write and start <= r.sent < start + plan.steady]
        as_served = share_of_served(served, members, weights)
        mismatched = sorted(vs for vs, per in served.items()
                            if max(per.items(), key=lambda kv: kv[1])[0] != roles[vs][0])
        res["placement"] = {
            "members": report["pools"][0]["members"],
            "busiest_ratio": max(m["share_ratio"] for m in report["pools"][0]["members"]),
            "served": as_served, "served_not_by_active": mismatched,
            "unanswered_vss": sorted(set(vss) - set(served)),
            "write_ms": summary_ms(steady), "writes_per_s": round(len(steady) / plan.steady, 1),
            "health_checks_per_s": round(checks, 1)}
        print(f"  placement: {res['placement']['busiest_ratio']} (vs list), "
              f"{as_served['ratio']} (as served) {as_served['held']}", flush=True)

        step = "kill -9"
        res["kill"] = await kill_part(bed, traffic, roles, plan)
        print(f"  kill -9 {res['kill']['victim']}: {len(res['kill']['own'])} own VSs, "
              f"RTO {res['kill']['rto_s']}", flush=True)

        step = "join"
        res["join"] = await join_part(bed, traffic, report, plan)
        print(f"  join {res['join']['member']}: active {res['join']['active_moved']}, "
              f"standby {res['join']['standby_moved']} (ideal {res['join']['ideal']})",
              flush=True)

        step = "flood"
        res["flood"] = (await flood_part(bed, traffic, plan.flood, plan.flood_rounds,
                                         plan.quota_wps, plan.flood_interval)
                        if stateful and quotas else
                        {"skipped": "no per-VS quotas in this checkout" if stateful
                         else "no state (echo members)"})
        traffic.until = time.time()
        async with asyncio.timeout(30.0):
            await load
        step = "reading every session back"
        if stateful:
            final = await read_back(bed.url, sessions)
            res["lost"] = lost_writes(traffic.records, final)
            res["writes_acknowledged"] = sum(1 for r in traffic.records
                                             if r.write and r.ok)
        res["requests"] = len(traffic.records)
        res["failed"] = sum(1 for r in traffic.records if not r.ok)
        # Which VSs and answers: the flooding tenant's own sessions meet its quota too.
        failed_by: dict[str, dict[str, int]] = {}
        for r in traffic.records:
            if not r.ok:
                by = failed_by.setdefault(r.vs, {})
                by[str(r.status)] = by.get(str(r.status), 0) + 1
        res["failed_by_vs"] = dict(sorted(failed_by.items()))
        t0 = traffic.records[0].sent if traffic.records else 0.0
        res["failures_other_vss"] = [
            {"vs": r.vs, "at_s": round(r.sent - t0, 3), "took_s": round(r.ended - r.sent, 3),
             "status": r.status, "member": r.member, "error": r.error}
            for r in traffic.records if not r.ok and r.vs != vss[0]][:20]
        step = "auth"
        res["auth"] = await auth_part(owner, vss)
    except (LocalError, TimeoutError, OSError, KeyError, ValueError) as exc:
        traceback.print_exc()
        raise SystemExit(f"vsls: failed at {step}: {exc!r}\n{owner.report()}") from None
    finally:
        await stop_load(load, traffic)
        await owner.aclose()
    return res


async def kill_part(bed: Bed, traffic: Load, roles: Mapping[str, tuple[str, str]],
                    plan: Plan) -> dict[str, Any]:
    held: dict[str, list[str]] = {}
    for vs, (active, _) in roles.items():
        held.setdefault(active, []).append(vs)
    victim = bed.member(max(held, key=lambda m: (len(held[m]), m)))
    own = sorted(held[victim.name])
    killed = bed.kill9(victim)
    await asyncio.sleep(plan.after_kill)
    ended = time.time()
    after = [r for r in traffic.records if killed <= r.sent < ended or
             (r.sent < killed <= r.ended)]
    others = [r for r in after if r.vs not in own]
    changed = sorted({r.vs for r in after if r.ok and r.member != roles[r.vs][0]})
    # an answer of the victim's own, on its way as it died, is neither
    not_standby = sorted({r.vs for r in after if r.vs in own and r.ok and
                          r.member not in (roles[r.vs][1], victim.name)})
    rto: dict[str, float | None] = {}
    for vs in own:
        firsts = [r.ended for r in after if r.vs == vs and r.ok and r.member == roles[vs][1]]
        rto[vs] = round(min(firsts) - killed, 3) if firsts else None
    # a VS never answered by its standby in the window counts as the whole window
    measured = [plan.after_kill if v is None else v for v in rto.values()]
    out = {"victim": victim.name, "own": own, "requests_other_vss": len(others),
           "failed_other_vss": sum(1 for r in others if not r.ok),
           "moved_vss": changed, "moved_not_own": sorted(set(changed) - set(own)),
           "own_not_on_standby": not_standby,
           "failed_own_vss": sum(1 for r in after if r.vs in own and not r.ok),
           "rto_per_vs_s": rto, "rto_unmeasured": sorted(v for v, t in rto.items() if t is None),
           "rto_s": {"p50": p(measured, 0.5), "p99": p(measured, 0.99),
                     "max": max(measured) if measured else None}}
    await bed.reap(victim)
    t0 = time.time()
    await bed.start_member(victim)
    await bed.wait_hosts(lambda hs: sum(1 for h in hs if h.healthy) == len(bed.members),
                         f"{victim.name} healthy again in every VS")
    out["back_s"] = round(time.time() - t0, 2)
    return out


async def join_part(bed: Bed, traffic: Load, before: Mapping[str, Any],
                    plan: Plan) -> dict[str, Any]:
    new = await bed.add_member()  # started; then appended to the pool in the model
    applied = time.time()
    await bed.apply(bed.model())
    await bed.wait_hosts(lambda hs: len(hs) == len(bed.members) and
                         all(h.healthy for h in hs), f"{new.name} in every VS")
    after = await bed.vs_list()
    await asyncio.sleep(plan.join)
    ended = time.time()
    a = roles_of(after)
    moves = join_moves(before, after, new.name)
    window = [r for r in traffic.records if applied <= r.sent < ended]
    settled = served_by(traffic.records, ended - plan.join / 2, ended)
    on_new = sorted(vs for vs, per in settled.items()
                    if max(per.items(), key=lambda kv: kv[1])[0] == new.name)
    moved = moves.pop("active_moved_vss")
    return {"member": new.name, **moves,
            "served_by_new": on_new, "served_by_new_as_placed": on_new == sorted(
                vs for vs in moved if a[vs][0] == new.name),
            "requests": len(window), "failed": sum(1 for r in window if not r.ok)}


# -- verdicts and the report ----------------------------------------------------------------


def verdicts(res: Mapping[str, Any]) -> list[Verdict]:
    out: list[Verdict] = []
    pl, k, j = res["placement"], res["kill"], res["join"]
    out.append(Verdict("busiest member's active share / fair share (vs list)",
                       pl["busiest_ratio"], TARGET_SHARE, "x",
                       reference=f"as served {pl['served']['ratio']}x"))
    out.append(Verdict("busiest member's active share / mean (as served)",
                       pl["served"]["ratio"], TARGET_SHARE, "x",
                       reference=f"held {pl['served']['held']}"))
    out.append(Verdict("kill -9: VSs moved that were not its own", len(k["moved_not_own"]),
                       0, "VSs", reference=f"{len(k['own'])} own, "
                       f"{len(k['own_not_on_standby'])} of them not on their standby"))
    out.append(Verdict("kill -9: failed requests on the other VSs", k["failed_other_vss"], 0,
                       "requests", reference=f"of {k['requests_other_vss']}; own VSs "
                       f"{k['failed_own_vss']} failed"))
    rto = k["rto_s"]
    out.append(Verdict("kill -9: RTO per moved VS (kill -> standby answers), p99",
                       rto["p99"], TARGET_RTO_S, "s",
                       reference=f"p50 {rto['p50']} s, max {rto['max']} s over "
                       f"{len(k['own'])} VSs, {len(k['rto_unmeasured'])} never answered",
                       note="issue 41 asks for it reported; the bound is docs/vsls.md's "
                            "'within a second'"))
    lost = res.get("lost")
    out.append(Verdict("acknowledged writes lost (whole run)", lost, 0, "writes",
                       reference=f"{res.get('writes_acknowledged', 0)} acknowledged",
                       note="" if lost is not None else "no state: echo members"))
    out.append(Verdict("join: active roles moved / ideal", j["active_ratio"], TARGET_JOIN,
                       "x", reference=f"{j['active_moved']} moved, ideal {j['ideal']}"))
    forced = j.get("standby_site_forced", 0)
    out.append(Verdict("join: standby roles moved / ideal (site rule's apart)",
                       j["standby_ratio"], TARGET_JOIN, "x",
                       reference=f"{j['standby_moved'] - forced} moved, ideal "
                                 f"{j.get('standby_ideal')}; {forced} sent across by the "
                                 f"site rule"))
    out.append(Verdict("join: roles moved (active + standby) / ideal", j["roles_ratio"],
                       TARGET_JOIN, "x",
                       reference=f"{j['active_moved'] + j['standby_moved'] - forced} of "
                                 f"{j['ideal']} + {j.get('standby_ideal')}"))
    fl = res.get("flood") or {}
    out.append(Verdict("flood at quota: other tenants' write p99 ratio", fl.get("ratio"),
                       TARGET_FLOOD, "x", reference=fl.get("reference", ""),
                       note=fl.get("skipped", "")))
    refusals = fl.get("refused_per_s")
    out.append(Verdict("flood past quota: refused writes a second / quota",
                       None if refusals is None or not fl.get("quota_wps")
                       else round(refusals / fl["quota_wps"], 2), TARGET_REFUSALS, "x",
                       reference=f"{refusals}/s refused, quota {fl.get('quota_wps')}/s",
                       note=fl.get("skipped", "") or "held answers: refusals come back "
                       "about as often as the quota mints tokens"))
    same = fl.get("same_member_ratio")
    out.append(Verdict("flood at quota: write p99 ratio, tenants on its member", same,
                       TARGET_FLOOD, "x", reference=fl.get("same_member_reference", ""),
                       note=fl.get("skipped", "") or "the tenants whose active shares the "
                       "flooder's sidecar process"))
    au = res.get("auth") or {}
    out.append(Verdict("cross-tenant session reads not refused by etcd",
                       au.get("not_refused"), 0, "reads", reference=au.get("reference", ""),
                       note=au.get("skipped", "")))
    return out


def print_report(res: Mapping[str, Any], verdict_list: Sequence[Verdict]) -> None:
    pl, k, j = res["placement"], res["kill"], res["join"]
    plan = res["plan"]
    print(f"\n== {plan['vss']} VSs on {plan['members']} members "
          f"({'app + one pool sidecar each' if res['stateful'] else 'echo members'}), "
          f"{plan['sessions_per_vs']} sessions per VS; {res['requests']} requests, "
          f"{res['failed']} failed")
    print("  members (vs list): " + ", ".join(
        f"{m['name']} {m['active']}a/{m['standby']}s ({m['share_ratio']}x)"
        for m in pl["members"]))
    print(f"  steady: {pl['writes_per_s']} writes/s, write p50 {pl['write_ms']['p50']} ms "
          f"p99 {pl['write_ms']['p99']} ms; Envoy health checks {pl['health_checks_per_s']}/s")
    print(f"  kill -9 {k['victim']}: own {len(k['own'])} VSs, moved {len(k['moved_vss'])}, "
          f"RTO p50 {k['rto_s']['p50']} s p99 {k['rto_s']['p99']} s max {k['rto_s']['max']} s;"
          f" back in {k['back_s']} s")
    print(f"  join {j['member']}: {j['active_moved']} active (ideal {j['ideal']}), "
          f"{j['standby_moved']} standby roles moved ({j['standby_site_forced']} by the site "
          f"rule; ideal {j['standby_ideal']}); {j['failed']} of {j['requests']} failed")
    fl = res.get("flood") or {}
    if "ratio" in fl:
        print(f"  flood: {fl['reference']}")
        print("  flood, CPU cores by window: " + "; ".join(
            f"{kind} " + ", ".join(f"{n} {v}" for n, v in used.items())
            for kind, used in fl["cpu_cores"].items()))
    au = res.get("auth") or {}
    if "reference" in au:
        print(f"  auth: {au['reference']}")
    print_verdicts("virtual systems", verdict_list)


def _whole(low: int, high: int, what: str) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high``, else an error naming
    ``what`` it should be."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} from {low} to {high}")
        return value
    return parse


_rounds = _whole(1, 200, "a number of rounds")
_quota = _whole(1, 1000, "a rate in writes a second")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="12 VSs, short windows (about 40 s); writes no results file")
    parser.add_argument("--output", type=Path,
                        help="also write the results here (JSON; the quick run's only file)")
    parser.add_argument("--replication", choices=("narrow", "all"), default="narrow",
                        help="every VS's sessions.replication (default: narrow, as "
                             "docs/vsls.md advises for a pool)")
    parser.add_argument("--flood-rounds", type=_rounds, metavar="N",
                        help="rounds of the flood part's three windows, 1 to 200 "
                             "(default: 24; quick: 2)")
    parser.add_argument("--quota-wps", type=_quota, metavar="N",
                        help="every VS's sessions.quota.writes_per_second, the rate the "
                             "flooding tenant is held to, 1 to 1000 (default: 10)")
    parser.add_argument("--writes-burst", type=int, metavar="N",
                        help="every VS's sessions.quota.writes_burst (default: the model's, "
                             "one second's worth of its writes_per_second)")
    args = parser.parse_args(argv)
    quick = quick_requested(args.quick)
    plan = dataclasses.replace(QUICK if quick else FULL, quota_burst=args.writes_burst,
                               replication=args.replication)
    if args.flood_rounds is not None:
        plan = dataclasses.replace(plan, flood_rounds=args.flood_rounds)
    if args.quota_wps is not None:
        plan = dataclasses.replace(plan, quota_wps=args.quota_wps)
    span = FLOODER_START + plan.flood_rounds * len(KINDS) * plan.flood
    if span > MAX_SPAN:
        parser.error(f"--flood-rounds {plan.flood_rounds}: the flood part would last "
                     f"{span:.0f} s, past the flooder's {MAX_SPAN:g} s")
    stateful = pool_hosting_available()
    return run_benchmark(NAME, quick, "meshxl-bench-vsls-",
                         lambda work: run(work, plan, stateful, quotas_available()),
                         verdicts, print_report, write=not quick, output=args.output)


if __name__ == "__main__":
    sys.exit(main())
