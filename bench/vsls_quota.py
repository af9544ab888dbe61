"""Virtual systems: one tenant flooding writes, another tenant's write latency.

Run: ``.venv/bin/python bench/vsls_quota.py [--quick]``

One etcd, three virtual systems on one pool, a sidecar each: ``t01`` with
``sessions.quota.writes_per_second: QUOTA``, ``t02`` and ``t03`` without a quota. ``t02``
is written by one writer at a steady pace (a PUT every few milliseconds, bounded in
count) and its write latency measured in four phases, alternated over rounds: nobody
else writing (``idle``); ``t01`` written *at* its quota (paced writers, every write
accepted); ``t01`` *flooded* by ``FLOODERS`` writers as fast as they can (far beyond the
quota: most get 429); and, for comparison, ``t03`` flooded the same way without a
quota (every write accepted). The other tenant's load runs in a process of its own, so
it does not share the measuring event loop. Reported per phase: t02's p50 and p99
(medians over rounds), the other tenant's accepted and refused writes per second; the
target (issue #41): the other tenant's write p99 at most 1.2x idle when one floods at
its quota.

Prints a table and writes ``bench/results/vsls_quota.json``. Loopback only; every loop
is bounded in count and time; all processes are stopped in ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
from meshxl.stats import quantile

QUOTA = 200
FLOODERS = 8
PACE = 0.004
"""Seconds between t02's writes (about 250 a second, one writer)."""
PHASES = ("idle", "at_quota", "flood", "flood_no_quota")
TENANT = {"at_quota": "t01", "flood": "t01", "flood_no_quota": "t03"}
TARGET_P99_RATIO = 1.2
SETUP_TIMEOUT = 60.0
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
    answers come), for ``seconds``."""
    pace = 4.0 / QUOTA if phase == "at_quota" else 0.0
    writers = 4 if phase == "at_quota" else FLOODERS
    counts = {"accepted": 0, "refused": 0, "other": 0}
    deadline = time.monotonic() + seconds

    async def writer(http: aiohttp.ClientSession, w: int) -> None:
        i = 0
        while time.monotonic() < deadline:
            started = time.monotonic()
            async with http.put(f"{base}/v1/sessions/f{w}-{i % 100}", data=STATE,
                                headers=HEADERS) as resp:
                await resp.read()
                counts["accepted" if resp.status in (200, 201) else
                       "refused" if resp.status == 429 else "other"] += 1
            i += 1
            if pace:
                await asyncio.sleep(max(0.0, pace - (time.monotonic() - started)))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
        await asyncio.gather(*(writer(http, w) for w in range(writers)))
    return counts


async def _tenant(base: str, phase: str, seconds: float) -> dict[str, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--load", base, "--phase", phase, "--seconds", str(seconds),
        stdout=asyncio.subprocess.PIPE)
    async with asyncio.timeout(seconds + 30):
        out, _ = await proc.communicate()
    counts: dict[str, int] = json.loads(out)
    return counts


async def measure(bases: dict[str, str], rounds: int, writes: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in PHASES}
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector) as http:
        await _victim(http, bases["t02"], 100)  # warm-up
        for r in range(rounds):
            order = PHASES if r % 2 == 0 else PHASES[::-1]
            for phase in order:
                seconds = writes * PACE * 1.5 + 1.0
                tenant = None
                if phase != "idle":
                    tenant = asyncio.create_task(_tenant(bases[TENANT[phase]], phase,
                                                         seconds))
                    await asyncio.sleep(0.7)  # its process started, its writers under way
                started = time.monotonic()
                latencies = await _victim(http, bases["t02"], writes)
                elapsed = time.monotonic() - started
                counts = await tenant if tenant is not None else {
                    "accepted": 0, "refused": 0, "other": 0}
                runs[phase].append({
                    "t02_p50_ms": round(1000 * (quantile(latencies, 0.5) or 0), 3),
                    "t02_p99_ms": round(1000 * (quantile(latencies, 0.99) or 0), 3),
                    "t02_seconds": round(elapsed, 2),
                    "other_accepted_per_s": round(counts["accepted"] / seconds, 1),
                    "other_refused_per_s": round(counts["refused"] / seconds, 1),
                    "other_errors": counts["other"]})
    result: dict[str, Any] = {"rounds": rounds, "writes_per_phase": writes, "quota": QUOTA,
                              "flooders": FLOODERS, "pace_s": PACE, "phases": {}}
    for phase, items in runs.items():
        result["phases"][phase] = {
            "runs": items,
            **{field: quantile([x[field] for x in items], 0.5) for field in (
                "t02_p50_ms", "t02_p99_ms", "other_accepted_per_s",
                "other_refused_per_s")}}
    idle = result["phases"]["idle"]["t02_p99_ms"]
    for phase in PHASES[1:]:
        p99 = result["phases"][phase]["t02_p99_ms"]
        result[f"p99_ratio_{phase}"] = round(p99 / idle, 3) if idle and p99 else None
    return result


async def run(quick: bool, work: Path) -> dict[str, Any]:
    rounds, writes = (2, 300) if quick else (5, 1000)
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
        return await measure(bases, rounds, writes)
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
    parser.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--phase", default="flood", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:  # the other tenant's writers, in their own process
        print(json.dumps(asyncio.run(_load(args.load, args.phase, min(args.seconds, 60.0)))))
        return 0
    quick = quick_requested(args.quick)

    def report(res: dict[str, Any], verdict_list: list[Verdict]) -> None:
        print_report(res)
        print_verdicts("vsls_quota", verdict_list)

    return run_benchmark("vsls_quota", quick, "meshxl-bench-",
                         lambda work: run(quick, work), verdicts, report)


if __name__ == "__main__":
    sys.exit(main())
