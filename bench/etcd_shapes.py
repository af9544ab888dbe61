"""What etcd spends on one write, by the shape of its request: a bare put beside the
session store's transaction, and the transaction's parts taken away one by one.

Run: ``.venv/bin/python bench/etcd_shapes.py [--quick]``

64 writers in one process (uvloop) over meshxl's HTTP/2 path (``meshxl.etcd.h2c``), each
overwriting its own key with ~1.1 KiB, a watch of the keys' prefix reading every event
(as the sidecar's cache does), one etcd; the shapes in alternating rounds, each round
on keys of its own:

* ``put``: ``KV.Put``, no lease (what ``bench/statesync.py``'s raw writers send);
* ``txn_put``: a ``Txn`` holding that put alone: no compare, no lease;
* ``guarded_flat``: the store's guarded put (``statesync.wire``: compare the key's
  mod_revision, put with a lease, read the key if the compare fails) as the ``Txn``;
* ``guarded``: the same nested in a batch of one, as the store sends it with
  ``--batch-max-ops 1``.

Reported per shape, medians over the rounds: etcd's CPU microseconds per write (from
``/proc``: what the machine's other work moves least), writes per WAL fsync (etcd's
``etcd_disk_wal_fsync_duration_seconds_count``: fewer writes share an fsync when each
costs more), writes per second. For where etcd spends it, run etcd with
``--enable-pprof`` and read ``/debug/pprof/profile`` during a round
(docs/performance.md, "What a write with batching off costs etcd"). No targets.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import urllib.request
from typing import Any

from aetcd import rpc
from benchlib import etcd_with_client, probe_main, share_writes, watch_events

from meshxl.etcd import h2c
from meshxl.statesync import wire
from meshxl.stats import cpu_seconds

WRITERS = 64
VALUE = b"x" * 1100
PREFIX = b"/bench-shapes/"
SHAPES = ("put", "txn_put", "guarded_flat", "guarded")
PUT = "/etcdserverpb.KV/Put"
_ROUNDS = iter(range(1 << 30))


def _fsyncs(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith("etcd_disk_wal_fsync_duration_seconds_count"):
                return float(line.split()[-1])
    raise RuntimeError("etcd's /metrics has no WAL fsync count")


def _unnested(op: bytes) -> bytes:
    """A serialized ``RequestOp.request_txn`` as the ``TxnRequest`` it holds."""
    i, shift, size = 1, 0, 0
    while True:
        byte = op[i]
        size |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not byte & 0x80:
            break
    assert len(op) - i == size
    return op[i:]


async def _round(client: h2c.Client, url: str, shape: str, calls: int, lease: int,
                 etcd_pid: int) -> dict[str, float]:
    head = await client.kvstub.Range(rpc.RangeRequest(key=b"\0", limit=1))
    start = head.header.revision + 1
    prefix = PREFIX + b"%d/" % next(_ROUNDS)
    end = prefix[:-1] + bytes([prefix[-1] + 1])
    channel = client.channel_h2c()
    done = asyncio.Event()
    revisions = [0] * WRITERS

    async def write(i: int, key: bytes) -> None:
        if shape == "put":
            await channel.call(PUT, rpc.PutRequest(key=key, value=VALUE).SerializeToString(),
                               5.0, rpc.PutResponse.FromString)
            return
        if shape == "txn_put":
            request = rpc.TxnRequest(success=[rpc.RequestOp(request_put=rpc.PutRequest(
                key=key, value=VALUE))]).SerializeToString()
        else:
            op = wire.guarded_put(key, VALUE, revisions[i], lease)
            request = wire.txn_request([op]) if shape == "guarded" else _unnested(op)
        answer = await channel.call(h2c.TXN, request, 5.0, h2c.txn_parse)
        inner = answer.responses[0].response_txn if shape == "guarded" else answer
        if not inner.succeeded:
            raise RuntimeError(f"{shape}: a compare failed")
        revisions[i] = answer.header.revision

    watcher = asyncio.ensure_future(watch_events(client, prefix, end, start, calls, done))
    await asyncio.sleep(0.05)  # the watch is open
    fsyncs, server, wall = _fsyncs(url), cpu_seconds(etcd_pid), time.perf_counter()
    async with asyncio.timeout(120.0):
        await share_writes(calls, WRITERS, write, prefix)
        await done.wait()
    wall = time.perf_counter() - wall
    server_after, fsyncs = cpu_seconds(etcd_pid), _fsyncs(url) - fsyncs
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)
    assert server is not None and server_after is not None
    return {"etcd_us_per_write": (server_after - server) / calls * 1e6,
            "writes_per_fsync": calls / fsyncs if fsyncs else float("nan"),
            "writes_per_s": calls / wall}


async def run(quick: bool) -> dict[str, Any]:
    rounds, calls = (3, 2000) if quick else (7, 5000)
    runs: dict[str, list[dict[str, float]]] = {shape: [] for shape in SHAPES}
    async with etcd_with_client() as (client, url, etcd_pid):
        lease = (await client.leasestub.LeaseGrant(rpc.LeaseGrantRequest(TTL=600))).ID
        for shape in SHAPES:  # warm-up, not counted
            await _round(client, url, shape, 500, lease, etcd_pid)
        for r in range(rounds):
            for shape in (SHAPES if r % 2 == 0 else SHAPES[::-1]):
                runs[shape].append(await _round(client, url, shape, calls, lease,
                                                etcd_pid))
    figures = ("etcd_us_per_write", "writes_per_fsync", "writes_per_s")
    modes: dict[str, dict[str, Any]] = {
        shape: {figure: round(statistics.median(r[figure] for r in results), 1)
                for figure in figures}
        for shape, results in runs.items()}
    for shape, results in runs.items():
        modes[shape]["etcd_us_per_write_runs"] = [round(r["etcd_us_per_write"], 1)
                                                  for r in results]
    return {"writers": WRITERS, "value_bytes": len(VALUE), "rounds": rounds,
            "calls_per_round": calls, "modes": modes}


def print_report(res: dict[str, Any]) -> None:
    print(f"\n== etcd's CPU per write by request shape ({res['writers']} writers, "
          f"~{res['value_bytes']} B, a watch reading every event; medians of "
          f"{res['rounds']} rounds)")
    for shape, m in res["modes"].items():
        print(f"  {shape:<13} etcd {m['etcd_us_per_write']:6.1f} us/write  "
              f"{m['writes_per_fsync']:5.1f} writes/fsync  {m['writes_per_s']:7,.0f} "
              f"writes/s  {m['etcd_us_per_write_runs']}")


def main() -> int:
    return probe_main("etcd_shapes", __doc__ or "", run, print_report)


if __name__ == "__main__":
    sys.exit(main())
