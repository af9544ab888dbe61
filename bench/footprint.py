"""The statesync sidecar's footprint beside its floors, for ``bench/sidecar_memory.py``.

Measured side by side in one run, each a process of its own on the same machine:

* ``bare_python``: the interpreter of the virtualenv, nothing imported (what any Python
  sidecar starts from);
* ``bare_etcd_client``: an asyncio program with aetcd (grpcio) connected to the etcd
  and one ``get`` done: the floor of any Python process that talks to etcd over gRPC;
* the sidecar (``meshxl serve statesync``), idle and ready, under a model whose cluster
  replicates ``all`` sessions, and one whose cluster replicates ``narrow``;
* each sidecar once it owns ``N`` sessions of ~1 KiB written through its own API (PUT):
  RSS growth per session beyond the session's own bytes (id + state);
* the ``all`` sidecar under load: writers overwriting its sessions as fast as they can
  for a bounded time and count, RSS and threads sampled throughout.

RSS from ``/proc/PID/statm``, threads from ``/proc/PID/task``, each read once the value
stopped moving. The bytecode is compiled first, as an installed sidecar has it
(:func:`compile_bytecode`). Before each process starts, the page cache's copies of the
environment's extension modules are dropped (:func:`drop_cached_extensions`), so each
process's RSS counts the pages it maps from them, not what the page cache held of a
freshly installed file. Loopback only; every loop bounded in count and time.

``python``: the interpreter of every process measured (default: this one), e.g. a
virtualenv with the newest releases the version ranges allow, meshxl installed in it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from meshxl.etcd.keys import Keys
from meshxl.local import commands
from meshxl.local.ports import free_ports
from meshxl.local.procs import Owner, Process
from meshxl.local.servers import HOST
from meshxl.local.wait import LocalError, wait_http, wait_until
from meshxl.stats import cpu_seconds, rss_bytes

READY = "footprint-ready"
BARE_PYTHON = f"import time; print({READY!r}, flush=True); time.sleep(3600)"
BARE_ETCD_CLIENT = f"""
import asyncio, sys
import aetcd

