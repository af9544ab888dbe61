"""etcd's transactions from one process: CPU per call through grpcio's channel and through
meshxl's own HTTP/2 path (``meshxl.etcd.h2c``), each with a watch that sees every write.

Run: ``.venv/bin/python bench/etcd_calls.py [--quick]``

What a session store pays per etcd transaction, alone: 64 writers in one process
(uvloop), each sending its own guarded put of ~1 KiB (``statesync.wire``, the bytes the
store sends) and waiting for the answer, while a watch of the keys' prefix (the session
cache's) reads every event, as etcd sends it. Two clients of the same etcd, run in
alternating rounds: grpcio (``KV.Txn`` on the aetcd client's channel, the watch a
``Watch`` stream on it) and h2c (both over one HTTP/2 connection on the event loop).
Reported: the process's CPU microseconds per transaction (its own threads included:
grpcio's event engine and completion-queue poller), the least and the median of the
rounds, and transactions per second; beside it etcd's CPU per transaction, each
client's requests as etcd takes them. CPU per call does not depend on how busy the
machine is nearly as much as a rate does. No targets:
``bench/statesync.py`` judges the sidecar end to end.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from aetcd import rpc
from benchlib import etcd_with_client, probe_main, share_writes, watch_events

from meshxl.etcd import h2c
from meshxl.statesync import wire
from meshxl.stats import cpu_seconds

WRITERS = 64
VALUE = b"x" * 1024
PREFIX = b"/bench-calls/"


_ROUNDS = iter(range(1 << 30))


async def _round(client: h2c.Client, kind: str, calls: int, etcd_pid: int = 0
                 ) -> dict[str, float]:
    """``calls`` transactions from :data:`WRITERS` writers, a watch reading their events
    (each round on keys of its own: every transaction applies)."""
    head = await client.kvstub.Range(rpc.RangeRequest(key=b"\0", limit=1))
    start = head.header.revision + 1
    prefix = PREFIX + b"%d/" % next(_ROUNDS)
    end = prefix[:-1] + bytes([prefix[-1] + 1])
    if kind == "h2c":
        channel = client.channel_h2c()

        def txn(request: bytes) -> Any:
            return channel.call(h2c.TXN, request, 5.0, h2c.txn_parse)
    else:
        unary = client.channel.unary_unary(h2c.TXN, request_serializer=None,
                                           response_deserializer=rpc.TxnResponse.FromString)

        def txn(request: bytes) -> Any:
            return unary(request, timeout=5.0)
    done = asyncio.Event()
    revisions = [0] * WRITERS

    async def write(i: int, key: bytes) -> None:
        answer = await txn(wire.txn_request([wire.guarded_put(key, VALUE, revisions[i],
                                                              0)]))
        inner = answer.responses[0].response_txn
        revisions[i] = (answer.header.revision if inner.succeeded
                        else inner.responses[0].response_range.kvs[0].mod_revision)

    if kind == "grpcio":  # the watch on grpcio's channel: as a secure client's
        watcher = asyncio.ensure_future(_grpcio_watch(client, prefix, end, start, calls,
                                                      done))
    else:
        watcher = asyncio.ensure_future(watch_events(client, prefix, end, start, calls, done))
    await asyncio.sleep(0.05)  # the watch is open
    server = cpu_seconds(etcd_pid) if etcd_pid else None
    cpu, wall = time.process_time(), time.perf_counter()
    async with asyncio.timeout(60.0):
        await share_writes(calls, WRITERS, write, prefix)
        await done.wait()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    after = cpu_seconds(etcd_pid) if etcd_pid else None
    etcd_us = (after - server) / calls * 1e6 if after is not None and server is not None \
        else float("nan")
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)
    return {"us_per_txn": cpu / calls * 1e6, "txn_per_s": calls / wall,
            "etcd_us_per_txn": etcd_us}


async def _grpcio_watch(client: Any, prefix: bytes, end: bytes, start: int, calls: int,
                        done: asyncio.Event) -> None:
    call = rpc.WatchStub(client.channel).Watch()
    await call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
        key=prefix, range_end=end, start_revision=start)))
    seen = 0
    try:
        while seen < calls:
            response = await call.read()
            seen += len(response.events)
        done.set()
    finally:
        call.cancel()


async def run(quick: bool) -> dict[str, Any]:
    rounds, calls = (3, 2000) if quick else (8, 6000)
    runs: dict[str, list[dict[str, float]]] = {"grpcio": [], "h2c": []}
    async with etcd_with_client() as (client, _, etcd_pid):
        for kind in ("grpcio", "h2c"):  # warm-up, not counted
            await _round(client, kind, 500)
        for r in range(rounds):
            for kind in (("grpcio", "h2c") if r % 2 == 0 else ("h2c", "grpcio")):
                runs[kind].append(await _round(client, kind, calls, etcd_pid))
    out: dict[str, Any] = {"writers": WRITERS, "value_bytes": len(VALUE), "rounds": rounds,
                           "calls_per_round": calls, "modes": {}}
    for kind, results in runs.items():
        cpu = sorted(x["us_per_txn"] for x in results)
        rate = sorted(x["txn_per_s"] for x in results)
        server = sorted(x["etcd_us_per_txn"] for x in results)
        out["modes"][kind] = {"us_per_txn_least": round(cpu[0], 1),
                              "us_per_txn_median": round(cpu[len(cpu) // 2], 1),
                              "us_per_txn": [round(x["us_per_txn"], 1) for x in results],
                              "txn_per_s_median": round(rate[len(rate) // 2]),
                              "etcd_us_per_txn_median": round(server[len(server) // 2], 1)}
    grpcio, lean = out["modes"]["grpcio"], out["modes"]["h2c"]
    out["ratio_median"] = round(lean["us_per_txn_median"] / grpcio["us_per_txn_median"], 3)
    return out


def print_report(res: dict[str, Any]) -> None:
    print(f"\n== etcd transactions from one process ({res['writers']} writers, "
          f"~{res['value_bytes']} B guarded puts, a watch reading every event)")
    for kind, m in res["modes"].items():
        print(f"  {kind:<8} CPU us per transaction: least {m['us_per_txn_least']:7.1f}  "
              f"median {m['us_per_txn_median']:7.1f}  ({m['txn_per_s_median']:,} txn/s "
              f"median; etcd {m['etcd_us_per_txn_median']} us)  {m['us_per_txn']}")
    print(f"  h2c / grpcio, median CPU per transaction: {res['ratio_median']:.3f}x")


def main() -> int:
    return probe_main("etcd_calls", __doc__ or "", run, print_report)


if __name__ == "__main__":
    sys.exit(main())
