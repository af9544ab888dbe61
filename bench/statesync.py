"""statesync sidecar: write throughput and replication lag, each beside raw etcd.

Run: ``.venv/bin/python bench/statesync.py [--quick] [--profile]``

1. Write throughput at equal concurrency (64 writers, ~1 KiB JSON values, each writer
   overwriting its own keys/sessions, fixed duration and a cap on the count): (a) raw
   aetcd puts straight to etcd, 64 writers; (b) through one sidecar over HTTP/TCP with
   its default batching (``--batch-max-ops`` default, one transaction in flight, group
   commit, a full batch leaving at once), 64 writers; (c) a second sidecar with ``--batch-max-ops 1
   --max-inflight 64`` (batching off, the same concurrency as the raw puts); (d) the
   sidecar of (b) over its Unix socket (``--listen unix:PATH``), 64 writers; (e) bulk
   saves of 16 sessions per request over that socket, 64 writers (the writers of the
   others, each request carrying 16 sessions: 1,024 sessions in flight); (f) the same
   from 4 writers (64 sessions in flight, as in the single-write modes), for
   reference; (g) the sidecar of (b) over TCP from a plain aiohttp client, for
   reference; writes/s counts sessions written.
   The load generator is the application: one process per mode (this script with
   ``--serve``), started once, connected and warmed up, then told over a control
   socket to run each round, so it shares no event loop or GIL with the sidecar; it
   does share the machine's cores with etcd and the sidecar (no pinning). It writes
   through ``meshxl.client.AsyncClient`` (what an application uses to reach its
   sidecar) and straight to etcd through aetcd (the reference), on the event loop the
   sidecar runs on (``meshxl.loops``: uvloop). CPU seconds of client, sidecar and etcd
   are reported so the split is visible. The modes run in rotating order, many short
   rounds (16 of 1.5 s), each run from a compacted etcd. A mode's ratio to raw is the
   median over its runs of the run's rate over raw's rate at that moment (interpolated
   between the raw runs just before and after it: :func:`paired_ratios`): this machine's
   speed moves by up to half from one second to the next, and a ratio of rates measured
   side by side carries less of that than a ratio of each mode's median rate (also
   reported).
2. Replication lag: sidecars A and B of one cluster on one etcd. Sequential writes on
   A; for each, the time from A's acknowledgement (HTTP 200/201 with ``ETag``) until
   B's cache has applied that revision, found by polling B's ``/v1/status`` (its
   ``revision``) in a tight bounded loop. A poll answers after B applied the revision,
   so each sample is an upper bound, at most one status round trip late (the round
   trip is reported). Interleaved with it, in the same rounds: a put with aetcd on a
   prefix watched by this process, from the put's acknowledgement to the watch event.
   As a cross-check without polling: B's own ``meshxl_statesync_replication_lag_seconds``
   histogram (from A's write timestamp, taken before A's etcd transaction, to B's
   apply) beside raw "put sent -> watch event".

Prints a table and writes ``bench/results/statesync.json``. Loopback only; every loop
is bounded in count and time; all processes are stopped in ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aetcd import rpc
from benchlib import (
    Verdict,
    env_info,
    print_verdicts,
    quick_requested,
    summary_ms,
    write_results,
)
from prometheus_client.parser import text_string_to_metric_families

from meshxl import etcd
from meshxl.client import AsyncClient, Upsert
from meshxl.local import commands
from meshxl.local.ports import free_ports
from meshxl.local.procs import Owner, Process
from meshxl.local.procs import run as run_command
from meshxl.local.servers import HOST, start_etcd
from meshxl.local.wait import wait_http, wait_until
from meshxl.loops import loop_factory
from meshxl.stats import cpu_seconds, quantile

SCRIPT = Path(__file__).resolve()
RESULTS = SCRIPT.parent / "results" / "statesync.json"
CONCURRENCY = 64
VALUE_BYTES = 1024
TARGET_UNBATCHED = 0.7
TARGET_BATCHED = 1.0
TARGET_UNIX = 1.0
TARGET_BULK = 2.0
BULK_SESSIONS = 16
TARGET_LAG_RATIO = 2.0
SETUP_TIMEOUT = 30.0
LAG_TIMEOUT = 2.0
CLIENT_GRACE = 30.0
ROUNDS, DURATION = 16, 1.5
"""Rounds of every mode and seconds per run (rounds are rotated: each mode runs first in
some)."""
ROUNDS_QUICK = 3
MODES = (("raw", "raw aetcd put -> etcd"),
         ("batched", "sidecar HTTP/TCP, default batching"),
         ("unbatched", "sidecar HTTP/TCP, batch 1, 64 in flight"),
         ("unix", "sidecar HTTP/Unix socket, default batching"),
         ("bulk16", f"bulk save x{BULK_SESSIONS}, Unix, 64 writers"),
         ("bulk16w4", f"bulk save x{BULK_SESSIONS}, Unix, 4 writers"),
         ("aiohttp", "sidecar HTTP/TCP, aiohttp client"))
SIDECAR_MODES = ("batched", "unbatched", "unix", "bulk16", "bulk16w4", "aiohttp")
BULK_WRITERS = {"bulk16": CONCURRENCY, "bulk16w4": CONCURRENCY // BULK_SESSIONS}
"""Writers of the bulk modes: 64 as the others (16 sessions a request), and 4 (as many
sessions in flight as the others)."""
TARGETS = {"batched": (TARGET_BATCHED, "batched (group commit), TCP"),
           "unbatched": (TARGET_UNBATCHED, "batch 1, 64 in flight, TCP"),
           "unix": (TARGET_UNIX, "batched, Unix socket"),
           "bulk16": (TARGET_BULK, f"bulk saves of {BULK_SESSIONS} sessions, Unix socket, "
                                   f"{CONCURRENCY} writers")}


# -- helpers ---------------------------------------------------------------------------


def _value(tag: str) -> bytes:
    """A ~1 KiB JSON document (a shopping-cart-like session)."""
    doc: dict[str, Any] = {"tag": tag, "user": "u-0001", "cart": [], "pad": ""}
    base = len(json.dumps(doc).encode())
    doc["pad"] = "x" * (VALUE_BYTES - base)
    return json.dumps(doc).encode()


def _ms(samples: list[float]) -> dict[str, float]:
    """The summary of samples in seconds, in milliseconds."""
    return summary_ms([x * 1000 for x in samples], 3)


def _histograms(text: str, name: str) -> dict[str, dict[str, Any]]:
    """Histogram ``name`` from Prometheus text, by its label values (joined)."""
    out: dict[str, dict[str, Any]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k != "le"}
            key = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
            h = out.setdefault(key, {"buckets": {}, "sum": 0.0, "count": 0.0})
            if sample.name.endswith("_bucket"):
                h["buckets"][float(sample.labels["le"])] = sample.value
            elif sample.name.endswith("_sum"):
                h["sum"] = sample.value
            elif sample.name.endswith("_count"):
                h["count"] = sample.value
    return out


def _hist_delta(after: dict[str, Any] | None, before: dict[str, Any] | None) -> dict[str, Any]:
    after = after or {"buckets": {}, "sum": 0.0, "count": 0.0}
    before = before or {"buckets": {}, "sum": 0.0, "count": 0.0}
    return {"buckets": {le: v - before["buckets"].get(le, 0.0)
                        for le, v in after["buckets"].items()},
            "sum": after["sum"] - before["sum"], "count": after["count"] - before["count"]}


def _hist_quantile(h: dict[str, Any], q: float) -> float | None:
    """Prometheus' histogram_quantile: linear within the bucket."""
    if not h["count"]:
        return None
    rank = q * h["count"]
    lower, below = 0.0, 0.0
    for le, cum in sorted(h["buckets"].items()):
        if cum >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * ((rank - below) / max(cum - below, 1e-12))
        lower, below = le, cum
    return lower


