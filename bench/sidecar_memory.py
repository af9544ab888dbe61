"""statesync sidecar memory: its footprint beside its floors, and 100,000 cached sessions
against the payload's size.

Run: ``.venv/bin/python bench/sidecar_memory.py [--quick] [--sessions N] [--footprint-only]
[--python PATH]``

``--python PATH``: every measured process (the floors and the sidecars) run by that
interpreter instead of this one, e.g. a virtualenv holding the newest releases the
version ranges of pyproject.toml allow (docs/performance.md, "Sidecar footprint"); meshxl
must be installed in it. The report names its versions of the libraries a sidecar loads.

First the footprint (``bench/footprint.py``): a bare interpreter, a bare aetcd (grpcio)
client connected to etcd, and the sidecar side by side: idle RSS and threads, RSS per
owned session (10,000 sessions of ~1 KiB written through its API, with ``all`` and with
``narrow`` replication), and RSS and threads under load. Targets: idle RSS <= 45 MiB,
<= 2 KiB per owned session beyond the session's own bytes.

A local etcd and one ``meshxl serve statesync`` process. 100,000 sessions of one
cluster are written to etcd in the sidecar's record format (owner header + the
session's JSON), as other members' sidecars write them: this sidecar's watch-fed
cache then holds every one, which is what a member carries so that it can take any
session over. Measured: the sidecar's RSS before and once its cache holds them all
(``/v1/status``), and a second sidecar started afterwards that reads them in its full
sync (paged range reads) instead of the watch. The ratio is the RSS growth over the
payload bytes (session ids + session documents; etcd's header is overhead).

Beside it, the floor for any Python process: a separate interpreter holding the same
ids and documents in a plain ``dict[str, bytes]`` (its RSS growth).

Two document sizes: ~1 KiB (the statesync throughput benchmark's shopping cart) and
~256 B (a small session).

Then refused writes: a fresh sidecar gets 200 bulk saves (50 with ``--quick``), one at
a time, of four ~1 MB states each, every one refused by its If-Match (412 per item).
Nothing of them is stored, so nothing should stay: its RSS growth against the bytes
sent (a request kept in a reference cycle stays until the garbage collector runs).

Writes ``bench/results/sidecar_memory.json``. Loopback only; bounded loops; every
process is stopped at the end, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import aiohttp
import footprint
from benchlib import (
    Verdict,
    print_verdicts,
    quick_requested,
    run_benchmark,
)

from meshxl import etcd
from meshxl.etcd.keys import Keys
from meshxl.local import commands
from meshxl.local.ports import free_ports
from meshxl.local.procs import Owner
from meshxl.local.servers import HOST, start_etcd
from meshxl.local.wait import LocalError, wait_http, wait_until
from meshxl.stats import rss_bytes

NAME = "sidecar_memory"
TARGET_IDLE_MB = 45.0
TARGET_OVERHEAD = 2048
"""Bytes of RSS per owned session beyond the session's own (id + state)."""
OWNED = 10_000
TARGET_RATIO = 3.0
TARGET_REFUSED = 0.05
"""RSS growth after the refused writes / the bytes they sent."""
REFUSED_STATE = 1_000_000
REFUSED_ITEMS = 4
SIZES = (1024, 256)
TXN_OPS = 128
WRITERS = 4
SYNC_TIMEOUT = 180.0
SETUP_TIMEOUT = 30.0

FLOOR = """
import gc, os, sys
sys.path.insert(0, sys.argv[3])
from sidecar_memory import document
from meshxl.stats import rss_bytes
n, size = int(sys.argv[1]), int(sys.argv[2])
def rss():
    return rss_bytes(os.getpid())
gc.collect()
before = rss()
store = {}
for i in range(n):
    sid = f"sess-{i:07d}"
    store[sid] = document(sid, size)
gc.collect()
print(rss() - before)
"""


def document(session_id: str, size: int) -> bytes:
    """A JSON session document of about ``size`` bytes."""
    doc: dict[str, Any] = {"user": session_id, "cart": [], "pad": ""}
    base = len(json.dumps(doc).encode())
    doc["pad"] = "x" * max(0, size - base)
    return json.dumps(doc).encode()


