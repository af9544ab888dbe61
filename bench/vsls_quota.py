"""Virtual systems: one tenant flooding writes, another tenant's write latency.

Run: ``.venv/bin/python bench/vsls_quota.py [--quick] [--rounds N] [--no-confine]
[--output FILE]``

One etcd, three virtual systems on one pool, a sidecar each: ``t01`` with
``sessions.quota.writes_per_second: QUOTA``, ``t02`` and ``t03`` without a quota.
``t02`` is written by one writer at a steady pace (a PUT every few milliseconds, bounded
in count) and its write latency measured in four phases, alternated over rounds: nobody
else writing (``idle``); ``t01`` written *at* its quota (paced writers, every write
accepted); ``t01`` *flooded* by ``FLOODERS`` writers as fast as they can (far beyond the
quota: most get 429); and, for comparison, ``t03`` flooded the same way without a quota
(every write accepted). The other tenant's load runs in a process of its own, so it does
not share the measuring event loop, and t02's writes begin only once it is under way
(its interpreter started, every writer answered, and in the flood past the quota the
bucket's burst spent), so its start-up is never part of what t02 sees. Reported per
phase: t02's p50 and p99 (medians over rounds), the other tenant's accepted and refused
writes per second, and the CPU each process used per second of the phase
(``cpu_ms_per_s``: etcd, each sidecar, this process (t02's writer) and the other
tenant's writers (``load``)); the target: the other tenant's write p99 at most 1.2x idle
when one writes at or floods past its quota.

Each tenant runs on a CPU of its own (``confine``, the default where there are two), as
two tenants' pods with CPU limits or pinned CPUs do: the other tenant's writers and
sidecar on one; t02's writer and sidecar on the other, with etcd, which every tenant
shares. What a quota can protect is what tenants share (etcd, which also runs on
machines of its own in a cluster, never beside a tenant's pod): the other tenant's
work there lands on t02's CPU, while the CPU it burns itself (its application and its
sidecar's answers, 429s included) stays on its own. Unconfined (``--no-confine``)
every process competes for the machine's two cores, the flooding client's own CPU (as
much as its sidecar's) included, and t02's p99 then shows mostly that.

Prints a table and writes ``bench/results/vsls_quota.json``. Loopback only; every loop
is bounded in count and time; all processes are stopped in ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import aiohttp
from benchlib import Verdict, print_verdicts, quick_requested, run_benchmark

from meshxl import etcd
from meshxl.etcd.keys import Keys
from meshxl.local import commands
from meshxl.local.ports import free_ports
from meshxl.local.procs import Owner
from meshxl.local.servers import HOST, start_etcd
from meshxl.local.wait import wait_http
from meshxl.operator.actions import apply_model
from meshxl.stats import cpu_seconds, quantile

QUOTA = 200
FLOODERS = 8
PACE = 0.004
"""Seconds between t02's writes (about 250 a second, one writer)."""
PHASES = ("idle", "at_quota", "flood", "flood_no_quota")
TENANT = {"at_quota": "t01", "flood": "t01", "flood_no_quota": "t03"}
TARGET_P99_RATIO = 1.2
SETUP_TIMEOUT = 60.0
ROUNDS = 5
"""Rounds of a full run (``--rounds``): each measures every phase once."""
LOAD_SECONDS = 60.0
"""The other tenant's writers stop after this at the latest (they stop when t02's
writes of the phase are done)."""
MODEL = f"""\
pools:
  - name: web
    listener: {{address: {HOST}, port: 10000}}
    members:
      - {{name: w1, address: {HOST}, port: 18081}}
      - {{name: w2, address: {HOST}, port: 18082}}
virtual_systems:
  - name: t01
    pool: web
    sessions: {{quota: {{writes_per_second: {QUOTA}}}}}
  - names: [t02, t03]
    pool: web
"""
STATE = b'{"cart": [1, 2, 3], "user": "someone", "pad": "' + b"x" * 200 + b'"}'
HEADERS = {"Content-Type": "application/json"}
VICTIM_CPU = 0
OTHER_CPU = 1
"""With ``confine`` (the default, on a machine with two CPUs or more), the other
tenant's processes (its writers and its sidecar: t01's, t03's) run on ``OTHER_CPU``, as
a pod's CPU limit or pinned CPUs keep them; t02's writer (this process), its sidecar
and etcd on ``VICTIM_CPU``: what the other tenant makes etcd do, which the quota bounds,
lands on t02's CPU, while the CPU the other tenant burns itself stays on its own (in a
cluster etcd runs on machines of its own, never beside a tenant's pod)."""
ON_VICTIM_CPU = ("bench", "sidecar-t02", "etcd")


