"""``make soak``: a long run with a failover every ``--interval`` seconds under steady load.

Run: ``.venv/bin/python bench/soak.py [--duration 600] [--interval 30] [--output FILE]``

One local deployment (``meshxl.local.deployment.DemoDeployment``: etcd, the control
plane, three members (the counter app plus its statesync sidecar each) and Envoy, all
on loopback) carries ``--sessions`` sticky sessions through Envoy for ``--duration``
seconds, one request at a time per session, every request a read and an acknowledged
write of the session's counter. Every ``--interval`` seconds the member serving the
traffic is killed with SIGKILL (app and sidecar); once Envoy has failed its sessions
over, the member is started again, so the next cycle finds all three members back.

Meanwhile the resident memory of every process is sampled. At the end every session is
read back, and the report (JSON on stdout and in ``--output``) gives:

* ``lost_writes``: acknowledged writes missing from the read-back (must be 0);
* ``failed_requests`` and what they were, per failover and in total;
* ``memory``: per process, RSS samples over time; for every meshxl process and Envoy
  that lived through the whole run (the control plane, Envoy, the members never
  killed: those that take the sessions over at every failover), the median RSS of the
  last third of the samples after ``--warmup`` against the first third. A process grew
  when it gained more than ``--max-growth`` (10 %) *and* more than ``--min-growth-mib``
  (4 MiB): both, so neither the noise of a small process nor a few pages of a large
  one count. etcd's memory is reported but not judged: it keeps every revision's
  history until its next compaction (the local etcd compacts to the last
  ``--etcd-retention`` revisions every 5 minutes, as etcd's revision mode does), which
  is etcd's and not meshxl's.

Exit status: 0 when no write was lost and no process grew; 1 otherwise; 2 when the run
itself could not be carried out (a member that did not come back, for example).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshxl import etcd
from meshxl.local.deployment import CLUSTER, MODES, DemoDeployment, envoy_hosts, healthy_host
from meshxl.local.procs import Owner
from meshxl.local.report import failure_kinds, lost_writes
from meshxl.local.servers import HOST
from meshxl.local.servers import start_etcd as start_local_etcd
from meshxl.local.traffic import REQUEST_INTERVAL, Record, Traffic, read_back
from meshxl.local.wait import LocalError, wait_until
from meshxl.stats import quantile, rss_bytes

NOT_JUDGED = {"etcd": "etcd's own memory (revision history until compaction), not meshxl's"}
MIB = 1024 * 1024
STEP_TIMEOUT = 30.0
"""Longest wait for one step of a failover cycle (failed over, member back)."""


class SoakError(RuntimeError):
    """The run could not go on (a member that did not come back, a dead process)."""


async def start_etcd(stack: Owner, retention: int) -> str:
    """A single-member etcd that compacts its history to the last ``retention`` revisions."""
    url, _ = await start_local_etcd(stack, extra=[
        "--auto-compaction-mode", "revision", "--auto-compaction-retention", str(retention)])
    return url


# -- memory -------------------------------------------------------------------------------


@dataclass
class Series:
    """RSS samples of one process incarnation: (seconds since start, bytes)."""

    name: str
    pid: int
    samples: list[tuple[float, int]] = field(default_factory=list)


def processes(d: DemoDeployment, stack: Owner | None) -> dict[str, int]:
    """Every process of the run by name: etcd (if ours), control plane, Envoy, members."""
    found: dict[str, int] = {}
    if stack is not None:
        for proc in stack.processes:
            if proc.name == "etcd" and proc.running and proc.pid is not None:
                found["etcd"] = proc.pid
    for replica in d.replicas:
        if replica.process is not None and replica.process.pid is not None:
            found[replica.name] = replica.process.pid
    if d.envoy is not None and d.envoy.pid is not None:
        found["envoy"] = d.envoy.pid
    for m in d.members:
        for member_proc in (m.app, m.sidecar):
            if (member_proc is not None and member_proc.running
                    and member_proc.pid is not None):
                found[member_proc.name] = member_proc.pid
    return found


class Sampler:
    """Samples the RSS of every process of the deployment, each incarnation apart."""

    def __init__(self, d: DemoDeployment, stack: Owner | None, started: float):
        self.d = d
        self.stack = stack
        self.started = started
        self.series: dict[tuple[str, int], Series] = {}

    def sample(self) -> None:
        at = round(time.time() - self.started, 2)
        for name, pid in processes(self.d, self.stack).items():
            rss = rss_bytes(pid)
            if rss is not None:
                self.series.setdefault((name, pid), Series(name, pid)).samples.append((at, rss))


def _median(values: Sequence[int]) -> float:
    """The p50 of :func:`meshxl.stats.quantile` (nearest rank, a sampled RSS)."""
    value = quantile(values, 0.5)
    assert value is not None, "a median of no samples"
    return value


def flatness(series: Series, *, warmup: float, end: float, max_growth: float,
             min_growth: int) -> dict[str, Any]:
    """Judge one process incarnation: median RSS of the last third of its samples after
    ``warmup`` against the first third. Only one that lived through the whole run
    (sampled from before ``warmup`` to within a sampling gap of ``end``) is judged."""
    out: dict[str, Any] = {"name": series.name, "pid": series.pid,
                           "samples": len(series.samples)}
    if not series.samples:
        return {**out, "judged": False, "why": "no samples"}
    judge = series.name not in NOT_JUDGED
    first_at, last_at = series.samples[0][0], series.samples[-1][0]
    out.update(first_s=first_at, last_s=last_at,
               rss_mib={"min": round(min(b for _, b in series.samples) / MIB, 1),
                        "max": round(max(b for _, b in series.samples) / MIB, 1)})
    after = [b for t, b in series.samples if t >= warmup]
    if after:
        third = max(1, len(after) // 3)
        out.update(early_mib=round(_median(after[:third]) / MIB, 2),
                   late_mib=round(_median(after[-third:]) / MIB, 2))
    if not judge:
        return {**out, "judged": False, "why": NOT_JUDGED[series.name]}
    if first_at > warmup or last_at < end * 0.95:
        return {**out, "judged": False, "why": "did not live through the whole run"}
    if len(after) < 6:
        return {**out, "judged": False, "why": "fewer than 6 samples after the warm-up"}
    third = len(after) // 3
    early, late = _median(after[:third]), _median(after[-third:])
    growth = (late - early) / early
    grew = growth > max_growth and late - early > min_growth
    return {**out, "judged": True, "early_mib": round(early / MIB, 2),
            "late_mib": round(late / MIB, 2), "growth_pct": round(growth * 100, 2),
            "growth_mib": round((late - early) / MIB, 2), "grew": grew}


# -- the run --------------------------------------------------------------------------------


@dataclass
class Failover:
    member: str
    killed_s: float
    failed_over_s: float | None = None
    """Envoy no longer sends the member traffic (its host gone or unhealthy)."""
    back_s: float | None = None
    """The member restarted and healthy in Envoy again."""
    failed_requests: int = 0


def serving_member(records: Sequence[Record], since: float) -> str | None:
    """The member that acknowledged the most writes since ``since``."""
    served = collections.Counter(r.member for r in records
                                 if r.ok and r.member is not None and r.ended >= since)
    return served.most_common(1)[0][0] if served else None


async def wait_step(predicate: Any, what: str, timeout: float = STEP_TIMEOUT) -> None:
    """The deployment's own wait, with the soak's error (the run broke, exit 2)."""
    try:
        await wait_until(predicate, timeout=timeout, what=what)
    except LocalError as exc:
        raise SoakError(str(exc)) from exc


async def failover(d: DemoDeployment, traffic: Traffic, started: float) -> Failover:
    """kill -9 the serving member, wait until Envoy moved off it, start it again."""
    victim = serving_member(traffic.records, time.time() - 2.0) or d.members[0].name
    m = d.member(victim)
    address = (HOST, m.app_port)
    killed = await d.kill_member(victim)
    record = Failover(victim, round(killed - started, 2))
    await d.reap_member(victim)

    async def moved_off() -> bool:
        for host in await envoy_hosts(d.admin_url):
            if (host.address, host.port) == address and healthy_host(host):
                return False
        return True

    await wait_step(moved_off, f"Envoy to stop sending {victim} traffic")
    record.failed_over_s = round(time.time() - started, 2)

    async def registration_gone() -> bool:
        async with etcd.client(d.etcd_url, timeout=2) as client:
            return await client.get(d.keys.member(CLUSTER, victim).encode()) is None

    # Until its lease ended: a member restarted before that would take its old
    # registration's place without the control plane ever seeing it leave.
    await wait_step(registration_gone, f"{victim}'s lease to end")
    try:
        await d.start_member(m)
    except LocalError as exc:
        raise SoakError(f"member {victim} did not come back: {exc}") from exc
    await wait_step(d.all_healthy, f"Envoy to see {victim} healthy again")
    record.back_s = round(time.time() - started, 2)
    return record


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="meshxl-soak-"))
    stack = None
    try:
        if args.etcd is None:
            stack = Owner(work / "etcd", grace=3.0)
            etcd_url = await start_etcd(stack, args.etcd_retention)
        else:
            etcd_url = args.etcd
        async with DemoDeployment(work, mode=args.mode, etcd_url=etcd_url) as d:
            return await run(d, stack, args, work)
    finally:
        if stack is not None:
            await stack.aclose()


async def run(d: DemoDeployment, stack: Owner | None, args: argparse.Namespace,
              work: Path) -> dict[str, Any]:
    started = time.time()
    end = started + args.duration
    traffic = Traffic(f"{d.url}/counter", args.sessions, end,
                      max_requests=int(args.sessions * (args.duration / REQUEST_INTERVAL + 10)))
    sampler = Sampler(d, stack, started)
    load = asyncio.create_task(traffic.run())
    failovers: list[Failover] = []
    error: str | None = None
    next_kill = started + args.interval
    next_sample = started
    try:
        while not load.done():
            now = time.time()
            if now >= next_sample:
                sampler.sample()
                next_sample += args.sample_interval
            # No kill in the last stretch: every failover completes inside the run.
            if now >= next_kill and now < end - min(args.interval / 2, 15.0):
                fo = await failover(d, traffic, started)
                failovers.append(fo)
                print(f"[{fo.killed_s:7.1f} s] kill -9 {fo.member}: moved off at "
                      f"{fo.failed_over_s} s, back at {fo.back_s} s; requests "
                      f"{len(traffic.records)}, failed {traffic.failures}",
                      file=sys.stderr, flush=True)
                next_kill += args.interval
            await asyncio.wait([load], timeout=0.2)
        await load
    except SoakError as exc:
        error = str(exc)
        traffic.until = time.time()
        async with asyncio.timeout(15.0):
            await load
    sampler.sample()
    ended = time.time()

    final, readback = await read_back(f"{d.url}/counter", traffic.sessions)
    records = traffic.records
    for fo in failovers:
        window_end = (fo.back_s if fo.back_s is not None else fo.killed_s) + 1.0
        fo.failed_requests = sum(1 for r in records if not r.ok
                                 and fo.killed_s <= r.sent - started <= window_end)
    lost = lost_writes(records, final)
    duration = round(ended - started, 2)
    judged = [flatness(s, warmup=args.warmup, end=duration, max_growth=args.max_growth,
                       min_growth=int(args.min_growth_mib * MIB))
              for s in sampler.series.values()]
    grew = [j["name"] for j in judged if j.get("grew")]
    report: dict[str, Any] = {
        "mode": args.mode, "sessions": args.sessions, "duration_s": duration,
        "interval_s": args.interval, "warmup_s": args.warmup,
        "requests": len(records), "acknowledged_writes": sum(1 for r in records if r.ok),
        "failed_requests": sum(1 for r in records if not r.ok),
        "failures": failure_kinds(records),
        "lost_writes": sum(lost.values()), "lost_sessions": lost,
        "readback_failed": sum(1 for r in readback if not r.ok),
        "failovers": [vars(fo) for fo in failovers],
        "memory": {
            "thresholds": {"max_growth_pct": args.max_growth * 100,
                           "min_growth_mib": args.min_growth_mib,
                           "rule": "median RSS of the last third of the samples after the "
                                   "warm-up vs the first third; grew = above both"},
            "sample_interval_s": args.sample_interval,
            "processes": sorted(judged, key=lambda j: (j["name"], j.get("first_s", 0))),
            "judged": sum(1 for j in judged if j.get("judged")),
            "grew": grew,
            "series": {f"{s.name}[{s.pid}]": s.samples for s in sampler.series.values()},
        },
        "error": error, "logs": str(work),
    }
    report["ok"] = (error is None and not report["lost_writes"] and not grew
                    and not report["readback_failed"])
    return report


def summary(report: dict[str, Any]) -> str:
    mem = report["memory"]
    lines = [f"soak: {report['duration_s']} s, {len(report['failovers'])} failovers, "
             f"{report['requests']} requests, {report['failed_requests']} failed, "
             f"{report['acknowledged_writes']} acknowledged writes, "
             f"{report['lost_writes']} lost"]
    for j in mem["processes"]:
        if j.get("judged"):
            lines.append(f"  {j['name']:<12} {j['early_mib']:7.1f} -> {j['late_mib']:7.1f} MiB "
                         f"({j['growth_pct']:+.1f} %){'  GREW' if j['grew'] else ''}")
        elif j["name"] in NOT_JUDGED and "early_mib" in j:
            lines.append(f"  {j['name']:<12} {j['early_mib']:7.1f} -> {j['late_mib']:7.1f} MiB "
                         "(not judged)")
    if report["error"]:
        lines.append(f"error: {report['error']}")
    lines.append("OK" if report["ok"] else "FAILED")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/soak.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--interval", type=float, default=30.0,
                        help="seconds between failovers")
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--mode", choices=MODES, default="high-availability")
    parser.add_argument("--warmup", type=float,
                        help="seconds before memory counts (default: a quarter of the run, "
                             "at most 60)")
    parser.add_argument("--sample-interval", type=float, default=2.0)
    parser.add_argument("--max-growth", type=float, default=0.10,
                        help="RSS growth fraction that counts as growing (with the next)")
    parser.add_argument("--min-growth-mib", type=float, default=4.0)
    parser.add_argument("--etcd", help="an etcd to use instead of a local one")
    parser.add_argument("--etcd-retention", type=int, default=10_000,
                        help="revisions the local etcd keeps (auto-compaction)")
    parser.add_argument("--output", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.interval <= 0 or args.sessions < 1:
        parser.error("--duration, --interval and --sessions must be positive")
    if args.interval < 10:
        parser.error("--interval must be at least 10 s: a cycle kills, fails over and "
                     "restarts a member")
    if args.warmup is None:
        args.warmup = min(60.0, args.duration / 4)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(soak(args))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    # The raw samples only in the file: stdout gets the verdicts.
    memory = {k: v for k, v in report["memory"].items() if k != "series"}
    print(json.dumps({**report, "memory": memory}, indent=2))
    print(summary(report), file=sys.stderr)
    if report["error"] is not None:
        return 2
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
