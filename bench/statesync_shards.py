"""Sessions over K etcd clusters: what a write costs per shard, and what one shard's
loss and a reshard cost.

Run: ``.venv/bin/python bench/statesync_shards.py [--quick] [--writes N] [--rounds R]``

Per mode, one fresh set of single-member etcd clusters on loopback and one sidecar
(``meshxl serve statesync``): *unsharded* (sessions in the main cluster, no shard map:
the reference), or K = 1, 2 or 3 shards (a map in the main cluster, each shard one more
etcd). The application writes ``--writes`` distinct sessions (~256 B of JSON) from W
concurrent writers through ``meshxl.client.AsyncClient``. Measured per mode: writes/s,
the sidecar's CPU per write, the writes per etcd transaction (the sidecar's
``meshxl_statesync_batch_size``), each etcd's CPU per write of its shard, and every
acknowledged session read back (0 lost). The CPU modes run ``--rounds`` times, in
alternating order; each figure is the median of its rounds, and K = 1 against
unsharded the median of the rounds' paired ratios.

What a write costs the sidecar is set by how many writes share an etcd transaction: a
part per write and a part per transaction (the call, its watch event), so
``cpu = a + b / batch``. Unsharded runs at W = 8, 16, 32 and 64 give the curve; each
sharded run is compared with the curve at its own batch size ("does a shard make a
write dearer than the same batch does without shards?"). At one sidecar load, K shards
split the writes into K transactions, each K times smaller: that costs what an
unsharded sidecar with 1/K of the load pays, and is reported beside it (no target).

With K >= 2 (W = 32), the other shards' writes are timed with every shard up and with
one shard's etcd paused (SIGSTOP: it answers nothing, as behind a partition), the
application writing every session all along, in three alternating rounds: their writes/s
and p99 latency while it is down against all up. Then that etcd is killed and every
session is written once more: the fraction that fails (ideal 1/K) and that the other
shards' writes all succeed (the client then takes a 503 as the answer; by default it
retries one for about 2.5 s).
The sessions a new shard would take (K -> K + 1) are counted by ``meshxl shards set
--dry-run``'s plan over the stored sessions, beside the ideal 1/(K + 1); then the shard
is added for real, online, while every session is written once more: the time it takes,
the sessions moved, the writes failed (the client retrying a 503, as by default) and
lost. One shard down is measured after that, over the K + 1 shards.

On two cores throughput cannot grow with K (etcd and the sidecar share them): the
targets are per write. Targets: the sidecar's CPU per write with K = 1 within 1.05x of
unsharded at the same load, and every sharded run within 1.05x of the unsharded curve
at its batch size; 0 acknowledged writes lost; with one of K shards down, failing writes
within 0.05 of 1/K and none of the other shards' failing; a reshard moving within 0.05
of 1/(K + 1); with one shard paused, the others' writes/s at least 0.9x and their p99
at most 1.25x of all up. Writes ``bench/results/statesync_shards.json``. Loopback only; bounded;
every process is killed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from benchlib import Verdict, env_info, print_verdicts, quick_requested, write_results

from meshxl import etcd as meshxl_etcd
from meshxl.client import AsyncClient, Backoff, ClientSettings, SidecarError
from meshxl.etcd.keys import Keys
from meshxl.etcd.shards import ShardMap, parse_shard_map
from meshxl.local import commands
from meshxl.local.ports import free_ports
from meshxl.local.procs import Owner
from meshxl.local.servers import HOST, start_etcd
from meshxl.local.wait import wait_http, wait_until
from meshxl.operator.shards import plan, set_map
from meshxl.statesync.shards import DOWN_GRACE
from meshxl.stats import cpu_seconds

WRITERS = 32
CPU_MODES = ((None, 8), (None, 16), (None, 64), (None, 32), (1, 32), (2, 32), (2, 64),
             (3, 48), (3, 96))
"""(shards, writers) of the CPU runs: unsharded at four loads (the curve), then K = 1, 2
and 3 at the unsharded reference's load and at K times it. Unsharded and K = 1 at 32
writers run one after the other in every round (either order), for a paired ratio."""
EXTRA_MODES = (1, 2, 3)
"""Shards of the runs (W = 32) that go on to one shard down and an online reshard."""
CLUSTER = "bench"
STATE = {"cart": ["item"] * 24, "note": "x" * 64}


async def _write_all(url: str, ids: list[str], limit: float, writers: int = WRITERS,
                     retries: bool = True) -> tuple[dict[str, str], int]:
    """Every id written once by ``writers`` concurrent writers: acknowledged id ->
    ETag, and the number refused (any error). ``retries`` False: a 503 is the answer
    (the client's default retries it for about 2.5 s)."""
    acked: dict[str, str] = {}
    failed = 0
    queue = list(reversed(ids))
    deadline = time.monotonic() + limit

    async def writer(client: AsyncClient) -> None:
        nonlocal failed
        while queue and time.monotonic() < deadline:
            session = queue.pop()
            try:
                written = await client.put(session, {**STATE, "id": session})
                acked[session] = written.etag
            except SidecarError:
                failed += 1

    settings = ClientSettings() if retries else ClientSettings(unavailable=Backoff(attempts=1))
    async with AsyncClient(url, settings=settings) as client:
        await asyncio.gather(*(writer(client) for _ in range(writers)))
    return acked, failed


async def _lost(url: str, acked: dict[str, str]) -> int:
    """Acknowledged sessions that do not read back as written (bulk gets of 100)."""
    lost = 0
    ids = sorted(acked)
    async with AsyncClient(url) as client:
        for start in range(0, len(ids), 100):
            batch = ids[start:start + 100]
            for session, got in zip(batch, await client.bulk_get(batch), strict=True):
                if isinstance(got, SidecarError) or got.state.get("id") != session:
                    lost += 1
    return lost


async def _batches(url: str) -> tuple[float, float]:
    """The sidecar's write transactions so far: (writes in them, transactions)."""
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as resp:
        text = await resp.text()
    found = dict(re.findall(r'^meshxl_statesync_batch_size_(sum|count)\{kind="write"\} (\S+)$',
                            text, re.MULTILINE))
    return float(found.get("sum", 0.0)), float(found.get("count", 0.0))


async def one_mode(k: int | None, writes: int, writers: int = WRITERS,
                   extras: bool = False) -> dict[str, Any]:
    """``k`` None: unsharded. ``extras``: then the reshard and one shard down."""
    with tempfile.TemporaryDirectory(prefix="meshxl-shards-") as work:
        owner = Owner(Path(work), label=f"shards-{k}")
        try:
            main_url, main = await start_etcd(owner, "main")
            shards = [await start_etcd(owner, f"shard-{i + 1}") for i in range(k or 0)]
            keys = Keys()
            shard_map = None
            if k:
                shard_map = parse_shard_map({"version": 1, "shards": [
                    {"name": f"s{i + 1}", "etcd": url} for i, (url, _) in enumerate(shards)]})
                async with meshxl_etcd.client(main_url) as client:
                    await client.put(keys.shards.encode(), shard_map.encode())
            api, app = free_ports(2)
            sidecar = owner.spawn("sidecar", commands.statesync(
                cluster=CLUSTER, member="m1", app=f"{HOST}:{app}", listen=f"{HOST}:{api}",
                etcd=main_url, log_level="warning"))
            url = f"http://{HOST}:{api}"
            await wait_http(f"{url}/readyz", process=sidecar, timeout=30)
            warm = [f"warm-{i}" for i in range(200)]
            await _write_all(url, warm, 30)
            ids = [f"s-{i}" for i in range(writes)]
            procs = {"sidecar": sidecar, "main": main,
                     **{f"s{i + 1}": p for i, (_, p) in enumerate(shards)}}
            batched0 = await _batches(url)
            cpu0 = {n: cpu_seconds(p.pid or 0) or 0.0 for n, p in procs.items()}
            started = time.perf_counter()
            acked, failed = await _write_all(url, ids, 120, writers)
            seconds = time.perf_counter() - started
            cpu = {n: (cpu_seconds(p.pid or 0) or 0.0) - cpu0[n] for n, p in procs.items()}
            batched1 = await _batches(url)
            transactions = batched1[1] - batched0[1]
            out: dict[str, Any] = {
                "shards": k or 0, "writers": writers, "writes": len(acked), "failed": failed,
                "writes_per_s": round(len(acked) / seconds, 1),
                "sidecar_cpu_us_per_write": round(cpu["sidecar"] / max(1, len(acked)) * 1e6, 1),
                "transactions": int(transactions),
                "writes_per_transaction": round((batched1[0] - batched0[0])
                                                / max(1.0, transactions), 2),
                "lost": await _lost(url, acked)}
            if shard_map is not None:
                per = {name: sum(1 for s in acked if shard_map.of(s).name == name)
                       for name in shard_map.names}
                out["etcd_cpu_us_per_write"] = {
                    name: round(cpu[name] / max(1, per[name]) * 1e6, 1) for name in per}
                out["per_shard_writes"] = per
                grown = parse_shard_map({"version": 2, "shards": [  # the new one not dialled
                    *shard_map.as_dict()["shards"],
                    {"name": f"s{k + 1}", "etcd": "http://127.0.0.1:1"}]})

                def connect(urls: str) -> Any:
                    return meshxl_etcd.client(urls)

                async with meshxl_etcd.client(main_url) as client:
                    moves = await plan(client, keys, grown, connect)
                out["reshard_moved_fraction"] = round(moves.moved / max(1, moves.sessions), 4)
                if extras:
                    shard_map, out["reshard"] = await _reshard(owner, main_url, url, shard_map,
                                                               ids, connect)
                    shards.append(out["reshard"].pop("etcd"))
                if k >= 2 and extras:
                    out["others_while_down"] = await _others_while_down(
                        url, ids, shard_map, shards[-1][1].pid or 0)
                    await shards[-1][1].kill()
                    down = shard_map.names[-1]
                    await asyncio.sleep(2.0)  # the sidecar sees it gone (DOWN_GRACE)
                    again, refused = await _write_all(url, ids, 120, retries=False)
                    out["one_down"] = {
                        "shard": down, "of": len(shard_map.shards),
                        "failed_fraction": round(refused / len(ids), 4),
                        "others_failed": sum(1 for s in ids if s not in again
                                             and shard_map.of(s).name != down)}
            else:
                out["etcd_cpu_us_per_write"] = {"main": round(cpu["main"] / max(1, len(acked))
                                                              * 1e6, 1)}
            return out
        finally:
            await owner.aclose()


async def _shard_reachable(url: str, name: str) -> bool:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/v1/status") as resp:
        status = await resp.json()
    return bool(next(s for s in status["shards"]["shards"] if s["name"] == name)["reachable"])


async def _mixed_load(url: str, ids: list[str], down: str, shard_map: ShardMap,
                      seconds: float) -> dict[str, float]:
    """Every session written in turn by ``WRITERS`` writers for ``seconds`` (a 503 is the
    answer): the writes/s and latency p50/p99 (ms) of the sessions outside shard
    ``down``, as the application sees them."""
    latencies: list[float] = []
    position = 0
    deadline = time.monotonic() + seconds

    async def writer(client: AsyncClient) -> None:
        nonlocal position
        while time.monotonic() < deadline:
            session = ids[position % len(ids)]
            position += 1
            started = time.perf_counter()
            try:
                await client.put(session, {**STATE, "id": session})
            except SidecarError:
                continue
            if shard_map.of(session).name != down:
                latencies.append((time.perf_counter() - started) * 1e3)

    settings = ClientSettings(unavailable=Backoff(attempts=1))
    started = time.perf_counter()
    async with AsyncClient(url, settings=settings) as client:
        await asyncio.gather(*(writer(client) for _ in range(WRITERS)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"writes_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(statistics.median(latencies), 2),
            "p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))], 2)}


async def _others_while_down(url: str, ids: list[str], shard_map: ShardMap, pid: int,
                             rounds: int = 3, seconds: float = 2.0) -> dict[str, Any]:
    """The other shards' writes with one shard's etcd up, then stopped (SIGSTOP: it
    answers nothing, as behind a partition), in alternating rounds, the application
    writing every session: the medians of each state, and their ratio."""
    down = shard_map.names[-1]
    figures: dict[str, list[dict[str, float]]] = {"up": [], "down": []}
    for _ in range(rounds):
        figures["up"].append(await _mixed_load(url, ids, down, shard_map, seconds))
        os.kill(pid, signal.SIGSTOP)
        try:
            await wait_until(lambda: _not(_shard_reachable(url, down)), timeout=30,
                             what=f"the sidecar to see shard {down} unreachable")
            await asyncio.sleep(DOWN_GRACE)  # its sessions now refused at once
            figures["down"].append(await _mixed_load(url, ids, down, shard_map, seconds))
        finally:
            os.kill(pid, signal.SIGCONT)
        await wait_until(lambda: _shard_reachable(url, down), timeout=30,
                         what=f"shard {down} reachable again")
    median = {state: {name: statistics.median(r[name] for r in runs)
                      for name in ("writes_per_s", "p50_ms", "p99_ms")}
              for state, runs in figures.items()}
    return {"shard": down, "of": len(shard_map.shards), "rounds": figures, **median,
            "rate_ratio": round(median["down"]["writes_per_s"]
                                / median["up"]["writes_per_s"], 3),
            "p99_ratio": round(median["down"]["p99_ms"] / median["up"]["p99_ms"], 3)}


async def _not(check: Any) -> bool:
    return not await check


async def _reshard(owner: Owner, main_url: str, url: str, shard_map: ShardMap,
                   ids: list[str], connect: Any) -> tuple[ShardMap, dict[str, Any]]:
    """K -> K + 1 online (``meshxl shards set``'s code) while every session is written
    once more (the client retrying a 503, as by default): how long it took, the
    sessions moved against the ideal, the writes that failed, and 0 lost."""
    name = f"s{len(shard_map.shards) + 1}"
    added = await start_etcd(owner, f"shard-{len(shard_map.shards) + 1}")
    grown = parse_shard_map({"version": 0, "shards": [
        *shard_map.as_dict()["shards"], {"name": name, "etcd": added[0]}]})
    async with meshxl_etcd.client(main_url) as client:
        writing = asyncio.ensure_future(_write_all(url, ids, 120))
        await asyncio.sleep(0.2)
        started = time.perf_counter()
        stored, planned = await set_map(client, Keys(), grown, connect)
        seconds = time.perf_counter() - started
        acked, failed = await writing
    return stored, {
        "to": len(stored.shards), "seconds": round(seconds, 2), "sessions": planned.sessions,
        "moved": planned.moved,
        "moved_fraction": round(planned.moved / max(1, planned.sessions), 4),
        "moved_by_command": planned.moved_now, "moved_by_sidecar": planned.moved_before,
        "writes_during": len(acked), "failed_during": failed,
        "lost": await _lost(url, acked), "etcd": added}


def curve(modes: list[dict[str, Any]]) -> tuple[float, float]:
    """``a`` + ``b`` / batch fitted (least squares) to the unsharded modes' sidecar CPU
    per write (us) over their writes per transaction: (a, b). Pure."""
    points = [(1.0 / m["writes_per_transaction"], m["sidecar_cpu_us_per_write"])
              for m in modes if m["shards"] == 0 and m.get("writes_per_transaction")]
    if len(points) < 2:
        raise ValueError("the curve needs two unsharded modes or more")
    slope, intercept = statistics.linear_regression([x for x, _ in points],
                                                    [y for _, y in points])
    return intercept, slope


def at_batch(fit: tuple[float, float], batch: float) -> float:
    return fit[0] + fit[1] / batch


def verdicts(result: dict[str, Any]) -> list[Verdict]:
    modes, extras = result["modes"], result.get("extras", [])
    out = [Verdict("acknowledged writes lost, every mode",
                   sum(m["lost"] for m in [*modes, *extras]), 0, "writes")]
    by = {(m["shards"], m["writers"]): m for m in modes}
    base = by.get((0, WRITERS))
    if base is not None and (1, WRITERS) in by:
        one = by[(1, WRITERS)]
        out.append(Verdict(f"K=1, {WRITERS} writers: sidecar CPU per write / unsharded",
                           paired_ratio(one, base), 1.05, "x",
                           reference=f"median of the rounds' ratios; medians unsharded "
                                     f"{base['sidecar_cpu_us_per_write']} us, K=1 "
                                     f"{one['sidecar_cpu_us_per_write']} us per write"))
    fit = curve(modes)
    for m in modes:
        k, writers = m["shards"], m["writers"]
        if not k:
            continue
        batch = m["writes_per_transaction"]
        expected = at_batch(fit, batch)
        out.append(Verdict(f"K={k}, {writers} writers: sidecar CPU per write / unsharded "
                           "at its batch", round(m["sidecar_cpu_us_per_write"] / expected, 3),
                           1.05, "x", reference=f"{m['sidecar_cpu_us_per_write']} us at "
                           f"{batch} writes per transaction; unsharded {expected:.1f} us"))
    for m in extras:
        k = m["shards"]
        out.append(Verdict(f"K={k}: reshard to K+1 moves, off 1/(K+1) by",
                           round(abs(m["reshard_moved_fraction"] - 1 / (k + 1)), 4), 0.05, "",
                           reference=f"moved {m['reshard_moved_fraction']}, ideal "
                                     f"{1 / (k + 1):.3f}"))
        if "reshard" in m:
            moved = m["reshard"]
            out.append(Verdict(f"K={k} -> {k + 1} online, under writes: moved off 1/(K+1) by",
                               round(abs(moved["moved_fraction"] - 1 / (k + 1)), 4), 0.05, "",
                               reference=f"moved {moved['moved']} of {moved['sessions']} in "
                                         f"{moved['seconds']} s"))
            out.append(Verdict(f"K={k} -> {k + 1} online: writes failed or lost",
                               moved["failed_during"] + moved["lost"], 0, "writes",
                               reference=f"{moved['writes_during']} writes during it"))
        if "others_while_down" in m:
            while_down = m["others_while_down"]
            n = while_down["of"]
            out.append(Verdict(f"one of {n} shards down: the others' writes/s / all up",
                               while_down["rate_ratio"], 0.9, "x", at_most=False,
                               reference=f"{while_down['down']['writes_per_s']} vs "
                                         f"{while_down['up']['writes_per_s']} writes/s"))
            out.append(Verdict(f"one of {n} shards down: the others' p99 latency / all up",
                               while_down["p99_ratio"], 1.25, "x",
                               reference=f"p99 {while_down['down']['p99_ms']} vs "
                                         f"{while_down['up']['p99_ms']} ms, p50 "
                                         f"{while_down['down']['p50_ms']} vs "
                                         f"{while_down['up']['p50_ms']} ms"))
        if "one_down" in m:
            down = m["one_down"]
            n = down["of"]
            out.append(Verdict(f"one of {n} shards down, failing writes off 1/{n} by",
                               round(abs(down["failed_fraction"] - 1 / n), 4), 0.05, "",
                               reference=f"failed {down['failed_fraction']}, ideal {1 / n:.3f}"))
            out.append(Verdict(f"one of {n} shards down, other shards' writes failing",
                               down["others_failed"], 0, "writes"))
    return out


def paired_ratio(mode: dict[str, Any], reference: dict[str, Any]) -> float:
    """The median of each round's sidecar CPU per write of ``mode`` over ``reference``'s
    run beside it (both with ``runs``), or the ratio of their medians. Pure."""
    pairs = list(zip(mode.get("runs", []), reference.get("runs", []), strict=False))
    if not pairs:
        return round(mode["sidecar_cpu_us_per_write"]
                     / reference["sidecar_cpu_us_per_write"], 3)
    return round(statistics.median(a / b for a, b in pairs), 3)


def _median_mode(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's runs as one: the run of median sidecar CPU per write, with the median
    of each figure and every run's lost writes."""
    ordered = sorted(runs, key=lambda r: r["sidecar_cpu_us_per_write"])
    out = dict(ordered[len(ordered) // 2])
    for name in ("writes_per_s", "sidecar_cpu_us_per_write", "writes_per_transaction"):
        out[name] = round(statistics.median(r[name] for r in runs), 2)
    out["lost"] = sum(r["lost"] for r in runs)
    out["runs"] = [r["sidecar_cpu_us_per_write"] for r in runs]
    return out


def _line(name: str, mode: dict[str, Any]) -> str:
    return (f"  {name:<10} {mode['writers']:>3} writers {mode['writes_per_s']:>8} w/s  "
            f"sidecar {mode['sidecar_cpu_us_per_write']} us/write at "
            f"{mode['writes_per_transaction']} writes/txn  etcd "
            f"{mode['etcd_cpu_us_per_write']} us/write  lost {mode['lost']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--writes", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    quick = quick_requested(args.quick)
    writes = 1200 if quick else args.writes
    rounds = 1 if quick else max(1, args.rounds)
    print(f"statesync shards: {writes} session writes per mode, {rounds} rounds")
    runs: dict[tuple[int | None, int], list[dict[str, Any]]] = {m: [] for m in CPU_MODES}
    for r in range(rounds):
        for k, writers in (CPU_MODES if r % 2 == 0 else tuple(reversed(CPU_MODES))):
            mode = asyncio.run(one_mode(k, writes, writers))
            runs[(k, writers)].append(mode)
            print(_line("unsharded" if k is None else f"K={k}", mode))
    modes = [_median_mode(runs[m]) for m in CPU_MODES]
    extras = []
    for k in EXTRA_MODES:
        mode = asyncio.run(one_mode(k, writes, WRITERS, extras=True))
        extras.append(mode)
        print(f"  K={k}: reshard plan moves {mode['reshard_moved_fraction']}"
              + (f"  online to K={mode['reshard']['to']}: {mode['reshard']['moved']} moved "
                 f"in {mode['reshard']['seconds']} s, {mode['reshard']['failed_during']} "
                 f"failed, {mode['reshard']['lost']} lost" if "reshard" in mode else "")
              + (f"  others while one is down: {mode['others_while_down']['rate_ratio']}x "
                 f"the writes/s, {mode['others_while_down']['p99_ratio']}x the p99"
                 if "others_while_down" in mode else "")
              + (f"  one down: failed {mode['one_down']['failed_fraction']}, others "
                 f"{mode['one_down']['others_failed']}" if "one_down" in mode else ""))
    a, b = curve(modes)
    base = next(m for m in modes if (m["shards"], m["writers"]) == (0, WRITERS))
    one_load = {f"K={m['shards']}": paired_ratio(m, base)
                for m in modes if m["shards"] and m["writers"] == WRITERS}
    print(f"\n  unsharded curve: {a:.1f} us per write + {b:.0f} us per transaction / batch")
    print(f"  at one sidecar load ({WRITERS} writers), sidecar CPU per write / unsharded: "
          f"{one_load} (no target: K transactions, each K times smaller)")
    result = {"modes": modes, "extras": extras, "writes": writes, "rounds": rounds,
              "curve_us": {"per_write": round(a, 1), "per_transaction": round(b, 1)},
              "one_load_ratio": one_load}
    found = verdicts(result)
    print_verdicts("statesync_shards", found)
    path = write_results("statesync_shards", {"env": env_info(), **result}, found)
    print(f"\nwrote {path}")
    return 0 if all(v.met for v in found) else 1


if __name__ == "__main__":
    sys.exit(main())