def confine(pid: int, cpu: int) -> None:
    """Every thread of ``pid`` on ``cpu`` (threads it starts later inherit it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task.name), {cpu})


def can_confine() -> bool:
    return len(os.sched_getaffinity(0)) >= 2 and \
        {VICTIM_CPU, OTHER_CPU} <= os.sched_getaffinity(0)


async def _sidecar(stack: Owner, vs: str, url: str) -> str:
    app_port, port = free_ports(2)
    proc = stack.spawn(f"sidecar-{vs}", commands.statesync(
        cluster=vs, member="w1", app=f"{HOST}:{app_port}", listen=[f"{HOST}:{port}"],
        etcd=url, log_level="warning"))
    base = f"http://{HOST}:{port}"
    await wait_http(f"{base}/readyz", process=proc, timeout=SETUP_TIMEOUT)
    return base


async def _victim(http: aiohttp.ClientSession, base: str, writes: int) -> list[float]:
    """t02: one writer, one PUT every PACE seconds; each write's latency (s)."""
    latencies = []
    for i in range(writes):
        started = time.perf_counter()
        async with http.put(f"{base}/v1/sessions/v{i % 500}", data=STATE,
                            headers=HEADERS) as resp:
            await resp.read()
            assert resp.status in (200, 201), resp.status
        took = time.perf_counter() - started
        latencies.append(took)
        await asyncio.sleep(max(0.0, PACE - took))
    return latencies


async def _load(base: str, phase: str, seconds: float) -> dict[str, int]:
    """The other tenant's writers (in a process of its own: ``--load``), paced at the
    quota (4 writers at QUOTA/4 a second each) or flooding (FLOODERS writers as fast as
    answers come). Prints ``ready`` once under way: every writer answered, and in the
    ``flood`` phase the quota's burst spent (a write refused); then writes until its
    standard input ends (the measurement is over) or ``seconds`` passed, and returns
    what it did meanwhile, its own CPU included."""
    pace = 4.0 / QUOTA if phase == "at_quota" else 0.0
    writers = 4 if phase == "at_quota" else FLOODERS
    counts = {"accepted": 0, "refused": 0, "other": 0}
    deadline = time.monotonic() + seconds
    stop = asyncio.Event()
    answered: set[int] = set()
    under_way = asyncio.Event()

    async def writer(http: aiohttp.ClientSession, w: int) -> None:
        i = 0
        while time.monotonic() < deadline and not stop.is_set():
            started = time.monotonic()
            async with http.put(f"{base}/v1/sessions/f{w}-{i % 100}", data=STATE,
                                headers=HEADERS) as resp:
                await resp.read()
                counts["accepted" if resp.status in (200, 201) else
                       "refused" if resp.status == 429 else "other"] += 1
            answered.add(w)
            if len(answered) == writers and (phase != "flood" or counts["refused"]):
                under_way.set()
            i += 1
            if pace:
                await asyncio.sleep(max(0.0, pace - (time.monotonic() - started)))

    async def until_stdin_ends() -> None:
        reader = asyncio.StreamReader()
        await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        await reader.read()
        stop.set()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
        done = asyncio.gather(*(writer(http, w) for w in range(writers)))
        ready = asyncio.create_task(under_way.wait())
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                either: list[asyncio.Future[Any]] = [done, ready]
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        counts = dict.fromkeys(counts, 0)  # from here on: what ran beside t02's writes
        started, cpu = time.monotonic(), time.process_time()
        print("ready", flush=True)
        watcher = asyncio.create_task(until_stdin_ends())
        try:
            await done
        finally:
            watcher.cancel()
    counts["cpu_ms"] = round(1000 * (time.process_time() - cpu))
    counts["ms"] = round(1000 * (time.monotonic() - started))
    return counts


