"""An idle sidecar's CPU, RSS and threads: two versions of meshxl side by side.

Run: ``.venv/bin/python bench/sidecar_idle.py [--base REV] [--head REV] [--runs N]
[--seconds S]`` (e.g. ``--base main --runs 5 --seconds 40``)

A sidecar that does nothing still wakes up (timers, keepalives, the lease), and one runs
beside every pod. This exports both versions with ``git archive`` (as ``bench/ab.py``
does), starts one local etcd, then, ``--runs`` times and alternating, a ``meshxl serve
statesync`` of each version (its own code first on ``sys.path``), waits until it is
ready and 3 s more, and reads its CPU time (``/proc/PID/stat``) over ``--seconds``,
then its RSS (``/proc/PID/statm``) and threads (``/proc/PID/task``). Printed: each run
and the medians. CPU time is counted in clock ticks (10 ms): a run of S seconds
resolves 1 / S % of a core. Loopback only; every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ab import export

from meshxl.local import commands
from meshxl.local.ports import free_ports
from meshxl.local.procs import Owner
from meshxl.local.servers import HOST, start_etcd
from meshxl.local.wait import wait_http

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
SETTLE = 3.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def rss_mib(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20


async def one(stack: Owner, url: str, tree: Path, name: str, seconds: float
              ) -> tuple[float, float, int]:
    """(idle CPU in % of a core, RSS in MiB, threads) of one idle, ready sidecar."""
    app_port, port = free_ports(2)
    proc = stack.spawn(name, commands.statesync(
        cluster="idle", member=name, app=f"{HOST}:{app_port}", listen=f"{HOST}:{port}",
        etcd=url, log_level="warning"), env={**os.environ, "PYTHONPATH": str(tree)},
        cwd=tree)
    try:
        await wait_http(f"http://{HOST}:{port}/readyz", process=proc, timeout=30)
        assert proc.pid is not None
        await asyncio.sleep(SETTLE)
        used, started = cpu_seconds(proc.pid), time.monotonic()
        await asyncio.sleep(seconds)
        share = (cpu_seconds(proc.pid) - used) / (time.monotonic() - started) * 100
        return share, rss_mib(proc.pid), len(os.listdir(f"/proc/{proc.pid}/task"))
    finally:
        await proc.stop()


async def run(trees: dict[str, Path], runs: int, seconds: float) -> dict[str, list[tuple[
        float, float, int]]]:
    seen: dict[str, list[tuple[float, float, int]]] = {side: [] for side in trees}
    with tempfile.TemporaryDirectory(prefix="meshxl-idle-") as work:
        stack = Owner(Path(work), grace=3.0)
        try:
            url = (await start_etcd(stack))[0]
            for i in range(runs):
                for side, tree in trees.items():
                    seen[side].append(await one(stack, url, tree, f"{side}{i}", seconds))
                    share, rss, threads = seen[side][-1]
                    print(f"run {i + 1} {side}: CPU {share:.3f} % of a core, RSS "
                          f"{rss:.1f} MiB, {threads} threads", flush=True)
        finally:
            await stack.aclose()
    return seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="main", help="the version compared against")
    parser.add_argument("--head", default="HEAD", help="the version measured")
    parser.add_argument("--runs", type=int, default=3, help="runs of each (alternating)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per run")
    opts = parser.parse_args()
    if opts.runs < 1 or not 1 <= opts.seconds <= 600:
        parser.error("--runs must be >= 1 and --seconds within 1-600")
    with tempfile.TemporaryDirectory(prefix="meshxl-idle-trees-") as work:
        trees = {"base": export(opts.base, Path(work) / "base"),
                 "head": export(opts.head, Path(work) / "head")}
        seen = asyncio.run(run(trees, opts.runs, opts.seconds))
    print(f"\n== idle sidecar: {opts.head} against {opts.base}, {opts.runs} runs of "
          f"{opts.seconds:g} s each, medians")
    for side, runs in seen.items():
        print(f"  {side}: CPU {statistics.median(r[0] for r in runs):.3f} % of a core, "
              f"RSS {statistics.median(r[1] for r in runs):.1f} MiB, "
              f"threads {statistics.median(r[2] for r in runs):g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
