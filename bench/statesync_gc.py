"""statesync sidecar: the garbage collector's share, shipped setting beside Python's default.

Run: ``.venv/bin/python bench/statesync_gc.py [--quick]``

The sidecar raises the youngest generation's threshold (``meshxl.statesync.app.GC_YOUNG``)
after start-up. This runs two sidecars of the same kind on one etcd, the shipped one and
one kept at Python's default thresholds (700, 10, 10), both under ``bench/gcwatched.py``
(which times every collection), and loads them in turn with the load generator of
``bench/statesync.py``: single writes from 64 writers (batched) and bulk saves of 16
sessions from 64 writers. Rounds alternate which sidecar goes first; the median round of
each is reported. Per sidecar: sessions/s, the sidecar's CPU per session, the
collector's time per 1,000 sessions (the target: at most half of the default's), its
collections by generation and its longest pause.

Prints a table and writes ``bench/results/statesync_gc.json``. Loopback only; every
loop is bounded in count and time; all processes are stopped in ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import statesync as ss
from aetcd import rpc
from benchlib import Verdict, print_verdicts, quick_requested, run_benchmark

from meshxl import etcd
from meshxl.local import commands
from meshxl.local.ports import free_ports
from meshxl.local.procs import Owner, Process
from meshxl.local.servers import HOST, start_etcd
from meshxl.local.wait import wait_http, wait_until

SCRIPT = Path(__file__).resolve()
WRAPPER = SCRIPT.parent / "gcwatched.py"
SIDECARS = ("shipped", "python-default")
WORKLOADS = {"batched": 0, "bulk16": ss.BULK_SESSIONS}
"""Sessions per request (0: single writes)."""
TARGET_GC_RATIO = 0.5
"""The collector's time per session, shipped / default. The sidecar's whole CPU per
session is reported beside it, with no target: what the collector saves (a few
microseconds of a hundred or more) is less than how much that figure moves from run to
run here."""


class Watched:
    """A sidecar under gcwatched.py: a window per load run."""

    def __init__(self, name: str, url: str, unix: str, process: Process, out: Path):
        self.name, self.url, self.unix, self.process, self.out = name, url, unix, process, out
        self.windows = 0

    def start(self) -> None:
        assert self.process.pid is not None
        os.kill(self.process.pid, signal.SIGUSR1)

    async def stop(self) -> dict[str, Any]:
        assert self.process.pid is not None
        os.kill(self.process.pid, signal.SIGUSR2)
        path = Path(f"{self.out}.{self.windows}")
        self.windows += 1
        await wait_until(path.exists, timeout=10.0, what=f"GC stats {path}",
                         process=self.process)
        await asyncio.sleep(0.1)  # written in full
        stats: dict[str, Any] = json.loads(await asyncio.to_thread(path.read_text))
        return stats


async def _sidecar(stack: Owner, name: str, url: str, default: bool) -> Watched:
    app_port, port = free_ports(2)
    out = stack.root / f"{name}.gc"
    python = [sys.executable, str(WRAPPER), str(out), *(["--python-default"] if default else [])]
    unix = str(stack.root / f"{name}.sock")
    proc = stack.spawn(name, commands.statesync(
        cluster=name, member=name, app=f"{HOST}:{app_port}",
        listen=[f"{HOST}:{port}", f"unix:{unix}"], etcd=url, batch_max_ops=64,
        log_level="warning", python=python))
    base = f"http://{HOST}:{port}"
    await wait_http(f"{base}/readyz", process=proc, timeout=ss.SETUP_TIMEOUT)
    return Watched(name, base, unix, proc, out)


async def measure(url: str, sidecars: dict[str, Watched], etcd_pid: int, rounds: int,
                  duration: float, max_writes: int) -> dict[str, Any]:
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        w: {s: [] for s in SIDECARS} for w in WORKLOADS}
    client = etcd.client(url)
    await client.connect()
    try:
        for r in range(rounds):
            for workload, per_request in WORKLOADS.items():
                order = SIDECARS if r % 2 == 0 else SIDECARS[::-1]
                for which in order:
                    sidecar = sidecars[which]
                    cfg = {"mode": "http", "concurrency": ss.CONCURRENCY,
                           "bulk": per_request, "unix": sidecar.unix,
                           "duration": duration, "max_writes": max_writes, "warmup": 2,
                           "prefix": f"s-{workload}-r{r}-", "target": sidecar.url,
                           "pids": [etcd_pid, sidecar.process.pid]}
                    sidecar.start()
                    try:
                        res = await ss._run_client(cfg)
                    finally:
                        gc_stats = await sidecar.stop()
                    head = await client.kvstub.Range(rpc.RangeRequest(key=b"\0", limit=1))
                    await client.compact(head.header.revision, physical=True)
                    writes = res["writes"]
                    cpu = res["cpu_s"].get(str(sidecar.process.pid))
                    runs[workload][which].append({
                        "round": r, "writes_per_s": res["writes_per_s"], "writes": writes,
                        "errors": res["errors"], "first_errors": res["first_errors"],
                        "sidecar_cpu_us_per_session":
                            round(cpu / writes * 1e6, 1) if cpu and writes else None,
                        "gc_ms_per_1k_sessions":
                            round(sum(gc_stats["seconds"]) / writes * 1e6, 2) if writes
                            else None,
                        "gc_collections": gc_stats["collections"],
                        "gc_longest_ms": round(gc_stats["longest_s"] * 1000, 2),
                        "gc_threshold": gc_stats["threshold"]})
    finally:
        await client.close()
    return {"rounds": rounds, "duration_s": duration, "concurrency": ss.CONCURRENCY,
            "workloads": summarize(runs)}


def summarize(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per workload: each sidecar's median round (by sessions/s) and its rounds, and the
    shipped / default ratios of the medians of all rounds. Pure."""
    out: dict[str, Any] = {}
    for workload in runs:
        entry: dict[str, Any] = {}
        for which in SIDECARS:
            ranked = sorted(runs[workload][which], key=lambda x: x["writes_per_s"])
            entry[which] = {"median_run": ranked[len(ranked) // 2],
                            "runs": runs[workload][which]}
        for field in ("sidecar_cpu_us_per_session", "gc_ms_per_1k_sessions"):
            a, b = (_median(runs[workload][s], field) for s in SIDECARS)
            entry[f"ratio_{field}"] = round(a / b, 3) if a is not None and b else None
        out[workload] = entry
    return out


def _median(runs: list[dict[str, Any]], field: str) -> float | None:
    values = sorted(x[field] for x in runs if x[field] is not None)
    return values[len(values) // 2] if values else None


async def run(quick: bool, work: Path) -> dict[str, Any]:
    rounds, duration, max_writes = (2, 2.0, 40_000) if quick else (6, 4.0, 100_000)
    stack = Owner(work, grace=3.0)
    step = "starting etcd"
    try:
        async with asyncio.timeout(ss.SETUP_TIMEOUT):
            url, etcd_proc = await start_etcd(stack)
            assert etcd_proc.pid is not None
            step = "starting sidecars"
            sidecars = {which: await _sidecar(stack, f"gc-{which}", url,
                                              which == "python-default")
                        for which in SIDECARS}
        step = "measuring"
        return await measure(url, sidecars, etcd_proc.pid, rounds, duration, max_writes)
    except (TimeoutError, RuntimeError, OSError) as exc:
        traceback.print_exc()
        raise SystemExit(f"failed {step}: {exc!r}\n{stack.report()}") from None
    finally:
        await stack.aclose()


def print_report(res: dict[str, Any]) -> None:
    print(f"\n== the sidecar's garbage collector: {res['concurrency']} writers, "
          f"{res['rounds']} rounds of {res['duration_s']:g} s, median round shown")
    print(f"  {'load':<9} {'sidecar':<15} {'threshold':<16} {'sessions/s':>10} "
          f"{'CPU us/s':>9} {'GC ms/1k':>9} {'longest':>8}  collections (gen 0, 1, 2)")
    for workload, entry in res["workloads"].items():
        for which in SIDECARS:
            m = entry[which]["median_run"]
            print(f"  {workload:<9} {which:<15} {str(tuple(m['gc_threshold'])):<16} "
                  f"{m['writes_per_s']:>10.0f} {m['sidecar_cpu_us_per_session']:>9} "
                  f"{m['gc_ms_per_1k_sessions']:>9} {m['gc_longest_ms']:>7}ms  "
                  f"{m['gc_collections']}")
        print(f"  {workload}: shipped / default, medians of all rounds: CPU per session "
              f"{entry['ratio_sidecar_cpu_us_per_session']}x, collector time "
              f"{entry['ratio_gc_ms_per_1k_sessions']}x")


def verdicts(res: dict[str, Any]) -> list[Verdict]:
    out = []
    for workload, entry in res["workloads"].items():
        shipped, default = (entry[s]["median_run"] for s in SIDECARS)
        out.append(Verdict(
            f"statesync GC: collector time per session, shipped / Python default, {workload}",
            entry["ratio_gc_ms_per_1k_sessions"], TARGET_GC_RATIO, "x",
            reference=f"{shipped['gc_ms_per_1k_sessions']} vs "
                      f"{default['gc_ms_per_1k_sessions']} ms per 1,000 sessions"))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (< ~1 min)")
    quick = quick_requested(parser.parse_args().quick)

    def report(res: dict[str, Any], verdict_list: list[Verdict]) -> None:
        print_report(res)
        print_verdicts("statesync_gc", verdict_list)

    return run_benchmark("statesync_gc", quick, "meshxl-bench-",
                         lambda work: run(quick, work), verdicts, report)


if __name__ == "__main__":
    sys.exit(main())