async def fill(url: str, keys: Keys, cluster: str, sessions: int, size: int) -> int:
    """Write ``sessions`` records into etcd (transactions of 128 puts); payload bytes."""
    from meshxl.statesync.record import SessionRecord  # grpcio: after the footprint

    payload = 0
    now = time.time()
    ops: list[tuple[bytes, bytes]] = []
    for i in range(sessions):
        sid = f"sess-{i:07d}"
        data = document(sid, size)
        payload += len(sid) + len(data)
        record = SessionRecord(owner="other", content_type="application/json", created=now,
                               updated=now, data=data)
        ops.append((keys.session(cluster, sid).encode(), record.encode()))
    batches = [ops[i:i + TXN_OPS] for i in range(0, len(ops), TXN_OPS)]
    async with etcd.client(url) as client:
        tx = client.transactions

        async def writer(k: int) -> None:
            for batch in batches[k::WRITERS]:
                await client.transaction(compare=[], success=[tx.put(key, value)
                                                              for key, value in batch],
                                         failure=[])
        await asyncio.gather(*(writer(k) for k in range(WRITERS)))
    return payload


async def sidecar(stack: Owner, url: str, keys: Keys, cluster: str,
                  name: str, python: str = sys.executable) -> tuple[str, int]:
    app_port, port = free_ports(2)
    proc = stack.spawn(name, commands.statesync(
        cluster=cluster, member=name, app=f"{HOST}:{app_port}", listen=f"{HOST}:{port}",
        etcd=url, etcd_prefix=keys.root, log_level="warning", python=(python, "-u")))
    base = f"http://{HOST}:{port}"
    await wait_http(f"{base}/readyz", process=proc, timeout=SYNC_TIMEOUT)
    assert proc.pid is not None
    return base, proc.pid


async def cached(base: str, want: int, timeout: float) -> float:
    """Wait until the sidecar's cache holds ``want`` sessions; returns the wait."""
    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10.0)) as http:

        async def count() -> int:
            async with http.get(f"{base}/v1/status") as resp:
                return int((await resp.json())["cached_sessions"])

        async def enough() -> bool:
            return await count() >= want

        await wait_until(enough, timeout=timeout, interval=0.2,
                         what=f"{base} to cache {want} sessions")
    return time.monotonic() - started


async def settled_rss(pid: int, seconds: float = 1.0) -> int:
    """RSS once it stopped moving (the last of a few samples)."""
    value = rss_bytes(pid) or 0
    for _ in range(int(seconds / 0.25)):
        await asyncio.sleep(0.25)
        value = rss_bytes(pid) or 0
    return value


def python_floor(sessions: int, size: int, python: str = sys.executable) -> int:
    """RSS growth of a bare interpreter holding the same ids and documents in a dict."""
    out = subprocess.run([python, "-c", FLOOR, str(sessions), str(size),
                          str(Path(__file__).resolve().parent)],
                         capture_output=True, text=True, timeout=120, check=True)
    return int(out.stdout.strip())


async def one_size(stack: Owner, url: str, keys: Keys, sessions: int,
                   size: int, python: str = sys.executable) -> dict[str, Any]:
    cluster = f"mem{size}"
    watch_base, watch_pid = await sidecar(stack, url, keys, cluster, f"watch-{size}", python)
    rss0 = await settled_rss(watch_pid)
    t = time.monotonic()
    payload = await fill(url, keys, cluster, sessions, size)
    write_s = time.monotonic() - t
    caught_up = await cached(watch_base, sessions, SYNC_TIMEOUT)
    rss1 = await settled_rss(watch_pid, 2.0)
    t = time.monotonic()
    sync_base, sync_pid = await sidecar(stack, url, keys, cluster, f"sync-{size}", python)
    await cached(sync_base, sessions, SYNC_TIMEOUT)
    sync_s = time.monotonic() - t
    rss_sync = await settled_rss(sync_pid, 2.0)
    # The full-sync sidecar's baseline is taken as the watch sidecar's (same program,
    # same empty start): its own was not measurable before it synced.
    floor = await asyncio.to_thread(python_floor, sessions, size, python)
    watch_growth, sync_growth = rss1 - rss0, rss_sync - rss0
    return {
        "document_bytes": size, "sessions": sessions, "payload_bytes": payload,
        "payload_mb": round(payload / 2**20, 1),
        "rss_empty_mb": round(rss0 / 2**20, 1),
        "rss_watch_fed_mb": round(rss1 / 2**20, 1),
        "rss_full_sync_mb": round(rss_sync / 2**20, 1),
        "growth_per_session_bytes": round(max(watch_growth, sync_growth) / sessions),
        "ratio_watch_fed": round(watch_growth / payload, 2),
        "ratio_full_sync": round(sync_growth / payload, 2),
        "python_dict_floor_ratio": round(floor / payload, 2),
        "write_s": round(write_s, 1), "watch_catch_up_s": round(caught_up, 1),
        "full_sync_s": round(sync_s, 1),
    }