async def main():
    client = aetcd.Client(host=sys.argv[1], port=int(sys.argv[2]))
    await client.connect()
    await client.get(b"footprint")
    print({READY!r}, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""
CLUSTERS = {"all": "fp-all", "narrow": "fp-narrow"}
WRITERS = 32
LOAD_WRITERS = 16
START_TIMEOUT = 60.0


COMPILE = r"""
import compileall, re, sys, sysconfig
from pathlib import Path
import meshxl
tests = re.compile(r"[/\\](test|tests|idle_test)[/\\]")
for where in (Path(meshxl.__file__).parent, sysconfig.get_path("purelib"),
              sysconfig.get_path("stdlib")):
    if not compileall.compile_dir(where, quiet=1, optimize=[0, 2], rx=tests):
        sys.exit(f"compiling the bytecode under {where} failed")
"""
SITE = ("import sysconfig; print(sysconfig.get_path('purelib')); "
        "print(sysconfig.get_path('platlib'))")


def compile_bytecode(python: str = sys.executable) -> None:
    """Compile the bytecode a sidecar loads, plain and without docstrings (``-OO``):
    meshxl's, its dependencies' (the environment's site-packages) and the standard
    library's, as the image holds them (Dockerfile), with ``python`` (whose meshxl and
    paths they are). A module without it is compiled at every start (a tree never
    compiled, or PYTHONDONTWRITEBYTECODE): about 1 MiB more RSS for meshxl's alone, 3
    MiB for all, that no installed sidecar carries."""
    done = subprocess.run([python, "-c", COMPILE], capture_output=True, text=True,
                          timeout=900)
    if done.returncode != 0:
        raise LocalError(f"compiling the bytecode with {python} failed: "
                         f"{(done.stderr or done.stdout).strip()[-500:]}")


def extension_modules(python: str = sys.executable) -> list[Path]:
    """The extension modules (``*.so``) of ``python``'s site-packages."""
    out = subprocess.run([python, "-c", SITE], capture_output=True, text=True, timeout=60,
                         check=True).stdout.split()
    found: set[Path] = set()
    for where in dict.fromkeys(out):
        found.update(Path(where).rglob("*.so"))
    return sorted(found)


def mapped(files: list[Path], pid: int | str = "self") -> set[Path]:
    """Which of ``files`` process ``pid`` maps (``/proc/PID/maps``)."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            names = {line.split(maxsplit=5)[-1].strip() for line in maps if "/" in line}
    except OSError:
        return set()
    return {file for file in files if str(file) in names}


def held_elsewhere(files: list[Path]) -> dict[str, list[int]]:
    """Which of ``files`` other processes map (by path within site-packages), and
    their pids: those cached pages stay as they are whatever is dropped (another run
    from the same environment, a demo's sidecars)."""
    out: dict[str, list[int]] = {}
    for entry in sorted(Path("/proc").iterdir(), key=lambda p: p.name.zfill(12)):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        for file in mapped(files, entry.name):
            out.setdefault(str(file).rpartition("site-packages/")[2],
                           []).append(int(entry.name))
    return out


def drop_cached_extensions(files: list[Path]) -> None:
    """Drop the page cache's copies of ``files`` (``POSIX_FADV_DONTNEED``; pages a
    running process maps stay). What a process maps of an extension module counts in
    its RSS, and how much that is follows how the file came into the page cache: one
    freshly written by pip (large folios, mapped whole) showed grpcio's extension 14.8
    MiB resident in the bare aetcd client, the same file copied or read back from disk
    10.3 MiB (2026-11-27, docs/performance.md), in the floor and the sidecar alike. Dropped
    before each process starts, each maps what it touches, whatever ran before."""
    for file in files:
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def model() -> str:
    """One load-sharing cluster per replication scope, members registered."""
    out = ["clusters:"]
    for replication, cluster in CLUSTERS.items():
        out += [f"- name: {cluster}", "  mode: load-sharing", "  membership: registered",
                f"  sessions: {{replication: {replication}}}", "  members:",
                "  - {name: m1, address: 127.0.0.1, port: 1}"]
    return "\n".join(out) + "\n"


def threads(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def thread_names(pid: int) -> dict[str, int]:
    """Threads by name (``comm``): which library runs them."""
    names: Counter[str] = Counter()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    for task in tasks:
        try:
            names[Path(f"/proc/{pid}/task/{task}/comm").read_text().strip()] += 1
        except OSError:
            continue
    return dict(sorted(names.items()))


async def settled_rss(pid: int, seconds: float = 2.0) -> int:
    """RSS once it stopped moving: sampled every 0.25 s until two samples a second apart
    agree within 64 KiB (at most ``seconds`` * 4 samples; the last one)."""
    samples = [rss_bytes(pid) or 0]
    for _ in range(max(4, int(seconds * 4))):
        await asyncio.sleep(0.25)
        samples.append(rss_bytes(pid) or 0)
        if len(samples) >= 5 and abs(samples[-1] - samples[-5]) <= 65536:
            break
    return samples[-1]


def mib(value: float) -> float:
    return round(value / 2**20, 1)


async def process(pid: int) -> dict[str, Any]:
    rss = await settled_rss(pid)
    return {"rss_mb": mib(rss), "rss_bytes": rss, "threads": threads(pid),
            "thread_names": thread_names(pid)}


async def _bare(stack: Owner, name: str, argv: list[str], cached: list[Path]
                ) -> dict[str, Any]:
    drop_cached_extensions(cached)
    proc = stack.spawn(name, argv)

    async def ready() -> bool:
        return READY in proc.logs()

    await wait_until(ready, timeout=START_TIMEOUT, interval=0.05, what=f"{name} to start",
                     process=proc)
    assert proc.pid is not None
    out = await process(proc.pid)
    await proc.stop()
    return out


async def bare_python(stack: Owner, python: str, cached: list[Path]) -> dict[str, Any]:
    return await _bare(stack, "bare-python", [python, "-c", BARE_PYTHON], cached)


async def bare_etcd_client(stack: Owner, url: str, python: str, cached: list[Path]
                           ) -> dict[str, Any]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return await _bare(stack, "bare-etcd-client",
                       [python, "-c", BARE_ETCD_CLIENT, host, port], cached)


async def sidecar(stack: Owner, url: str, keys: Keys, cluster: str,
                  name: str, python: str, cached: list[Path]) -> tuple[str, Process]:
    app_port, port = free_ports(2)
    drop_cached_extensions(cached)
    proc = stack.spawn(name, commands.statesync(
        cluster=cluster, member="m1", app=f"{HOST}:{app_port}", listen=f"{HOST}:{port}",
        etcd=url, etcd_prefix=keys.root, log_level="warning", python=(python, "-u")))
    base = f"http://{HOST}:{port}"
    await wait_http(f"{base}/readyz", process=proc, timeout=START_TIMEOUT)
    return base, proc


def document(session_id: str, size: int) -> bytes:
    """A JSON session document of exactly ``size`` bytes (for ids of one length)."""
    doc = {"user": session_id, "cart": [], "pad": ""}
    base = len(json.dumps(doc, separators=(",", ":")).encode())
    doc["pad"] = "x" * max(0, size - base)
    return json.dumps(doc, separators=(",", ":")).encode()


async def write_owned(base: str, sessions: int, size: int, prefix: str) -> int:
    """PUT ``sessions`` new sessions through the sidecar; the payload bytes (ids +
    states)."""
    payload = 0
    from meshxl.client import AsyncClient  # httptools: after the drop (measure)

    async with AsyncClient(base) as client:
        async def writer(k: int) -> int:
            written = 0
            for i in range(k, sessions, WRITERS):
                sid = f"{prefix}-{i:07d}"
                data = document(sid, size)
                await client.put(sid, data, content_type="application/json")
                written += len(sid) + len(data)
            return written

        async with asyncio.timeout(max(60.0, sessions / 50)):
            payload = sum(await asyncio.gather(*(writer(k) for k in range(WRITERS))))
    return payload


async def owned(stack: Owner, url: str, keys: Keys, replication: str, sessions: int,
                size: int, python: str, cached: list[Path]
                ) -> tuple[dict[str, Any], str, Process]:
    """A sidecar of the ``replication`` cluster: idle, then owning ``sessions``."""
    base, proc = await sidecar(stack, url, keys, CLUSTERS[replication],
                               f"sidecar-{replication}", python, cached)
    assert proc.pid is not None
    idle = await process(proc.pid)
    t = time.monotonic()
    payload = await write_owned(base, sessions, size, replication)
    write_s = time.monotonic() - t
    after = await process(proc.pid)
    growth = after["rss_bytes"] - idle["rss_bytes"]
    return {
        "replication": replication, "idle": idle, "sessions": sessions,
        "document_bytes": size, "payload_mb": mib(payload),
        "rss_with_sessions_mb": after["rss_mb"],
        "growth_per_session_bytes": round(growth / sessions),
        "overhead_per_session_bytes": round((growth - payload) / sessions),
        "write_s": round(write_s, 1),
    }, base, proc


async def under_load(base: str, pid: int, sessions: int, size: int, prefix: str,
                     seconds: float, max_writes: int) -> dict[str, Any]:
    """Writers overwrite the sidecar's own sessions for ``seconds`` or ``max_writes``;
    RSS and threads sampled every 50 ms."""
    before = await settled_rss(pid)
    peak_rss, peak_threads, done = before, threads(pid), 0
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal peak_rss, peak_threads
        while not stop.is_set():
            peak_rss = max(peak_rss, rss_bytes(pid) or 0)
            peak_threads = max(peak_threads, threads(pid))
            await asyncio.sleep(0.05)

    from meshxl.client import AsyncClient

    async with AsyncClient(base) as client:
        datas = [document(f"{prefix}-{i:07d}", size) for i in range(LOAD_WRITERS)]
        end = time.monotonic() + seconds

        async def writer(k: int) -> None:
            nonlocal done
            i = k
            while time.monotonic() < end and done < max_writes:
                await client.put(f"{prefix}-{i % sessions:07d}", datas[k],
                                 content_type="application/json")
                done += 1
                i += LOAD_WRITERS

        sampler = asyncio.get_running_loop().create_task(sample())
        cpu0 = cpu_seconds(pid) or 0.0
        t = time.monotonic()
        async with asyncio.timeout(seconds + 30.0):
            await asyncio.gather(*(writer(k) for k in range(LOAD_WRITERS)))
        elapsed = time.monotonic() - t
        cpu = (cpu_seconds(pid) or 0.0) - cpu0
        stop.set()
        await sampler
    after = await settled_rss(pid)
    return {"writers": LOAD_WRITERS, "writes": done, "seconds": round(elapsed, 1),
            "writes_per_s": round(done / elapsed), "rss_before_mb": mib(before),
            "rss_peak_mb": mib(peak_rss), "rss_after_mb": mib(after),
            "threads_peak": peak_threads,
            "sidecar_cpu_us_per_write": round(cpu / max(1, done) * 1e6, 1)}


async def measure(stack: Owner, url: str, sessions: int, load_seconds: float,
                  load_writes: int, python: str = sys.executable) -> dict[str, Any]:
    """Everything above, side by side; 1 KiB documents; every process run by ``python``."""
    keys = Keys("/meshxl-bench-footprint")
    from meshxl import etcd

    await asyncio.to_thread(compile_bytecode, python)
    cached = extension_modules(python)
    # The pages of an extension that this process maps stay in the page cache as they
    # came, whatever is dropped: pip's freshly written grpcio extension, mapped here by
    # the etcd client below before the drop, showed 2.3 MiB more in every process
    # measured after it (12.9 against 10.6 MiB in the bare aetcd client, 2026-11-29). So
    # this process loads grpcio only now, once the copies are dropped, and what it
    # holds of an environment's extensions (aiohttp's, here only) is checked below
    # against what the sidecar maps.
    held = mapped(cached)
    drop_cached_extensions(cached)
    elsewhere = held_elsewhere(cached)
    from meshxl.operator.actions import apply_model

    async with etcd.client(url) as client:
        await apply_model(client, keys, model(), "bench footprint model")
    res: dict[str, Any] = {"python": python,
                           "versions": await asyncio.to_thread(versions, python),
                           "held_elsewhere": elsewhere,
                           "bare_python": await bare_python(stack, python, cached),
                           "bare_etcd_client": await bare_etcd_client(stack, url, python,
                                                                      cached)}
    res["owned"] = []
    for replication in CLUSTERS:
        found, base, proc = await owned(stack, url, keys, replication, sessions, 1024,
                                        python, cached)
        res["owned"].append(found)
        assert proc.pid is not None
        if shared := held & mapped(cached, proc.pid):
            raise LocalError(f"the benchmark mapped {sorted(shared)[0]} before its cached "
                             "pages were dropped, and the sidecar maps it too")
        if replication == "all":
            res["load"] = await under_load(base, proc.pid, sessions, 1024, replication,
                                           load_seconds, load_writes)
        await proc.stop()
    return res


VERSIONS = """
import json
from importlib.metadata import version
print(json.dumps({name: version(name) for name in
                  ("grpcio", "protobuf", "aetcd", "msgspec", "uvloop", "httptools", "orjson")}))
"""


def versions(python: str) -> dict[str, str]:
    """The versions of the libraries a sidecar loads, in ``python``'s environment."""
    out = subprocess.run([python, "-c", VERSIONS], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return dict(json.loads(out.splitlines()[-1]))


def report(res: dict[str, Any]) -> list[str]:
    """The footprint's lines of the benchmark's report."""
    lines = ["\n== sidecar footprint (RSS MiB, threads), beside its floors"]
    if "versions" in res:
        lines.append(f"  {res['python']}: " + ", ".join(
            f"{name} {v}" for name, v in res["versions"].items()))
    for file, pids in res.get("held_elsewhere", {}).items():
        lines.append(f"  NOTE: {file} mapped by other processes ({len(pids)}, pid "
                     f"{pids[0]}...): its cached pages were not dropped")
    for name in ("bare_python", "bare_etcd_client"):
        p = res[name]
        lines.append(f"  {name:<26} {p['rss_mb']:>6} MiB {p['threads']:>3} threads")
    for o in res["owned"]:
        idle = o["idle"]
        lines.append(f"  sidecar idle ({o['replication']:<6})      {idle['rss_mb']:>6} MiB "
                     f"{idle['threads']:>3} threads {idle['thread_names']}")
        lines.append(f"    owning {o['sessions']:,} x ~{o['document_bytes']} B: "
                     f"{o['rss_with_sessions_mb']} MiB, {o['growth_per_session_bytes']} B "
                     f"growth per session, {o['overhead_per_session_bytes']} B beyond its "
                     "own bytes")
    load = res.get("load")
    if load:
        lines.append(f"  under load ({load['writers']} writers, {load['writes']:,} writes, "
                     f"{load['writes_per_s']:,}/s): RSS {load['rss_before_mb']} -> peak "
                     f"{load['rss_peak_mb']} -> {load['rss_after_mb']} MiB, threads peak "
                     f"{load['threads_peak']}, {load['sidecar_cpu_us_per_write']} us "
                     "sidecar CPU per write")
    return lines