async def _metrics(http: aiohttp.ClientSession, base: str) -> str:
    async with http.get(f"{base}/metrics") as resp:
        return await resp.text()


# -- the load generator (a separate process) --------------------------------------------


class _Load:
    """One mode's writers (``cfg``): connected once, then run for as many rounds as
    asked. ``concurrency`` tasks each overwrite their own key (or bulk-save their own
    sessions) until the round's duration or write count is reached."""

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg
        self.conc = int(cfg["concurrency"])
        self.base = str(cfg["target"])
        self.pids = [int(p) for p in cfg.get("pids", [])]
        self.per_write = max(1, int(cfg.get("bulk", 0)))
        """Sessions one write carries."""
        self._closers: list[Callable[[], Awaitable[object]]] = []
        self._metrics: aiohttp.ClientSession | None = None
        self.write: Callable[[int], Awaitable[None]] | None = None

    async def open(self) -> None:
        cfg, conc = self.cfg, self.conc
        prefix = str(cfg["prefix"])
        value = _value(prefix)
        if cfg["mode"] == "raw":
            client = etcd.client(self.base)
            await client.connect()
            self._closers.append(client.close)

            async def write(task: int) -> None:
                await client.put(f"{prefix}{task:04d}".encode(), value)
        elif cfg["mode"] == "aiohttp":  # a plain aiohttp client, for reference
            http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc + 4),
                                         timeout=aiohttp.ClientTimeout(total=10.0))
            self._closers.append(http.close)
            headers = {"Content-Type": "application/json"}
            base = self.base

            async def write(task: int) -> None:
                async with http.put(f"{base}/v1/sessions/{prefix}{task:04d}", data=value,
                                    headers=headers) as resp:
                    await resp.read()
                    if resp.status not in (200, 201) or "ETag" not in resp.headers:
                        raise RuntimeError(f"PUT answered {resp.status}")
        else:
            socket_path = cfg.get("unix")
            sidecar = AsyncClient(f"unix:{socket_path}" if socket_path else self.base)
            self._closers.append(sidecar.close)
            per_request = int(cfg.get("bulk", 0))
            if per_request:
                document = json.loads(value)
                batches = [[Upsert(session=f"{prefix}{task:04d}-{i:02d}", state=document)
                            for i in range(per_request)] for task in range(conc)]

                async def write(task: int) -> None:
                    for answer in await sidecar.bulk_save(batches[task]):
                        if isinstance(answer, Exception):
                            raise answer
            else:
                async def write(task: int) -> None:
                    await sidecar.put(f"{prefix}{task:04d}", value,
                                      content_type="application/json")
        self.write = write
        if cfg["mode"] != "raw":
            self._metrics = aiohttp.ClientSession()
            self._closers.append(self._metrics.close)

    async def warm(self) -> None:
        """Each task writes ``warmup`` times (sessions created, connections open)."""
        assert self.write is not None
        write = self.write

        async def warm(task: int) -> None:
            for _ in range(int(self.cfg["warmup"])):
                await write(task)
        async with asyncio.timeout(15.0):
            await asyncio.gather(*(warm(t) for t in range(self.conc)))

    async def round(self, duration: float, max_writes: int) -> dict[str, Any]:
        """One measured window: writes, latency, CPU of the processes named, batches."""
        assert self.write is not None
        write = self.write
        latencies: list[float] = []
        errors: list[str] = []
        done = 0
        per_write = self.per_write

        async def worker(task: int, end: float) -> None:
            nonlocal done
            while done < max_writes and time.perf_counter() < end and len(errors) < 100:
                t = time.perf_counter()
                try:
                    await write(task)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                latencies.append(time.perf_counter() - t)
                done += per_write

        metrics_before = await self._scrape()
        cpu_before = [cpu_seconds(p) for p in self.pids]
        own_before = time.process_time()
        start = time.perf_counter()
        end = start + duration
        async with asyncio.timeout(duration + 15.0):
            await asyncio.gather(*(worker(t, end) for t in range(self.conc)))
        elapsed = time.perf_counter() - start
        own = time.process_time() - own_before
        cpu_after = [cpu_seconds(p) for p in self.pids]
        metrics_after = await self._scrape()
        out: dict[str, Any] = {
            "writes": done, "requests": len(latencies), "seconds": round(elapsed, 4),
            "writes_per_s": round(done / elapsed, 1),
            "errors": len(errors), "first_errors": errors[:3], "latency_ms": _ms(latencies),
            "cpu_s": {"client": round(own, 3)},
        }
        for pid, b, a in zip(self.pids, cpu_before, cpu_after, strict=True):
            if a is not None and b is not None:
                out["cpu_s"][str(pid)] = round(a - b, 3)
        if self._metrics is not None:
            out["batches"] = _batches(metrics_before, metrics_after)
        return out

    async def _scrape(self) -> str:
        return await _metrics(self._metrics, self.base) if self._metrics is not None else ""

    async def close(self) -> None:
        for close in reversed(self._closers):
            await close()