class Tenant:
    """The other tenant's writers in a process of their own (``--load``): started and
    under way (:meth:`start`), then stopped, with what they did (:meth:`stop`)."""

    def __init__(self, base: str, phase: str, seconds: float, cpu: int | None) -> None:
        self.argv = [sys.executable, __file__, "--load", base, "--phase", phase,
                     "--seconds", str(seconds)]
        self.seconds = seconds
        self.cpu = cpu
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        cpu = self.cpu
        self.proc = proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            preexec_fn=None if cpu is None else lambda: os.sched_setaffinity(0, {cpu}))
        assert proc.stdout is not None
        async with asyncio.timeout(SETUP_TIMEOUT):
            line = await proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"the other tenant's writers did not start: {line!r}")

    async def stop(self) -> dict[str, int]:
        assert self.proc is not None
        async with asyncio.timeout(self.seconds + 30):
            out, _ = await self.proc.communicate(b"")  # its stdin ends: it stops
        counts: dict[str, int] = json.loads(out)
        return counts

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) or 0.0 for name, pid in pids.items()}


async def measure(bases: dict[str, str], rounds: int, writes: int,
                  pids: dict[str, int], confined: bool) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in PHASES}
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector) as http:
        await _victim(http, bases["t02"], 100)  # warm-up
        for r in range(rounds):
            order = PHASES if r % 2 == 0 else PHASES[::-1]
            for phase in order:
                tenant = None
                if phase != "idle":
                    tenant = Tenant(bases[TENANT[phase]], phase, LOAD_SECONDS,
                                    OTHER_CPU if confined else None)
                try:
                    if tenant is not None:
                        await tenant.start()
                    started = time.monotonic()
                    cpu_before = _cpu(pids)
                    latencies = await _victim(http, bases["t02"], writes)
                    elapsed = time.monotonic() - started
                    cpu_after = _cpu(pids)
                    counts = await tenant.stop() if tenant is not None else {
                        "accepted": 0, "refused": 0, "other": 0, "cpu_ms": 0,
                        "ms": round(1000 * elapsed)}
                finally:
                    if tenant is not None:
                        tenant.kill()
                seconds = counts["ms"] / 1000
                runs[phase].append({
                    "t02_p50_ms": round(1000 * (quantile(latencies, 0.5) or 0), 3),
                    "t02_p99_ms": round(1000 * (quantile(latencies, 0.99) or 0), 3),
                    "t02_seconds": round(elapsed, 2),
                    "other_accepted_per_s": round(counts["accepted"] / seconds, 1),
                    "other_refused_per_s": round(counts["refused"] / seconds, 1),
                    "other_errors": counts["other"],
                    "cpu_ms_per_s": {
                        name: round(1000 * (cpu_after[name] - cpu_before[name]) / elapsed)
                        for name in pids} | {"load": round(counts.get("cpu_ms", 0) / seconds)}})
    result: dict[str, Any] = {"rounds": rounds, "writes_per_phase": writes, "quota": QUOTA,
                              "flooders": FLOODERS, "pace_s": PACE, "phases": {}}
    for phase, items in runs.items():
        result["phases"][phase] = {
            "runs": items,
            **{field: quantile([x[field] for x in items], 0.5) for field in (
                "t02_p50_ms", "t02_p99_ms", "other_accepted_per_s",
                "other_refused_per_s")},
            "cpu_ms_per_s": {name: quantile([x["cpu_ms_per_s"][name] for x in items], 0.5)
                             for name in items[0]["cpu_ms_per_s"]} if items else {}}
    idle = result["phases"]["idle"]["t02_p99_ms"]
    for phase in PHASES[1:]:
        p99 = result["phases"][phase]["t02_p99_ms"]
        result[f"p99_ratio_{phase}"] = round(p99 / idle, 3) if idle and p99 else None
    return result