async def refused_writes(stack: Owner, url: str, keys: Keys, requests: int,
                         python: str = sys.executable) -> dict[str, Any]:
    """RSS of a sidecar before and after ``requests`` bulk saves whose every item is
    refused by its If-Match (none of the sessions exists)."""
    base, pid = await sidecar(stack, url, keys, "refused", "refused", python)
    body = json.dumps({"items": [
        {"session": f"refused-{i}", "data": "x" * REFUSED_STATE, "if_match": '"1"'}
        for i in range(REFUSED_ITEMS)]}).encode()
    rss0 = await settled_rss(pid)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30.0)) as http:
        for _ in range(requests):
            async with http.post(f"{base}/v1/sessions:bulkSave", data=body,
                                 headers=headers) as resp:
                answer = await resp.json()
            statuses = {item["status"] for item in answer["items"]}
            if resp.status != 200 or statuses != {412}:
                raise LocalError(f"a refused bulk save answered {resp.status} {statuses}")
    rss1 = await settled_rss(pid, 2.0)
    sent = requests * len(body)
    return {"requests": requests, "items_per_request": REFUSED_ITEMS,
            "request_bytes": len(body), "sent_mb": round(sent / 2**20, 1),
            "rss_before_mb": round(rss0 / 2**20, 1), "rss_after_mb": round(rss1 / 2**20, 1),
            "ratio_growth_to_sent": round(max(0, rss1 - rss0) / sent, 4)}


