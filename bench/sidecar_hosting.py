"""One sidecar serving many virtual systems against sidecars serving one each: idle
RSS and CPU, side by side.

Run: ``.venv/bin/python bench/sidecar_hosting.py [--vs N] [--seconds S]`` (defaults:
60 virtual systems, 20 s)

A pool member serves every virtual system (VS) of its pool. This starts one local etcd,
stores a model with a pool of 4 members and ``--vs`` virtual systems, then, one after
the other: a single-cluster sidecar (``meshxl serve statesync --cluster v00``, what
one process per VS would cost each), a sidecar hosting one VS through ``--pool`` (a
pool of one VS), and a sidecar hosting every VS (``--pool web``). Each is measured once
ready and 3 s more: its CPU time over ``--seconds`` (``/proc/PID/stat``), then its RSS
(``/proc/PID/statm``). Printed: each figure, the RSS of ``--vs`` single-cluster
sidecars, and the ratio of the two. Loopback only; every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aetcd
from sidecar_idle import SETTLE, cpu_seconds, rss_mib

from meshxl.etcd.keys import Keys
from meshxl.local import commands
from meshxl.local.ports import free_ports
from meshxl.local.procs import Owner
from meshxl.local.servers import HOST, start_etcd
from meshxl.local.wait import wait_http
from meshxl.operator.actions import apply_model


def model(pools: dict[str, list[str]]) -> str:
    """Each pool (4 members on two sites) with its virtual systems."""
    text = "pools:\n"
    ports = iter(free_ports(5 * len(pools)))
    for pool in pools:
        text += (f"  - name: {pool}\n    listener: {{address: {HOST}, port: {next(ports)}}}\n"
                 "    sites: [{name: a}, {name: b}]\n    members:\n")
        text += "".join(f"      - {{name: w{i}, address: {HOST}, port: {next(ports)}, "
                        f"site: {'ab'[i % 2]}}}\n" for i in range(4))
    text += "virtual_systems:\n"
    for pool, names in pools.items():
        text += f"  - names: [{', '.join(names)}]\n    pool: {pool}\n"
    return text


async def one(stack: Owner, url: str, name: str, seconds: float, **how: str
              ) -> tuple[float, float]:
    """(idle CPU in % of a core, RSS in MiB) of one idle, ready sidecar."""
    app_port, port = free_ports(2)
    proc = stack.spawn(name, commands.statesync(
        member="w0", app=f"{HOST}:{app_port}", listen=f"{HOST}:{port}", etcd=url,
        log_level="warning", **how))  # type: ignore[arg-type]
    try:
        await wait_http(f"http://{HOST}:{port}/readyz", process=proc, timeout=120)
        assert proc.pid is not None
        await asyncio.sleep(SETTLE)
        used, started = cpu_seconds(proc.pid), time.monotonic()
        await asyncio.sleep(seconds)
        share = (cpu_seconds(proc.pid) - used) / (time.monotonic() - started) * 100
        return share, rss_mib(proc.pid)
    finally:
        await proc.stop()


async def run(count: int, seconds: float) -> None:
    names = [f"v{i:02d}" for i in range(count)]
    with tempfile.TemporaryDirectory(prefix="meshxl-hosting-") as work:
        stack = Owner(Path(work), grace=3.0)
        try:
            url = (await start_etcd(stack))[0]
            async with aetcd.Client(host=HOST, port=int(url.rsplit(":", 1)[1])) as client:
                await apply_model(client, Keys(), model({"web": names, "one": ["solo"]}),
                                  "bench")
            single = await one(stack, url, "single", seconds, cluster="v00")
            alone = await one(stack, url, "pool-of-1", seconds, cluster=None, pool="one")
            hosting = await one(stack, url, f"pool-of-{count}", seconds, cluster=None,
                                pool="web")
        finally:
            await stack.aclose()
    print(f"\n== idle sidecars, {seconds:g} s each (CPU in % of a core)")
    for what, (share, rss) in ((" one cluster (--cluster v00)", single),
                               (" one VS (--pool of 1 VS)", alone),
                               (f" {count} VSs (--pool web)", hosting)):
        print(f"  {what:32} RSS {rss:6.1f} MiB   CPU {share:6.2f} %")
    print(f"  {count} single-cluster sidecars  RSS {single[1] * count:6.1f} MiB   "
          f"CPU {single[0] * count:6.2f} %")
    print(f"  ratio (one sidecar for {count} VSs / {count} sidecars): RSS "
          f"{hosting[1] / (single[1] * count):.3f}, CPU "
          f"{hosting[0] / max(single[0] * count, 1e-9):.3f}; per extra VS "
          f"{(hosting[1] - alone[1]) / max(count - 1, 1) * 1024:.0f} KiB RSS, "
          f"{(hosting[0] - alone[0]) / max(count - 1, 1):.3f} % CPU")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vs", type=int, default=60, help="virtual systems in the pool")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds measured")
    opts = parser.parse_args()
    if not 1 <= opts.vs <= 1000 or not 1 <= opts.seconds <= 600:
        parser.error("--vs must be 1-1000 and --seconds 1-600")
    asyncio.run(run(opts.vs, opts.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