async def run(quick: bool, work: Path, confined: bool, rounds: int | None = None
              ) -> dict[str, Any]:
    rounds, writes = (rounds or 2, 300) if quick else (rounds or ROUNDS, 1000)
    stack = Owner(work, grace=3.0)
    step = "starting etcd"
    try:
        async with asyncio.timeout(SETUP_TIMEOUT):
            url, _ = await start_etcd(stack)
            client = etcd.client(url)
            async with client:
                await apply_model(client, Keys(), MODEL, "bench")
            step = "starting sidecars"
            bases = {vs: await _sidecar(stack, vs, url) for vs in ("t01", "t02", "t03")}
        step = "measuring"
        pids = {p.name: p.pid for p in stack.processes if p.pid} | {"bench": os.getpid()}
        if confined:
            for name, pid in pids.items():
                confine(pid, VICTIM_CPU if name in ON_VICTIM_CPU else OTHER_CPU)
        result = await measure(bases, rounds, writes, pids, confined)
        result["confined"] = confined
        return result
    except (TimeoutError, RuntimeError, OSError) as exc:
        traceback.print_exc()
        raise SystemExit(f"failed {step}: {exc!r}\n{stack.report()}") from None
    finally:
        await stack.aclose()


def print_report(res: dict[str, Any]) -> None:
    print(f"\n== one tenant's writes while another floods: t01 quota {res['quota']} "
          f"writes/s, {res['flooders']} flooding writers, {res['rounds']} rounds of "
          f"{res['writes_per_phase']} t02 writes per phase (medians)")
    print(f"  {'phase':<15} {'t02 p50 ms':>10} {'t02 p99 ms':>10} {'other ok/s':>10} "
          f"{'other 429/s':>11}")
    for phase in PHASES:
        p = res["phases"][phase]
        print(f"  {phase:<15} {p['t02_p50_ms']:>10} {p['t02_p99_ms']:>10} "
              f"{p['other_accepted_per_s']:>10} {p['other_refused_per_s']:>11}")
    names = list(res["phases"]["idle"]["cpu_ms_per_s"])
    where = "each tenant on a CPU of its own" if res["confined"] else "unconfined"
    print(f"  CPU ms a second, medians ({where}; bench: t02's writer, load: the other's)")
    print(f"  {'phase':<15} " + " ".join(f"{name.removeprefix('sidecar-'):>6}"
                                         for name in names))
    for phase in PHASES:
        cpu = res["phases"][phase]["cpu_ms_per_s"]
        print(f"  {phase:<15} " + " ".join(f"{cpu.get(name, 0):>6.0f}" for name in names))
    print("  t02 p99 / idle: " + ", ".join(
        f"{phase} {res[f'p99_ratio_{phase}']}x" for phase in PHASES[1:]))


def verdicts(res: dict[str, Any]) -> list[Verdict]:
    return [Verdict("vsls: other tenant's write p99, one tenant at its quota / idle",
                    res["p99_ratio_at_quota"], TARGET_P99_RATIO, "x"),
            Verdict("vsls: other tenant's write p99, one tenant flooding past its quota / "
                    "idle", res["p99_ratio_flood"], TARGET_P99_RATIO, "x",
                    reference=f"{res['p99_ratio_flood_no_quota']}x flooding without a quota")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (< ~1 min)")
    parser.add_argument("--no-confine", action="store_true",
                        help="every process on any CPU (default: each tenant on its own)")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"rounds (default {ROUNDS}; 2 with --quick)")
    parser.add_argument("--output", type=Path, default=None,
                        help="write the results here instead of bench/results")
    parser.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--phase", default="flood", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:  # the other tenant's writers, in their own process
        print(json.dumps(asyncio.run(_load(args.load, args.phase, min(args.seconds, 60.0)))))
        return 0
    quick = quick_requested(args.quick)
    confined = not args.no_confine and can_confine()

    def report(res: dict[str, Any], verdict_list: list[Verdict]) -> None:
        print_report(res)
        print_verdicts("vsls_quota", verdict_list)

    if args.rounds is not None and not 1 <= args.rounds <= 200:
        parser.error("--rounds takes 1 to 200")
    return run_benchmark("vsls_quota", quick, "meshxl-bench-",
                         lambda work: run(quick, work, confined, args.rounds), verdicts,
                         report, write=args.output is None, output=args.output)


if __name__ == "__main__":
    sys.exit(main())