def _batches(before: str, after: str) -> dict[str, Any]:
    """The sidecar's transactions between two scrapes: count, ops, mean size and time."""
    name = "meshxl_statesync_batch_size"
    hb, ha = _histograms(before, name), _histograms(after, name)
    name = "meshxl_statesync_batch_duration_seconds"
    db, da = _histograms(before, name), _histograms(after, name)
    out: dict[str, Any] = {}
    for kind in ha:
        d = _hist_delta(ha.get(kind), hb.get(kind))
        t = _hist_delta(da.get(kind), db.get(kind))
        if d["count"]:
            out[kind] = {"transactions": int(d["count"]), "ops": int(d["sum"]),
                         "mean_size": round(d["sum"] / d["count"], 2),
                         "mean_txn_ms": round(t["sum"] / t["count"] * 1000, 2)
                         if t["count"] else None}
    return out


async def _load(cfg: dict[str, Any]) -> dict[str, Any]:
    """One run of a load (``--client``, what ``bench/statesync_gc.py`` uses): connect,
    warm up (not counted), one window of ``duration`` seconds."""
    load = _Load(cfg)
    try:
        await load.open()
        await load.warm()
        out = await load.round(float(cfg["duration"]), int(cfg["max_writes"]))
    finally:
        await load.close()
    out["value_bytes"] = VALUE_BYTES
    return out


async def _serve(cfg: dict[str, Any]) -> None:
    """A load kept for the whole benchmark (``--serve``): connect and warm up once, then
    answer each line ``DURATION MAX_WRITES`` on the control socket ``cfg["control"]``
    with one round's results (a JSON line)."""
    load = _Load(cfg)
    try:
        await load.open()
        await load.warm()
        finished = asyncio.get_running_loop().create_future()

        async def control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while line := await reader.readline():
                    duration, max_writes = line.split()
                    result = await load.round(float(duration), int(max_writes))
                    writer.write(json.dumps(result).encode() + b"\n")
                    await writer.drain()
            finally:
                writer.close()
                if not finished.done():
                    finished.set_result(None)

        server = await asyncio.start_unix_server(control, path=str(cfg["control"]))
        async with server:
            await finished
    finally:
        await load.close()


def client_main(raw: str, serve: bool = False) -> int:
    cfg = json.loads(raw)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        if serve:
            runner.run(_serve(cfg))
        else:
            print(json.dumps(runner.run(_load(cfg))))
    return 0


# -- 1. throughput ---------------------------------------------------------------------


