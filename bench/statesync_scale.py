"""statesync at scale: what each replication mode costs with many members and sessions.

Run: ``.venv/bin/python bench/statesync_scale.py [--quick] [--members N] [--sessions S]``

For each ``sessions.replication`` mode (``all``, then ``narrow``), one run with the same
shape: a single-member etcd, a load-sharing cluster with registered membership and N
statesync sidecars (default 10), S sessions (default 200,000, ~200 B of JSON each)
written through the sidecars, session i through member i mod N (its owner), 64 writes
in flight. Measured per mode:

* **RSS per member** (``VmRSS``) once every member has caught up (``all``: each holds
  S sessions; ``narrow``: each holds its own), beside the RSS of the same sidecars
  idle before the first write (the constant every member pays);
* **etcd watch events sent per write** (etcd's ``etcd_debugging_mvcc_events_total``
  over the write phase, divided by S) and **etcd CPU** over the write phase (per
  1,000 writes), with the sidecars' CPU beside it (the fan-out's other half);
* **takeover latency**: member 0's sidecar gets SIGKILL; for a sample of its sessions
  member 1 does what a member does when Envoy moves a session to it: read the session
  (``GET``), then write it with ``If-Match`` (a takeover: member 1 becomes the owner).
  p50/p99 of read+write per session, 8 in flight.

Targets: the narrow mode's takeover p99 at most 2x the full mode's; its RSS per member
at most 1/N of the full mode's plus the idle RSS measured in the same run.
Writes ``bench/results/statesync_scale.json``. Loopback only; every loop is bounded in
count and time; all processes are stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from benchlib import Verdict, print_verdicts, quick_requested, run_benchmark, summary_ms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshxl import etcd  # noqa: E402
from meshxl.etcd.keys import Keys  # noqa: E402
from meshxl.local import commands  # noqa: E402
from meshxl.local.ports import free_ports  # noqa: E402
from meshxl.local.procs import Owner, Process  # noqa: E402
from meshxl.local.servers import HOST, start_etcd  # noqa: E402
from meshxl.local.wait import wait_http, wait_until  # noqa: E402
from meshxl.operator.actions import apply_model  # noqa: E402
from meshxl.stats import cpu_seconds, rss_bytes  # noqa: E402

CLUSTER = "scale"
MODES = ("all", "narrow")
IN_FLIGHT = 64
TAKEOVER_IN_FLIGHT = 8
CATCH_UP_TIMEOUT = 600.0
WRITE_TIMEOUT = 1800.0
TARGET_TAKEOVER_P99_RATIO = 2.0


def model(replication: str) -> str:
    """Members register themselves (their sidecars): none is listed."""
    return f"""\
clusters:
- name: {CLUSTER}
  mode: load-sharing
  membership: registered
  sessions: {{replication: {replication}, ttl: 1h}}
