"""What a write refused for its cluster's rate quota costs a pool sidecar: CPU per 429.

Run: ``.venv/bin/python bench/quota_refusal.py [--requests N] [--rounds R]``; another
version's code with ``PYTHONPATH=/path/to/other/checkout`` (the sidecar inherits it).

One etcd and one sidecar of a pool (``meshxl serve statesync --pool web``) hosting two
VSs, ``t01`` with ``writes_per_second: 5``. Each round, 8 keep-alive connections PUT
``t01`` sessions (a ~230-byte JSON state) one request at a time each, ``--requests`` in
all, nearly every one refused; the sidecar's CPU (``/proc``) over the round, less its
idle CPU over as long, divided by the refusals. Prints one line per round. Loopback
only; every loop bounded in count; every process killed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
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
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def writer(port: int, k: int, count: int, statuses: dict[int, int]) -> None:
    """``count`` PUTs on one keep-alive connection, one at a time."""
    body = b'{"n": 1, "pad": "' + b"x" * 200 + b'"}'
    request = (f"PUT /v1/clusters/t01/sessions/f{k} HTTP/1.1\r\nHost: {HOST}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
               ).encode() + body
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        for _ in range(count):
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            lines = head.split(b"\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in lines
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            status = int(lines[0].split(b" ", 2)[1])
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()


async def run(requests: int, rounds: int) -> None:
    owner = Owner(label="quota-refusal")
    try:
        url, _ = await start_etcd(owner)
        async with etcd.client(url) as client:
            await apply_model(client, Keys(), MODEL, "bench/quota_refusal")
        port, app = free_ports(2)
        sidecar = owner.spawn("sidecar", commands.statesync(
            cluster=None, pool="web", member="w1", app=f"{HOST}:{app}",
            listen=f"{HOST}:{port}", etcd=url, log_level="warning"))
        await wait_http(f"http://{HOST}:{port}/readyz", process=sidecar, timeout=60)
        pid = sidecar.pid
        assert pid is not None
        await asyncio.sleep(1.0)
        for r in range(rounds):
            before = cpu_seconds(pid)
            await asyncio.sleep(1.0)
            idle = cpu_seconds(pid) - before
            statuses: dict[int, int] = {}
            before, t0 = cpu_seconds(pid), time.perf_counter()
            await asyncio.gather(*(writer(port, k, requests // CONNECTIONS, statuses)
                                   for k in range(CONNECTIONS)))
            used, elapsed = cpu_seconds(pid) - before, time.perf_counter() - t0
            refused = statuses.get(429, 0)
            per = (used - idle * elapsed) / refused * 1e6 if refused else float("nan")
            print(f"round {r + 1}: {dict(sorted(statuses.items()))} in {elapsed:.2f} s; "
                  f"sidecar {used:.2f} CPU s (idle {idle:.2f} a second): {per:.0f} us per "
                  f"refusal, {refused / elapsed:.0f} refusals/s", flush=True)
    finally:
        await owner.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6000,
                        help="PUTs per round, over 8 connections (at most 100,000)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not 8 <= args.requests <= 100_000 or not 1 <= args.rounds <= 20:
        parser.error("--requests takes 8 to 100000, --rounds 1 to 20")
    asyncio.run(run(args.requests, args.rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