async def _run_client(cfg: dict[str, Any]) -> Any:
    """One load client process for one run (killed on timeout or cancellation)."""
    code, out, err = await run_command(
        [sys.executable, str(SCRIPT), "--client", json.dumps(cfg)],
        timeout=float(cfg["duration"]) + CLIENT_GRACE)
    if code != 0:
        raise RuntimeError(f"load client ({cfg['mode']}) failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


class LoadProcess:
    """A mode's load generator, one process for the whole benchmark: each round is a
    line on its control socket, so rounds can be short and many."""

    def __init__(self, stack: Owner, mode: str, cfg: dict[str, Any]):
        self.mode = mode
        self.control = stack.root / f"load-{mode}.ctl"
        cfg = {**cfg, "control": str(self.control)}
        self.process = stack.spawn(f"load-{mode}", [sys.executable, str(SCRIPT), "--serve",
                                                    json.dumps(cfg)])
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def ready(self) -> None:
        """Wait until it is connected and warmed up (its control socket answers)."""
        async def connected() -> bool:
            if not self.control.exists():
                return False
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(
                    str(self.control))
            except OSError:
                return False
            return True
        await wait_until(connected, timeout=SETUP_TIMEOUT, what=f"load {self.mode} ready",
                         process=self.process)

    async def round(self, duration: float, max_writes: int) -> dict[str, Any]:
        assert self._reader is not None and self._writer is not None
        self._writer.write(f"{duration} {max_writes}\n".encode())
        await self._writer.drain()
        try:
            async with asyncio.timeout(duration + CLIENT_GRACE):
                line = await self._reader.readline()
        except TimeoutError:
            raise RuntimeError(f"load {self.mode}: no answer within "
                               f"{duration + CLIENT_GRACE:g} s\n{self.process.tail()}") from None
        if not line:
            raise RuntimeError(f"load {self.mode} ended:\n{self.process.tail()}")
        result: dict[str, Any] = json.loads(line)
        return result

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await self._writer.wait_closed()
        with contextlib.suppress(Exception):
            await self.process.wait_exit(10.0)


SIDECAR_OF = {"unix": "batched", "bulk16": "batched", "bulk16w4": "batched",
              "aiohttp": "batched"}
"""Modes that use another mode's sidecar (over its Unix socket)."""


def paired_ratios(sequence: list[tuple[str, float]], reference: str = "raw"
                  ) -> dict[str, list[float]]:
    """Each run's rate over the reference's rate at the same moment: the rates of
    ``sequence`` (``(mode, rate)`` in the order they ran), each divided by the reference
    rate interpolated between the reference's runs just before and just after it (the
    one on either side at the ends). The machine's speed drifts between runs; a ratio to
    the reference measured beside a run carries less of that drift than one to a
    reference measured minutes away. Pure; ``tests/unit/test_bench.py``."""
    marks = [(i, rate) for i, (mode, rate) in enumerate(sequence) if mode == reference]
    out: dict[str, list[float]] = {}
    if not marks:
        return out
    for i, (mode, rate) in enumerate(sequence):
        if mode == reference:
            continue
        before = [m for m in marks if m[0] < i]
        after = [m for m in marks if m[0] > i]
        if before and after:
            (i0, r0), (i1, r1) = before[-1], after[0]
            ref = r0 + (r1 - r0) * (i - i0) / (i1 - i0)
        else:
            ref = (before[-1] if before else after[0])[1]
        if ref > 0:
            out.setdefault(mode, []).append(rate / ref)
    return out


async def bench_throughput(url: str, sidecars: dict[str, Sidecar], etcd_pid: int,
                           stack: Owner, rounds: int, duration: float, max_writes: int,
                           profiles: dict[str, list[Path]]) -> dict[str, Any]:
    by_mode: dict[str, list[dict[str, Any]]] = {m: [] for m, _ in MODES}
    loads: dict[str, LoadProcess] = {}
    for mode, _ in MODES:
        sidecar = sidecars.get(SIDECAR_OF.get(mode, mode))
        loads[mode] = LoadProcess(stack, mode, {
            "mode": mode if mode in ("raw", "aiohttp") else "http",
            "concurrency": BULK_WRITERS.get(mode, CONCURRENCY),
            "bulk": BULK_SESSIONS if mode in BULK_WRITERS else 0,
            "unix": sidecar.unix if sidecar and mode in ("unix", *BULK_WRITERS) else None,
            "warmup": 2,
            "prefix": "/bench-raw/" if mode == "raw" else f"s-{mode}-",
            "target": url if sidecar is None else sidecar.url,
            "pids": [etcd_pid] + ([] if sidecar is None else [sidecar.process.pid]),
        })
    await asyncio.gather(*(load.ready() for load in loads.values()))
    client = etcd.client(url)
    await client.connect()
    sequence: list[tuple[str, float]] = []
    try:
        for r in range(rounds):
            order = [MODES[(i + r) % len(MODES)][0] for i in range(len(MODES))]
            for mode in order:
                sidecar = sidecars.get(SIDECAR_OF.get(mode, mode))
                if sidecar is not None:
                    sidecar.profiled(mode, profiles)
                try:
                    res = await loads[mode].round(duration, max_writes)
                finally:
                    if sidecar is not None:
                        await sidecar.stop()
                # Every run starts from a compacted etcd: the history a run leaves (every
                # overwrite is a revision kept) would otherwise slow the runs after it.
                head = await client.kvstub.Range(rpc.RangeRequest(key=b"\0", limit=1))
                await client.compact(head.header.revision, physical=True)
                cpu = res.pop("cpu_s")
                res["cpu_s"] = {"client": cpu["client"], "etcd": cpu.get(str(etcd_pid))}
                if sidecar is not None:
                    res["cpu_s"]["sidecar"] = cpu.get(str(sidecar.process.pid))
                res["round"] = r
                by_mode[mode].append(res)
                sequence.append((mode, res["writes_per_s"]))
    finally:
        await client.close()
        await asyncio.gather(*(load.close() for load in loads.values()))

    out: dict[str, Any] = {"concurrency": CONCURRENCY, "value_bytes": VALUE_BYTES,
                           "rounds": rounds, "duration_s": duration,
                           "max_writes": max_writes, "modes": {},
                           "order": [mode for mode, _ in sequence]}
    for mode, label in MODES:
        runs = by_mode[mode]
        ranked = sorted(runs, key=lambda x: x["writes_per_s"])
        writes = sum(x["writes"] for x in runs)
        cpu = {who: sum(x["cpu_s"].get(who) or 0.0 for x in runs)
               for who in runs[0]["cpu_s"]}
        out["modes"][mode] = {
            "label": label, "median_run": ranked[len(ranked) // 2],
            "writes_per_s": [x["writes_per_s"] for x in runs],
            "errors": sum(x["errors"] for x in runs),
            "first_errors": next((x["first_errors"] for x in runs if x["errors"]), []),
            "seconds": round(sum(x["seconds"] for x in runs), 3),
            "cpu_us_per_write": {who: round(sec / writes * 1e6, 1) if writes else None
                                 for who, sec in cpu.items()},
            "cpu_cores": {who: round(sec / sum(x["seconds"] for x in runs), 2)
                          for who, sec in cpu.items()}}
    raw = out["modes"]["raw"]["median_run"]["writes_per_s"]
    ratios = paired_ratios(sequence)
    for mode in SIDECAR_MODES:
        paired = sorted(ratios.get(mode, []))
        wps = out["modes"][mode]["median_run"]["writes_per_s"]
        out["modes"][mode]["paired_ratios"] = [round(x, 3) for x in ratios.get(mode, [])]
        out[f"ratio_{mode}_vs_raw"] = round(quantile(paired, 0.5) or 0.0, 3) if paired else None
        out[f"ratio_{mode}_vs_raw_quartiles"] = [
            round(quantile(paired, q) or 0.0, 3) for q in (0.25, 0.75)] if paired else None
        out[f"ratio_{mode}_of_medians"] = round(wps / raw, 3) if raw else None
    return out


# -- 2. replication lag ----------------------------------------------------------------


async def bench_lag(url: str, a: str, b: str, rounds: int) -> dict[str, Any]:
    value = _value("lag")
    client = etcd.client(url)
    await client.connect()
    watch = await client.watch_prefix(b"/bench-watch/")
    pending: dict[bytes, asyncio.Future[float]] = {}

    async def follow() -> None:
        async for event in watch:
            t = time.perf_counter()
            fut = pending.pop(event.kv.key, None)
            if fut is not None and not fut.done():
                fut.set_result(t)

    follower = asyncio.create_task(follow())
    side_ack: list[float] = []
    side_first_poll: int = 0
    polls: list[int] = []
    status_rtt: list[float] = []
    raw_ack: list[float] = []
    raw_sent: list[float] = []
    raw_event_before_ack = 0
    timeouts = {"sidecar": 0, "raw": 0}
    headers = {"Content-Type": "application/json"}
    try:
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=LAG_TIMEOUT)) as http:
            # Quiet status round trips: the polling resolution.
            for _ in range(min(rounds, 100)):
                t = time.perf_counter()
                async with http.get(f"{b}/v1/status") as resp:
                    await resp.read()
                status_rtt.append(time.perf_counter() - t)
            lag_before = _histograms(await _metrics(http, b),
                                     "meshxl_statesync_replication_lag_seconds").get("")

            async def sidecar_round(i: int) -> None:
                nonlocal side_first_poll
                async with http.put(f"{a}/v1/sessions/lag-{i:05d}", data=value,
                                    headers=headers) as resp:
                    await resp.read()
                    if resp.status not in (200, 201):
                        raise RuntimeError(f"PUT on A answered {resp.status}")
                    revision = int(resp.headers["ETag"].strip('"'))
                t_ack = time.perf_counter()
                deadline = t_ack + LAG_TIMEOUT
                n = 0
                while time.perf_counter() < deadline:
                    n += 1
                    async with http.get(f"{b}/v1/status") as resp:
                        applied = (await resp.json())["revision"]
                    if applied >= revision:
                        side_ack.append(time.perf_counter() - t_ack)
                        polls.append(n)
                        side_first_poll += n == 1
                        return
                timeouts["sidecar"] += 1

            async def raw_round(i: int) -> None:
                nonlocal raw_event_before_ack
                key = f"/bench-watch/k{i:05d}".encode()
                fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
                pending[key] = fut
                t_sent = time.perf_counter()
                await client.put(key, value)
                t_ack = time.perf_counter()
                try:
                    async with asyncio.timeout(LAG_TIMEOUT):
                        t_event = await fut
                except TimeoutError:
                    timeouts["raw"] += 1
                    pending.pop(key, None)
                    return
                raw_event_before_ack += t_event < t_ack
                raw_ack.append(max(0.0, t_event - t_ack))
                raw_sent.append(t_event - t_sent)

            for i in range(rounds):
                if i % 2 == 0:
                    await sidecar_round(i)
                    await raw_round(i)
                else:
                    await raw_round(i)
                    await sidecar_round(i)
            lag_after = _histograms(await _metrics(http, b),
                                    "meshxl_statesync_replication_lag_seconds").get("")
    finally:
        follower.cancel()
        with contextlib.suppress(Exception):
            await watch.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await follower
        await client.close()

    hist = _hist_delta(lag_after, lag_before)
    hist_q = {f"p{int(q * 100)}": (round(v * 1000, 3) if v is not None else None)
              for q in (0.5, 0.99) for v in [_hist_quantile(hist, q)]}
    # The raw samples put into the same buckets and read the same way, so the two
    # quantiles carry the same interpolation error.
    raw_hist = {"buckets": {le: float(sum(x <= le for x in raw_sent))
                            for le in hist["buckets"]},
                "sum": sum(raw_sent), "count": float(len(raw_sent))}
    raw_q = {f"p{int(q * 100)}": (round(v * 1000, 3) if v is not None else None)
             for q in (0.5, 0.99) for v in [_hist_quantile(raw_hist, q)]}
    out: dict[str, Any] = {
        "rounds": rounds,
        "sidecar_ack_to_b_ms": _ms(side_ack),
        "sidecar_b_seen_on_first_poll": side_first_poll,
        "sidecar_polls_median": quantile(polls, 0.5),
        "status_round_trip_ms": _ms(status_rtt),
        "raw_ack_to_watch_event_ms": _ms(raw_ack),
        "raw_watch_event_before_put_ack": raw_event_before_ack,
        "raw_put_sent_to_watch_event_ms": _ms(raw_sent),
        "raw_put_sent_to_watch_event_bucketed_ms": raw_q,
        "b_lag_histogram_ms": {"count": int(hist["count"]),
                               "mean": round(hist["sum"] / hist["count"] * 1000, 3)
                               if hist["count"] else None, **hist_q},
        "timeouts": timeouts,
    }
    # The target ratio: write sent to etcd -> applied by the follower, both sides
    # bucketed alike. (Ack-based times are no basis for a ratio: etcd's watch event
    # usually reaches the client before the put's own answer, so raw ack -> event is ~0.)
    for q in ("p50", "p99"):
        hv, rv = hist_q[q], raw_q[q]
        if hv is not None and rv is not None:
            out[f"ratio_{q}"] = round(hv / max(rv, 1e-3), 2)
    return out


