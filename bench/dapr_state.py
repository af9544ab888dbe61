"""What a save costs the sidecar through Dapr's state API, beside the same save through
meshxl's own session API, measured side by side in one run.

Run: ``.venv/bin/python bench/dapr_state.py [--saves N] [--writers W] [--rounds R]``.

One etcd and one sidecar with ``--dapr on`` (so every API runs in the same process over
the same session engine). Each round runs, in turn, ``--saves`` saves of a ~230-byte
JSON state from ``--writers`` writers, each its own keys (updates after the first
round), one request at a time each:

* ``native``: ``PUT /v1/sessions/{id}``, one keep-alive HTTP/1.1 connection a writer;
* ``dapr-http``: ``POST /v1.0/state/statestore`` with one state, the same connections;
* ``dapr-grpc``: the gRPC ``SaveState`` of one state (``dapr.proto.runtime.v1.Dapr``,
  the Dapr SDK's generated message, made once), one HTTP/2 channel, ``--writers`` calls
  at once.

For each: the sidecar's CPU (``/proc``) per save, less its idle CPU over as long, and
the saves a second. Prints each round, then the medians and each Dapr API's ratio to
native (the median of the rounds' ratios: a round's three loads run back to back, so a
machine whose load changes moves them alike); the target (docs/dapr.md) is at most
1.2x. Writes ``bench/results/dapr_state.json`` (``--quick``: a smoke run, not written).
Loopback only; every loop bounded in count and time; every process killed at the end,
also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import Verdict, print_verdicts, quick_requested, run_benchmark

from meshxl.local import commands
from meshxl.local.ports import free_ports
from meshxl.local.procs import Owner
from meshxl.local.servers import HOST, start_etcd
from meshxl.local.wait import wait_http

STATE = b'{"n": 1, "pad": "' + b"x" * 200 + b'"}'
TARGET = 1.2
KINDS = ("native", "dapr-http", "dapr-grpc")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def http_request(kind: str, key: str) -> bytes:
    if kind == "native":
        head, body = f"PUT /v1/sessions/{key}", STATE
    else:
        head = "POST /v1.0/state/statestore"
        body = b'[{"key": "' + key.encode() + b'", "value": ' + STATE + b"}]"
    return (f"{head} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def http_writer(port: int, kind: str, w: int, count: int, end: float,
                      failures: list[int]) -> None:
    requests = [http_request(kind, f"w{w}-k{i}") for i in range(8)]
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        for i in range(count):
            if time.perf_counter() >= end:
                break
            writer.write(requests[i % len(requests)])
            async with asyncio.timeout(10.0):
                head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in lines
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            if int(lines[0].split(b" ", 2)[1]) >= 300:
                failures.append(1)
    finally:
        writer.close()


async def grpc_writers(port: int, writers: int, count: int, end: float,
                       failures: list[int]) -> None:
    import grpc
    from dapr.proto.common.v1 import common_pb2
    from dapr.proto.runtime.v1 import state_pb2

    async with grpc.aio.insecure_channel(f"{HOST}:{port}") as channel:
        save = channel.unary_unary("/dapr.proto.runtime.v1.Dapr/SaveState")
        requests = [[state_pb2.SaveStateRequest(store_name="statestore", states=[
            common_pb2.StateItem(key=f"w{w}-k{i}", value=STATE)]).SerializeToString()
            for i in range(8)] for w in range(writers)]

        async def one(w: int) -> None:
            for i in range(count):
                if time.perf_counter() >= end:
                    return
                try:
                    await save(requests[w][i % 8], timeout=10)
                except grpc.RpcError:
                    failures.append(1)

        await asyncio.gather(*(one(w) for w in range(writers)))


async def load(kind: str, pid: int, ports: dict[str, int], saves: int, writers: int,
               seconds: float) -> tuple[float, float, int]:
    """One load: (sidecar CPU per save in us, saves a second, failures)."""
    before = cpu_seconds(pid)
    await asyncio.sleep(1.0)
    idle = cpu_seconds(pid) - before
    failures: list[int] = []
    count = saves // writers
    before, t0 = cpu_seconds(pid), time.perf_counter()
    end = t0 + seconds
    if kind == "dapr-grpc":
        await grpc_writers(ports[kind], writers, count, end, failures)
    else:
        await asyncio.gather(*(http_writer(ports[kind], kind, w, count, end, failures)
                               for w in range(writers)))
    took = time.perf_counter() - t0
    cpu = cpu_seconds(pid) - before - idle * took
    done = count * writers
    return cpu / done * 1e6, done / took, len(failures)


async def measure(saves: int, writers: int, rounds: int, seconds: float) -> dict[str, Any]:
    owner = Owner(label="dapr-state")
    try:
        url, _ = await start_etcd(owner)
        api, app, dapr_http, dapr_grpc = free_ports(4)
        sidecar = owner.spawn("sidecar", commands.statesync(
            cluster="orders", member="a", app=f"{HOST}:{app}", listen=f"{HOST}:{api}",
            etcd=url, log_level="warning", dapr="on", dapr_http_port=dapr_http,
            dapr_grpc_port=dapr_grpc))
        await wait_http(f"http://{HOST}:{api}/readyz", process=sidecar, timeout=60)
        pid = sidecar.pid
        assert pid is not None
        ports = {"native": api, "dapr-http": dapr_http, "dapr-grpc": dapr_grpc}
        seen: dict[str, list[float]] = {kind: [] for kind in KINDS}
        rates: dict[str, list[float]] = {kind: [] for kind in KINDS}
        failures = 0
        for kind in KINDS:  # warm up: every key written once, every path run
            await load(kind, pid, ports, writers * 8, writers, seconds)
        for r in range(rounds):
            for kind in KINDS:
                per_save, rate, failed = await load(kind, pid, ports, saves, writers, seconds)
                seen[kind].append(per_save)
                rates[kind].append(rate)
                failures += failed
                print(f"round {r + 1} {kind:9s}: {per_save:7.1f} us of sidecar CPU a save, "
                      f"{rate:7.0f} saves/s, {failed} failed", flush=True)
        return {
            "saves": saves, "writers": writers, "rounds": rounds, "failed": failures,
            "load_after": round(os.getloadavg()[0], 2),
            "kinds": {kind: {
                "cpu_us_per_save": round(statistics.median(seen[kind]), 1),
                "saves_per_s": round(statistics.median(rates[kind])),
                "rounds_us": [round(v, 1) for v in seen[kind]],
                # The median of the rounds' ratios: a round's three loads run back to back,
                # so a machine whose load changes moves them alike.
                "ratio_to_native": round(statistics.median(
                    a / b for a, b in zip(seen[kind], seen["native"], strict=True)), 3),
            } for kind in KINDS}}
    finally:
        await owner.aclose()


def verdicts(res: dict[str, Any]) -> list[Verdict]:
    native = res["kinds"]["native"]["cpu_us_per_save"]
    out = [Verdict(f"sidecar CPU a save, {kind} / native", res["kinds"][kind]["ratio_to_native"],
                   TARGET, "x", reference=f"native {native} us a save")
           for kind in KINDS if kind != "native"]
    out.append(Verdict("saves that failed", res["failed"], 0, ""))
    return out


def report(res: dict[str, Any], found: list[Verdict]) -> None:
    print(f"\nmedians over {res['rounds']} rounds ({res['writers']} writers, {res['saves']} "
          f"saves each; load {res['load_after']})")
    for kind, figures in res["kinds"].items():
        print(f"  {kind:9s} {figures['cpu_us_per_save']:7.1f} us a save, "
              f"{figures['ratio_to_native']:5.2f}x native, {figures['saves_per_s']} saves/s")
    print_verdicts("dapr_state", found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--saves", type=int, default=4000)
    parser.add_argument("--writers", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="each load's time at most")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run (fewer saves and rounds; BENCH_QUICK=1 too)")
    args = parser.parse_args()
    quick = quick_requested(args.quick)
    if quick:
        args.saves, args.rounds = min(args.saves, 800), 1
    if not (1 <= args.writers <= 256 and args.writers <= args.saves <= 1_000_000
            and 1 <= args.rounds <= 50 and 0 < args.seconds <= 600):
        print("dapr_state: --writers 1-256, --saves from --writers to 1e6, --rounds 1-50, "
              "--seconds up to 600", file=sys.stderr)
        return 2

    async def run(_work: Path) -> dict[str, Any]:
        return await measure(args.saves, args.writers, args.rounds, args.seconds)

    return run_benchmark("dapr_state", quick, "meshxl-bench-", run, verdicts, report,
                         write=not quick)


if __name__ == "__main__":
    sys.exit(main())