"""


def state(i: int) -> bytes:
    body = {"user": f"user-{i:07d}", "cart": [f"sku-{i % 997:04d}", f"sku-{i % 101:04d}"],
            "step": i % 7, "pad": "x" * 96}
    return json.dumps(body).encode()


async def etcd_events(http: aiohttp.ClientSession, url: str) -> float:
    """etcd's count of watch events it sent (``etcd_debugging_mvcc_events_total``)."""
    async with http.get(f"{url}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith("etcd_debugging_mvcc_events_total"):
            return float(line.split()[-1])
    raise RuntimeError("etcd exports no etcd_debugging_mvcc_events_total")


async def statuses(http: aiohttp.ClientSession, bases: list[str]) -> list[dict[str, Any]]:
    async def one(base: str) -> dict[str, Any]:
        async with http.get(f"{base}/v1/status") as resp:
            data: dict[str, Any] = await resp.json()
            return data
    return list(await asyncio.gather(*(one(b) for b in bases)))


async def write_all(http: aiohttp.ClientSession, bases: list[str], sessions: int) -> float:
    """Every session once through its owner; returns the seconds it took."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(sessions):
        queue.put_nowait(i)
    failures: list[str] = []
    deadline = time.monotonic() + WRITE_TIMEOUT

    async def worker() -> None:
        while not queue.empty() and time.monotonic() < deadline and len(failures) < 20:
            i = queue.get_nowait()
            base = bases[i % len(bases)]
            async with http.put(f"{base}/v1/sessions/s{i}", data=state(i),
                                headers={"Content-Type": "application/json"}) as resp:
                await resp.read()
                if resp.status not in (200, 201):
                    failures.append(f"s{i}: HTTP {resp.status}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    if failures or not queue.empty():
        raise RuntimeError(f"writes failed or timed out: {failures[:5]}")
    return time.perf_counter() - started


async def takeovers(http: aiohttp.ClientSession, base: str, ids: list[str]) -> list[float]:
    """Read then write each session with If-Match on another member: ms per session."""
    gate = asyncio.Semaphore(TAKEOVER_IN_FLIGHT)
    took: list[float] = []

    async def one(session: str) -> None:
        async with gate:
            started = time.perf_counter()
            async with http.get(f"{base}/v1/sessions/{session}") as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"takeover read of {session}: HTTP {resp.status}")
                etag = resp.headers["ETag"]
            async with http.put(f"{base}/v1/sessions/{session}", data=body, headers={
                    "Content-Type": "application/json", "If-Match": etag}) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"takeover write of {session}: HTTP {resp.status}")
            took.append((time.perf_counter() - started) * 1000)

    await asyncio.gather(*(one(s) for s in ids))
    return took


async def run_mode(work: Path, replication: str, members: int, sessions: int,
                   sample: int) -> dict[str, Any]:
    stack = Owner(work / replication, grace=2.0)
    out: dict[str, Any] = {"replication": replication}
    try:
        url, etcd_proc = await start_etcd(stack, extra=["--quota-backend-bytes",
                                                        str(4 * 1024**3)])
        client = etcd.client(url)
        await client.connect()
        try:
            await apply_model(client, Keys(), model(replication), "bench")
        finally:
            await client.close()
        bases: list[str] = []
        procs: list[Process] = []
        for i in range(members):
            app_port, port = free_ports(2)
            procs.append(stack.spawn(f"m{i}", commands.statesync(
                cluster=CLUSTER, member=f"m{i}", app=f"{HOST}:{app_port}",
                listen=f"{HOST}:{port}", etcd=url, log_level="warning")))
            bases.append(f"http://{HOST}:{port}")
        for base, proc in zip(bases, procs, strict=True):
            await wait_http(f"{base}/readyz", process=proc, timeout=60)
        pids = [p.pid for p in procs]
        assert all(pid is not None for pid in pids) and etcd_proc.pid is not None
        await asyncio.sleep(1.0)
        idle = [rss_bytes(pid) or 0 for pid in pids if pid is not None]

        connector = aiohttp.TCPConnector(limit=IN_FLIGHT * 2)
        async with aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
            events0 = await etcd_events(http, url)
            cpu0 = cpu_seconds(etcd_proc.pid) or 0.0
            side0 = sum(cpu_seconds(pid) or 0.0 for pid in pids if pid is not None)
            seconds = await write_all(http, bases, sessions)
            own = sessions // members

            async def caught_up() -> bool:
                want = sessions if replication == "all" else own
                return all(s["cached_sessions"] >= want for s in await statuses(http, bases))

            await wait_until(caught_up, timeout=CATCH_UP_TIMEOUT, interval=0.5,
                             what="every member caught up")
            events = await etcd_events(http, url) - events0
            etcd_cpu = (cpu_seconds(etcd_proc.pid) or 0.0) - cpu0
            sidecar_cpu = sum(cpu_seconds(pid) or 0.0 for pid in pids if pid is not None) - side0
            await asyncio.sleep(1.0)
            rss = [rss_bytes(pid) or 0 for pid in pids if pid is not None]
            cached = [s["cached_sessions"] for s in await statuses(http, bases)]

            await procs[0].kill()
            victims = [f"s{i}" for i in range(0, sessions, members)][:sample]
            took = await takeovers(http, bases[1], victims)

        mib = 1024 * 1024
        out.update({
            "members": members, "sessions": sessions,
            "write_seconds": round(seconds, 1),
            "writes_per_s": round(sessions / seconds),
            "cached_sessions_per_member": {"min": min(cached), "max": max(cached)},
            "rss_idle_mib_mean": round(sum(idle) / len(idle) / mib, 1),
            "rss_mib_mean": round(sum(rss) / len(rss) / mib, 1),
            "rss_mib_max": round(max(rss) / mib, 1),
            "etcd_events_per_write": round(events / sessions, 3),
            "etcd_cpu_s_per_1k_writes": round(etcd_cpu / sessions * 1000, 3),
            "sidecars_cpu_s_per_1k_writes": round(sidecar_cpu / sessions * 1000, 3),
            "takeover_ms": summary_ms(took),
        })
    finally:
        await stack.aclose()
    return out


def verdicts(res: dict[str, Any]) -> list[Verdict]:
    modes = res.get("modes", {})
    full, narrow = modes.get("all"), modes.get("narrow")
    if not full or not narrow:
        return []
    n = full["members"]
    p99_full = full["takeover_ms"]["p99"]
    return [
        Verdict("narrow takeover p99 / full takeover p99",
                round(narrow["takeover_ms"]["p99"] / p99_full, 2) if p99_full else None,
                TARGET_TAKEOVER_P99_RATIO, "x",
                reference=f"full p99 {p99_full} ms, narrow {narrow['takeover_ms']['p99']} ms"),
        Verdict("narrow RSS per member", narrow["rss_mib_mean"],
                round(full["rss_mib_mean"] / n + narrow["rss_idle_mib_mean"], 1), "MiB",
                reference=f"full {full['rss_mib_mean']} MiB / {n} + idle "
                          f"{narrow['rss_idle_mib_mean']} MiB"),
        Verdict("narrow etcd watch events per write", narrow["etcd_events_per_write"],
                1.0, "events",
                reference=f"full {full['etcd_events_per_write']} with {n} members"),
    ]


def print_report(res: dict[str, Any], verdict_list: list[Verdict]) -> None:
    print(f"\n== statesync at scale ({res.get('members')} members, {res.get('sessions')} "
          "sessions)")
    print(f"  {'':28} {'all':>14} {'narrow':>14}")
    rows = [("writes/s", "writes_per_s"), ("RSS idle MiB (mean)", "rss_idle_mib_mean"),
            ("RSS MiB (mean)", "rss_mib_mean"), ("RSS MiB (max)", "rss_mib_max"),
            ("etcd events / write", "etcd_events_per_write"),
            ("etcd CPU s / 1k writes", "etcd_cpu_s_per_1k_writes"),
            ("sidecars CPU s / 1k writes", "sidecars_cpu_s_per_1k_writes")]
    modes = res.get("modes", {})
    for label, key in rows:
        print(f"  {label:28} " + " ".join(f"{modes.get(m, {}).get(key, '-'):>14}"
                                          for m in MODES))
    for q in ("p50", "p99"):
        print(f"  {'takeover ' + q + ' ms':28} " + " ".join(
            f"{modes.get(m, {}).get('takeover_ms', {}).get(q, '-'):>14}" for m in MODES))
    print_verdicts("statesync at scale", verdict_list)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 sessions, 5 members")
    parser.add_argument("--members", type=int, default=None)
    parser.add_argument("--sessions", type=int, default=None)
    args = parser.parse_args()
    quick = quick_requested(args.quick)
    members = args.members or (5 if quick else 10)
    sessions = args.sessions or (20_000 if quick else 200_000)
    if members < 2 or sessions < members:
        parser.error("need at least 2 members and one session per member")
    sample = min(sessions // members, 300 if quick else 2000)

    async def run(work: Path) -> dict[str, Any]:
        modes = {}
        for replication in MODES:
            modes[replication] = await run_mode(work, replication, members, sessions, sample)
        return {"members": members, "sessions": sessions, "takeover_sample": sample,
                "modes": modes}

    return run_benchmark("statesync_scale", quick, "meshxl-scale-", run, verdicts,
                         print_report)


if __name__ == "__main__":
    sys.exit(main())