# -- setup, profile, report ------------------------------------------------------------


@dataclass
class Sidecar:
    url: str
    process: Process
    unix: str
    """Its API's Unix socket."""
    profile: Path | None = None
    """Where it writes its profiles (``--profile``: bench/profiled.py)."""
    windows: int = 0

    def profiled(self, mode: str, profiles: dict[str, list[Path]]) -> None:
        """Start a profile window (None: not profiling); :meth:`stop` ends it."""
        if self.profile is not None and self.process.pid is not None:
            os.kill(self.process.pid, signal.SIGUSR1)
            profiles.setdefault(mode, []).append(Path(f"{self.profile}.{self.windows}"))
            self.windows += 1

    async def stop(self) -> None:
        """End the window and wait for its profile (signals pending together are
        handled in number order: a start right after a stop would come first)."""
        if self.profile is not None and self.process.pid is not None:
            os.kill(self.process.pid, signal.SIGUSR2)
            written = Path(f"{self.profile}.{self.windows - 1}")
            await wait_until(written.exists, timeout=10.0, what=f"profile {written}",
                             process=self.process)
            await asyncio.sleep(0.2)  # written in full


async def _sidecar(stack: Owner, name: str, cluster: str, url: str, batch: int | None,
                   profile_dir: Path | None = None,
                   inflight: int | None = None) -> Sidecar:
    app_port, port = free_ports(2)
    python = [sys.executable]
    profile = None
    if profile_dir is not None:
        profile = profile_dir / f"{name}.prof"
        python += [str(SCRIPT.parent / "profiled.py"), str(profile)]
    unix = str(stack.root / f"{name}.sock")
    proc = stack.spawn(name, commands.statesync(
        cluster=cluster, member=name, app=f"{HOST}:{app_port}",
        listen=[f"{HOST}:{port}", f"unix:{unix}"], etcd=url, batch_max_ops=batch,
        log_level="warning", max_inflight=inflight, python=python))
    base = f"http://{HOST}:{port}"
    await wait_http(f"{base}/readyz", process=proc, timeout=SETUP_TIMEOUT)
    return Sidecar(base, proc, unix, profile)


