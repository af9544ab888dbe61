"""What writes refused for their cluster's rate quota cost a pool sidecar: CPU per 429,
and per second of a flood, with the refusals answered at once and held.

Run: ``.venv/bin/python bench/quota_refusal.py [--requests N] [--seconds S] [--rounds R]``;
another version's code with ``PYTHONPATH=/path/to/other/checkout``, run from that
checkout's directory (the sidecar, ``python -m meshxl``, inherits both and puts its
working directory first on its path; a checkout without ``hold_refused`` takes
``--at-once-only``).

One etcd and one sidecar of a pool (``meshxl serve statesync --pool web``) hosting
three VSs: ``t01`` with ``writes_per_second: 5`` (its refusals held, the default),
``t03`` the same with ``hold_refused: false`` (answered at once), ``t02`` without a
quota. Each round floods ``t03`` then ``t01``: 8 keep-alive connections PUT sessions
(a ~230-byte JSON state) one request at a time each, ignoring ``Retry-After``, until
``--requests`` in all or ``--seconds``; nearly every one is refused. For each flood:
the sidecar's CPU (``/proc``) less its idle CPU over as long, per refusal and per
second (cores), and the refusals a second. Prints one line per flood, then the median
of the rounds side by side. Loopback only; every loop bounded in count and time; every
process killed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

from meshxl import etcd
from meshxl.etcd.keys import Keys
from meshxl.local import commands
from meshxl.local.ports import free_ports
from meshxl.local.procs import Owner
from meshxl.local.servers import HOST, start_etcd
from meshxl.local.wait import wait_http
from meshxl.operator.actions import apply_model

CONNECTIONS = 8
MODEL = f"""pools:
  - name: web
    listener: {{address: {HOST}, port: 10000}}
    members:
      - {{name: w1, address: {HOST}, port: 18081}}
      - {{name: w2, address: {HOST}, port: 18082}}
virtual_systems:
  - names: [t01, t02]
    pool: web
    sessions: {{quota: {{writes_per_second: 5}}}}
  - name: t03
    pool: web
    sessions: {{quota: {{writes_per_second: 5, hold_refused: false}}}}
"""
MODEL_AT_ONCE = MODEL.split("  - name: t03", 1)[0]
"""Without ``t03``, for a checkout whose model has no ``hold_refused``: t01's refusals
are then answered at once."""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def writer(port: int, vs: str, k: int, count: int, end: float,
                 statuses: dict[int, int]) -> None:
    """At most ``count`` PUTs on one keep-alive connection, one at a time, until ``end``."""
    body = b'{"n": 1, "pad": "' + b"x" * 200 + b'"}'
    request = (f"PUT /v1/clusters/{vs}/sessions/f{k} HTTP/1.1\r\nHost: {HOST}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
               ).encode() + body
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        for _ in range(count):
            if time.perf_counter() >= end:
                break
            writer.write(request)
            async with asyncio.timeout(10.0):
                head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in lines
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            status = int(lines[0].split(b" ", 2)[1])
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()


async def flood(pid: int, port: int, vs: str, requests: int, seconds: float
                ) -> tuple[dict[int, int], float, float, float]:
    """One flood of ``vs``: its statuses, seconds, the sidecar's CPU seconds over it
    and its idle CPU a second (measured just before)."""
    before = cpu_seconds(pid)
    await asyncio.sleep(1.0)
    idle = cpu_seconds(pid) - before
    statuses: dict[int, int] = {}
    before, t0 = cpu_seconds(pid), time.perf_counter()
    await asyncio.gather(*(writer(port, vs, k, requests // CONNECTIONS, t0 + seconds,
                                  statuses) for k in range(CONNECTIONS)))
    return statuses, time.perf_counter() - t0, cpu_seconds(pid) - before, idle


async def run(requests: int, seconds: float, rounds: int, at_once_only: bool) -> None:
    kinds = {"at once": "t01"} if at_once_only else {"at once": "t03", "held": "t01"}
    owner = Owner(label="quota-refusal")
    try:
        url, _ = await start_etcd(owner)
        async with etcd.client(url) as client:
            await apply_model(client, Keys(), MODEL_AT_ONCE if at_once_only else MODEL,
                              "bench/quota_refusal")
        port, app = free_ports(2)
        sidecar = owner.spawn("sidecar", commands.statesync(
            cluster=None, pool="web", member="w1", app=f"{HOST}:{app}",
            listen=f"{HOST}:{port}", etcd=url, log_level="warning"))
        await wait_http(f"http://{HOST}:{port}/readyz", process=sidecar, timeout=60)
        pid = sidecar.pid
        assert pid is not None
        await asyncio.sleep(1.0)
        seen: dict[str, list[tuple[float, float, float]]] = {kind: [] for kind in kinds}
        for r in range(rounds):
            for kind, vs in kinds.items():
                statuses, elapsed, used, idle = await flood(pid, port, vs, requests, seconds)
                refused = statuses.get(429, 0)
                busy = used - idle * elapsed
                per = busy / refused * 1e6 if refused else float("nan")
                seen[kind].append((busy / elapsed, refused / elapsed, per))
                print(f"round {r + 1}, {kind} ({vs}): {dict(sorted(statuses.items()))} in "
                      f"{elapsed:.2f} s; sidecar {used:.2f} CPU s (idle {idle:.3f} a "
                      f"second): {busy / elapsed:.3f} cores, {per:.0f} us per refusal, "
                      f"{refused / elapsed:.0f} refusals/s", flush=True)
        medians = {kind: [statistics.median(v[i] for v in values) for i in range(3)]
                   for kind, values in seen.items()}
        for kind, (cores, rate, per) in medians.items():
            print(f"median of {rounds} rounds, {kind}: {rate:.0f} refusals/s, sidecar "
                  f"{cores:.3f} cores, {per:.0f} us per refusal")
        if len(medians) == 2 and medians["held"][1] and medians["held"][0] > 0:
            print(f"held / at once: refusals/s {medians['held'][1] / medians['at once'][1]:.3f}x, "
                  f"sidecar cores {medians['held'][0] / medians['at once'][0]:.3f}x")
    finally:
        await owner.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6000,
                        help="PUTs per flood at most, over 8 connections (at most 100,000)")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="seconds per flood at most (0.5 to 30)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--at-once-only", action="store_true",
                        help="flood only t01, without hold_refused in the model (a checkout "
                             "without it)")
    args = parser.parse_args()
    if not 8 <= args.requests <= 100_000 or not 1 <= args.rounds <= 20 \
            or not 0.5 <= args.seconds <= 30:
        parser.error("--requests takes 8 to 100000, --rounds 1 to 20, --seconds 0.5 to 30")
    asyncio.run(run(args.requests, args.seconds, args.rounds, args.at_once_only))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