async def run(work: Path, sessions: int, sizes: tuple[int, ...], refused: int,
              quick: bool, footprint_only: bool, python: str = sys.executable
              ) -> dict[str, Any]:
    stack = Owner(work, grace=3.0)
    keys = Keys("/meshxl-bench-memory")
    res: dict[str, Any] = {"sizes": []}
    step = "starting etcd"
    try:
        async with asyncio.timeout(SETUP_TIMEOUT):
            url = (await start_etcd(stack))[0]
        step = "measuring the footprint"
        res["footprint"] = await footprint.measure(
            stack, url, OWNED, 3.0 if quick else 8.0, 20_000 if quick else 100_000, python)
        if footprint_only:
            return res
        for size in sizes:
            step = f"measuring {sessions} sessions of ~{size} B"
            res["sizes"].append(await one_size(stack, url, keys, sessions, size, python))
        step = f"{refused} refused bulk saves"
        res["refused"] = await refused_writes(stack, url, keys, refused, python)
    except (LocalError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
        traceback.print_exc()
        logs = stack.report()
        raise SystemExit(f"failed {step}: {exc!r}\n{logs}") from None
    finally:
        await stack.aclose()
    return res


def verdicts(res: dict[str, Any]) -> list[Verdict]:
    out = []
    fp = res.get("footprint")
    if fp is not None:
        floor = fp["bare_etcd_client"]
        for o in fp["owned"]:
            idle = o["idle"]
            out.append(Verdict(
                f"statesync: sidecar idle RSS ({o['replication']} replication)",
                idle["rss_mb"], TARGET_IDLE_MB, "MiB",
                reference=f"{idle['threads']} threads; bare aetcd client "
                          f"{floor['rss_mb']} MiB, {floor['threads']} threads; bare "
                          f"interpreter {fp['bare_python']['rss_mb']} MiB"))
            out.append(Verdict(
                f"statesync: RSS per owned session beyond its bytes, {o['sessions']:,} x "
                f"~{o['document_bytes']} B ({o['replication']} replication)",
                o["overhead_per_session_bytes"], TARGET_OVERHEAD, "B",
                reference=f"{o['growth_per_session_bytes']} B growth per session"))
    for s in res["sizes"]:
        worst = max(s["ratio_watch_fed"], s["ratio_full_sync"])
        out.append(Verdict(
            f"statesync: sidecar RSS growth / payload, {s['sessions']:,} x "
            f"~{s['document_bytes']} B",
            worst, TARGET_RATIO, "x",
            reference=f"watch-fed {s['ratio_watch_fed']}x, full sync {s['ratio_full_sync']}x;"
            f" plain Python dict {s['python_dict_floor_ratio']}x"))
    r = res.get("refused")
    if r is not None:
        out.append(Verdict(
            "statesync: sidecar RSS growth / bytes sent, bulk saves refused by If-Match",
            r["ratio_growth_to_sent"], TARGET_REFUSED, "x",
            reference=f"{r['rss_before_mb']} -> {r['rss_after_mb']} MB after {r['requests']} "
                      f"requests, {r['sent_mb']} MB sent"))
    return out


def print_report(res: dict[str, Any], verdict_list: list[Verdict]) -> None:
    if res.get("footprint") is not None:
        print("\n".join(footprint.report(res["footprint"])))
    print("\n== sidecar memory: sessions cached, RSS growth over payload (ids + documents)")
    print(f"  {'doc B':>6} {'sessions':>9} {'payload MB':>10} {'empty':>6} {'watch':>6} "
          f"{'sync':>6} {'B/sess':>7} {'watch x':>8} {'sync x':>7} {'dict x':>7} "
          f"{'catch-up s':>10} {'sync s':>7}")
    for s in res["sizes"]:
        print(f"  {s['document_bytes']:>6} {s['sessions']:>9,} {s['payload_mb']:>10} "
              f"{s['rss_empty_mb']:>6} {s['rss_watch_fed_mb']:>6} {s['rss_full_sync_mb']:>6} "
              f"{s['growth_per_session_bytes']:>7} {s['ratio_watch_fed']:>8} "
              f"{s['ratio_full_sync']:>7} {s['python_dict_floor_ratio']:>7} "
              f"{s['watch_catch_up_s']:>10} {s['full_sync_s']:>7}")
    r = res.get("refused")
    if r is not None:
        print(f"  refused writes: {r['requests']} bulk saves of {r['items_per_request']} x "
              f"~1 MB, all 412: RSS {r['rss_before_mb']} -> {r['rss_after_mb']} MB, "
              f"{r['sent_mb']} MB sent ({r['ratio_growth_to_sent']}x)")
    print_verdicts("sidecar memory", verdict_list)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 sessions, ~1 KiB only")
    parser.add_argument("--sessions", type=int, help="sessions (default 100000; quick 20000)")
    parser.add_argument("--footprint-only", action="store_true",
                        help="only the footprint (floors, idle, owned sessions, load)")
    parser.add_argument("--python", metavar="PATH", default=sys.executable,
                        help="the interpreter of every process measured (default: this "
                             "one), e.g. a virtualenv with the newest dependencies")
    args = parser.parse_args()
    if not os.access(args.python, os.X_OK):
        parser.error(f"--python {args.python}: not an executable file")
    args.python = os.path.abspath(args.python)
    quick = quick_requested(args.quick)
    sessions = args.sessions or (20_000 if quick else 100_000)
    if sessions < 1:
        parser.error("sessions must be >= 1")
    sizes = SIZES[:1] if quick else SIZES
    refused = 50 if quick else 200
    return run_benchmark(
        NAME, quick, "meshxl-bench-memory-",
        lambda work: run(work, sessions, sizes, refused, quick, args.footprint_only,
                         args.python),
        verdicts, print_report)


if __name__ == "__main__":
    sys.exit(main())