def _profile_top(paths: list[Path], lines: int = 30) -> str:
    """The sidecar's profile of one mode's measured windows (every round), by tottime."""
    import io
    import pstats

    out = io.StringIO()
    try:
        stats = pstats.Stats(*(str(p) for p in paths), stream=out)
        stats.sort_stats("tottime").print_stats(lines)
    except (OSError, TypeError, EOFError) as exc:
        return f"(no profile: {exc})"
    text = out.getvalue()
    start = text.find("   ncalls")
    return text[start:] if start >= 0 else text


async def run(quick: bool, profile: bool, work: Path) -> dict[str, Any]:
    # Many short rounds, each mode's rate over raw's beside it: this machine's speed moves
    # by up to half from one second to the next (docs/performance.md, "The machine").
    rounds, duration, max_writes, lag_rounds = (ROUNDS_QUICK, 1.0, 40_000, 100) if quick \
        else (ROUNDS, DURATION, 100_000, 300)
    stack = Owner(work, grace=3.0)
    step = "starting etcd"
    res: dict[str, Any] = {}
    prof_dir = work if profile else None
    try:
        async with asyncio.timeout(SETUP_TIMEOUT):
            url, etcd_proc = await start_etcd(stack)
            assert etcd_proc.pid is not None
            etcd_pid = etcd_proc.pid
            step = "starting sidecars"
            sidecars = {
                "batched": await _sidecar(stack, "tput-batched", "tput-batched", url, None,
                                          prof_dir),
                "unbatched": await _sidecar(stack, "tput-b1", "tput-b1", url, 1, prof_dir,
                                            inflight=CONCURRENCY),
            }
            lag_a = (await _sidecar(stack, "lag-a", "lag", url, None)).url
            lag_b = (await _sidecar(stack, "lag-b", "lag", url, None)).url
        step = "measuring throughput"
        profiles: dict[str, list[Path]] = {}
        res["throughput"] = await bench_throughput(url, sidecars, etcd_pid, stack, rounds,
                                                   duration, max_writes, profiles)
        step = "measuring replication lag"
        res["lag"] = await bench_lag(url, lag_a, lag_b, lag_rounds)
        if profile:
            step = "collecting profiles"
            res["profile_top_tottime"] = {mode: _profile_top(paths)
                                          for mode, paths in profiles.items()}
    except (TimeoutError, RuntimeError, OSError) as exc:
        traceback.print_exc()
        logs = stack.report()
        raise SystemExit(f"failed {step}: {exc!r}\n{logs}") from None
    finally:
        await stack.aclose()
    return res


def print_report(res: dict[str, Any]) -> None:
    t = res["throughput"]
    print(f"\n== write throughput: {t['concurrency']} writers, ~{t['value_bytes']} B JSON "
          f"values, {t['rounds']} rounds of {t['duration_s']:g} s per mode, in rotating order")
    print("   load generators: one process per mode, kept for the run; client, sidecar and "
          f"etcd share {res['env']['cpus']} cores (no pinning); load average at start "
          f"{res['env']['loadavg_at_start']}")
    print("   vs raw: the median of each run's rate over raw's interpolated beside it "
          "[quartiles]; runs: the median run's rate, latency and batches; CPU: cores used "
          "over all runs")
    print(f"  {'mode':<40} {'writes/s':>9} {'vs raw':>7} {'quartiles':>11} {'p50 ms':>7} "
          f"{'p99 ms':>7} {'batch':>6} {'CPU cli':>7} {'side':>5} {'etcd':>5}")
    for mode, _ in MODES:
        m = t["modes"][mode]
        run = m["median_run"]
        cores = m["cpu_cores"]

        def share(who: str, cores: dict[str, float] = cores) -> str:
            return f"{cores[who]:5.2f}" if cores.get(who) is not None else "    -"
        batch = "-"
        if run.get("batches"):
            put = run["batches"].get("kind=write") or next(iter(run["batches"].values()))
            batch = f"{put['mean_size']:.1f}"
        ratio = t.get(f"ratio_{mode}_vs_raw")
        quartiles = t.get(f"ratio_{mode}_vs_raw_quartiles")
        vs = f"{ratio:6.2f}x" if ratio is not None else "  1.00x"
        q = f"[{quartiles[0]:.2f}-{quartiles[1]:.2f}]" if quartiles else ""
        errs = f"  ERRORS {m['errors']}: {m['first_errors']}" if m["errors"] else ""
        print(f"  {m['label']:<40} {run['writes_per_s']:>9.0f} {vs:>7} {q:>11} "
              f"{run['latency_ms']['p50']:>7.2f} {run['latency_ms']['p99']:>7.2f} {batch:>6} "
              f"{share('client'):>7} {share('sidecar'):>5} {share('etcd'):>5}{errs}")
    for mode in SIDECAR_MODES:
        run = t["modes"][mode]["median_run"]
        if run.get("batches"):
            print(f"   {mode} batches (median run): {run['batches']}")
    print("   CPU microseconds per session written (all runs): " + "; ".join(
        f"{mode} " + ", ".join(f"{who} {us}" for who, us in
                               t["modes"][mode]["cpu_us_per_write"].items())
        for mode, _ in MODES))
    print("   ratio of the modes' median rates (the statistic before paired runs): " + ", ".join(
        f"{mode} {t[f'ratio_{mode}_of_medians']:.2f}x" for mode in SIDECAR_MODES))

    lag = res["lag"]
    print(f"\n== replication lag: {lag['rounds']} sequential writes, interleaved "
          "sidecar A->B and raw put->watch")
    print(f"  {'path':<52} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    h, rb = lag["b_lag_histogram_ms"], lag["raw_put_sent_to_watch_event_bucketed_ms"]
    if h.get("p50") is not None and rb.get("p50") is not None:
        print(f"  {'sidecar: A write stamp -> B apply (B histogram)':<52} {h['p50']:>8.2f} "
              f"{h['p99']:>8.2f} {'':>8}  bucketed, n={h['count']}, mean {h['mean']:.2f}")
        print(f"  {'etcd: put sent -> aetcd watch event (same buckets)':<52} "
              f"{rb['p50']:>8.2f} {rb['p99']:>8.2f}")
    rows = (("etcd: put sent -> watch event (exact)", "raw_put_sent_to_watch_event_ms"),
            ("sidecar: A ack -> B /v1/status shows it (polled)", "sidecar_ack_to_b_ms"),
            ("  poll resolution: B /v1/status round trip", "status_round_trip_ms"),
            ("etcd: put ack -> watch event", "raw_ack_to_watch_event_ms"))
    for label, key in rows:
        s = lag[key]
        if s.get("n"):
            print(f"  {label:<52} {s['p50']:>8.2f} {s['p99']:>8.2f} {s['max']:>8.2f}")
    print(f"   B had the write at the first poll in {lag['sidecar_b_seen_on_first_poll']}/"
          f"{lag['sidecar_ack_to_b_ms'].get('n', 0)} rounds; raw watch event came before the "
          f"put ack in {lag['raw_watch_event_before_put_ack']} rounds (counted as 0); "
          f"timeouts {lag['timeouts']}")

    print("\n== summary (targets: unbatched >= 0.7x raw, batched >= 1.0x raw over TCP and "
          f"over the Unix socket, bulk x{BULK_SESSIONS} >= 2x raw, lag <= 2x)")
    for mode, (target, label) in TARGETS.items():
        ratio = t[f"ratio_{mode}_vs_raw"]
        print(f"  sidecar {label:<44} / raw etcd writes/s: {ratio:.2f}x "
              f"({'MET' if ratio is not None and ratio >= target else 'MISSED'}, "
              f"target >= {target})")
    if "ratio_p50" in lag:
        ok = lag["ratio_p50"] <= TARGET_LAG_RATIO and lag["ratio_p99"] <= TARGET_LAG_RATIO
        print(f"  replication lag / etcd watch latency (write sent -> follower has it, "
              f"bucketed alike): p50 {lag['ratio_p50']:.2f}x, p99 {lag['ratio_p99']:.2f}x "
              f"({'MET' if ok else 'MISSED'}, target <= {TARGET_LAG_RATIO:g}x)")
    for mode, text in res.get("profile_top_tottime", {}).items():
        print(f"\n== cProfile of the sidecar in mode {mode} (measured windows, by tottime)"
              f"\n{text}")
    print(f"  results: {RESULTS}")


def verdicts(res: dict[str, Any]) -> list[Verdict]:
    t, lag = res["throughput"], res["lag"]
    raw = t["modes"]["raw"]["median_run"]["writes_per_s"]
    out = []
    for mode, (target, label) in TARGETS.items():
        wps = t["modes"][mode]["median_run"]["writes_per_s"]
        low, high = t[f"ratio_{mode}_vs_raw_quartiles"] or (None, None)
        out.append(Verdict(f"statesync: sidecar writes/s / raw aetcd puts, {label}",
                           t[f"ratio_{mode}_vs_raw"], target, "x", at_most=False,
                           reference=f"median of {t['rounds']} paired runs, quartiles "
                           f"{low}-{high}; median runs {wps:,.0f} vs raw {raw:,.0f} "
                           f"writes/s, {t['concurrency']} writers"))
    h, rb = lag["b_lag_histogram_ms"], lag["raw_put_sent_to_watch_event_bucketed_ms"]
    for q in ("p50", "p99"):
        out.append(Verdict(f"statesync: replication lag / etcd watch latency, {q}",
                           lag.get(f"ratio_{q}"), TARGET_LAG_RATIO, "x",
                           reference=f"sidecar {h.get(q)} ms vs etcd watch {rb.get(q)} ms"))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (about a minute)")
    parser.add_argument("--profile", action="store_true",
                        help="run the throughput sidecars under cProfile and print the top")
    parser.add_argument("--client", metavar="JSON", help=argparse.SUPPRESS)
    parser.add_argument("--serve", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client or args.serve:
        return client_main(args.client or args.serve, serve=bool(args.serve))
    args.quick = quick_requested(args.quick)

    started = time.perf_counter()
    res: dict[str, Any] = {
        "benchmark": "statesync", "quick": args.quick, "profile": args.profile,
        "env": env_info(),
    }
    with tempfile.TemporaryDirectory(prefix="meshxl-bench-") as work:
        res.update(asyncio.run(run(args.quick, args.profile, Path(work))))
    res["seconds"] = round(time.perf_counter() - started, 1)
    verdict_list = verdicts(res)
    write_results("statesync", res, verdict_list)
    print_report(res)
    print_verdicts("statesync", verdict_list)
    print(f"  ran in {res['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
