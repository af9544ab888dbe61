"""What every benchmark in ``bench/`` shares: quick mode, the summary of
:mod:`meshxl.stats` (the one percentile definition of every report; the per-process
figures ``rss_bytes`` and ``cpu_seconds`` are there too), target verdicts and the results
file.

Each benchmark writes ``bench/results/NAME.json`` with a ``verdicts`` list (one entry
per target: measured, target, the reference measured beside it, met or not);
``bench/summary.py`` draws them all into one PNG.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import runpy
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from meshxl.stats import summary

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def quick_requested(flag: bool) -> bool:
    """``--quick`` or ``BENCH_QUICK=1`` in the environment (what ``make bench`` passes)."""
    return flag or os.environ.get("BENCH_QUICK", "") not in ("", "0", "false", "no")


def env_info() -> dict[str, Any]:
    load = os.getloadavg()
    return {"python": platform.python_version(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "loadavg_at_start": [round(x, 2) for x in load],
            "started_unix": round(time.time(), 3)}


# -- statistics: meshxl.stats, the definitions every report uses -------------------------


def summary_ms(values_ms: Sequence[float], digits: int = 2) -> dict[str, Any]:
    """:func:`meshxl.stats.summary` (``{n, min, p50, p90, p99, max, mean}``, nearest-rank
    percentiles) of values already in milliseconds, rounded to ``digits``."""
    return summary(values_ms, digits)


# -- verdicts ---------------------------------------------------------------------------


@dataclass
class Verdict:
    """One target: ``measured`` against ``target`` (``at_most`` or ``at_least``)."""

    name: str
    measured: float | None
    target: float
    unit: str
    at_most: bool = True
    reference: str = ""
    """What was measured beside it in the same run, in words (``"raw etcd 9,300/s"``)."""
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.measured is None:
            return None
        return self.measured <= self.target if self.at_most else self.measured >= self.target

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["met"] = self.met
        return out

    def line(self) -> str:
        sign = "<=" if self.at_most else ">="
        verdict = {True: "MET", False: "MISSED", None: "NOT MEASURED"}[self.met]
        measured = "-" if self.measured is None else _num(self.measured)
        ref = f"   [{self.reference}]" if self.reference else ""
        return (f"  {self.name:<52} {measured:>9} {self.unit:<7} target {sign} "
                f"{_num(self.target)} {self.unit:<7} {verdict}{ref}")


def _num(value: float) -> str:
    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def print_verdicts(title: str, verdicts: Sequence[Verdict]) -> None:
    print(f"\n== {title}: targets")
    for v in verdicts:
        print(v.line())


def write_results(name: str, result: dict[str, Any], verdicts: Sequence[Verdict]) -> Path:
    """``bench/results/NAME.json`` with the run's verdicts; returns the path."""
    result = dict(result)
    result["verdicts"] = [v.as_dict() for v in verdicts]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


# -- a mesh to serve ----------------------------------------------------------------------


def mesh_model(clusters: int, members: int, *, listener_port: int, clusters_per_listener: int = 10,
               prefix: str = "svc") -> str:
    """A load-sharing, maglev model: ``clusters`` x ``members`` (two sites), health checks
    off (the members are addresses nobody serves), one listener per
    ``clusters_per_listener`` clusters from ``listener_port`` up."""
    lines = ["clusters:"]
    half = max(1, members // 2)
    for i in range(clusters):
        lines += [
            f"  - name: {prefix}-{i:04d}",
            "    mode: load-sharing",
            "    stickiness: {algorithm: maglev, header: x-session-id}",
            "    sites: [{name: dc1}, {name: dc2}]",
            "    health_check: {enabled: false}",
            "    members:",
        ]
        lines += [f"      - {{name: m{j:02d}, address: 127.0.0.{j + 1}, port: {20000 + i}, "
                  f"site: {'dc1' if j < half else 'dc2'}}}" for j in range(members)]
        lines += [f"    listener: {{address: 127.0.0.1, "
                  f"port: {listener_port + i // clusters_per_listener}}}",
                  f"    route: {{domains: [\"{prefix}-{i:04d}.local\"]}}"]
    return "\n".join(lines) + "\n"


async def start_control_plane(stack: Any, model: str, name: str = "xds") -> dict[str, Any]:
    """etcd (in ``stack``), ``model`` stored in it, and one ``meshxl serve xds`` process
    with its admin endpoint. Returns ``{etcd, keys, port, admin, process}``."""
    from meshxl import etcd
    from meshxl.etcd.keys import Keys
    from meshxl.local import commands
    from meshxl.local.ports import free_ports
    from meshxl.local.servers import HOST, start_etcd
    from meshxl.local.wait import wait_http
    from meshxl.operator.actions import apply_model

    url = (await start_etcd(stack))[0]
    keys = Keys(f"/meshxl-bench-{os.getpid()}")
    async with etcd.client(url) as client:
        await apply_model(client, keys, model, "bench model")
    port, admin_port = free_ports(2)
    process = stack.spawn(name, commands.xds(
        listen=f"{HOST}:{port}", etcd=url, etcd_prefix=keys.root, admin=f"{HOST}:{admin_port}",
        replica=name, log_level="warning"))
    admin = f"http://{HOST}:{admin_port}"
    await wait_http(f"{admin}/readyz", process=process, timeout=30)
    return {"etcd": url, "keys": keys, "port": port, "admin": admin, "process": process}


# -- running a benchmark -------------------------------------------------------------------


async def convergence_histogram(http: Any, admin: str) -> tuple[float, float]:
    """(count, sum) of the control plane's ``meshxl_xds_convergence_seconds``."""
    from prometheus_client.parser import text_string_to_metric_families

    async with http.get(f"{admin}/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        if family.name == "meshxl_xds_convergence_seconds":
            values = {s.name: s.value for s in family.samples if not s.labels.get("le")}
            return (values.get("meshxl_xds_convergence_seconds_count", 0.0),
                    values.get("meshxl_xds_convergence_seconds_sum", 0.0))
    return 0.0, 0.0


@contextlib.asynccontextmanager
async def etcd_with_client() -> AsyncIterator[tuple[Any, str, int]]:
    """A fresh etcd in a temporary directory and meshxl's client to it (its h2c path):
    ``(client, url, etcd's pid)``; both stopped at the end."""
    import tempfile

    from meshxl import etcd
    from meshxl.etcd import h2c
    from meshxl.local.procs import Owner
    from meshxl.local.servers import start_etcd

    with tempfile.TemporaryDirectory(prefix="meshxl-bench-") as work:
        stack = Owner(Path(work), grace=3.0)
        try:
            url, etcd_proc = await start_etcd(stack)
            assert etcd_proc.pid is not None
            client = etcd.client(url)
            assert isinstance(client, h2c.Client)
            await client.connect()
            try:
                yield client, url, etcd_proc.pid
            finally:
                await client.close()
        finally:
            await stack.aclose()


def probe_main(name: str, doc: str, run: Callable[[bool], Any],
               report: Callable[[dict[str, Any]], None]) -> int:
    """``main`` of a benchmark without verdicts: ``--quick``, ``run(quick)`` on meshxl's
    event loop, the results written to ``bench/results/NAME.json``, ``report(res)``."""
    import argparse

    from meshxl.loops import loop_factory

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    quick = quick_requested(parser.parse_args().quick)
    started = time.perf_counter()
    res: dict[str, Any] = {"benchmark": name, "quick": quick, "env": env_info()}
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        res.update(runner.run(run(quick)))
    res["seconds"] = round(time.perf_counter() - started, 1)
    path = write_results(name, res, [])
    report(res)
    print(f"  results: {path}\n  ran in {res['seconds']} s")
    return 0


async def share_writes(calls: int, writers: int,
                       write: Callable[[int, bytes], Awaitable[None]], prefix: bytes) -> None:
    """``calls`` writes shared by ``writers`` concurrent writers: writer ``i`` calls
    ``write(i, its key)`` (``prefix`` and its number) while writes are left to take."""
    sent = 0

    async def writer(i: int) -> None:
        nonlocal sent
        key = prefix + b"%04d" % i
        while sent < calls:
            sent += 1
            await write(i, key)

    await asyncio.gather(*(writer(i) for i in range(writers)))


async def watch_events(client: Any, prefix: bytes, end: bytes, start: int, count: int,
                       done: asyncio.Event) -> None:
    """Read etcd's watch of ``[prefix, end)`` from revision ``start`` (meshxl's own
    watch path) until ``count`` events came, then set ``done``: the writes of a round
    have reached a watcher, as they reach a sidecar."""
    from meshxl import etcd

    seen = 0
    async for response in etcd.watch_responses(client, prefix, end, start):
        seen += len(response.events)
        if seen >= count:
            done.set()
            return


async def stop_load(load: asyncio.Task[Any] | None, traffic: Any) -> None:
    """End a benchmark's load task, also on failure: its traffic stops at once
    (``traffic.until = 0``), the task is cancelled and awaited, whatever it raised."""
    if load is None or load.done():
        return
    if traffic is not None:
        traffic.until = 0.0
    load.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await load


def run_benchmark(name: str, quick: bool, work_prefix: str, run: Any, verdicts: Any,
                  print_report: Any, *, write: bool = True,
                  output: Path | None = None) -> int:
    """The common tail of every benchmark's ``main``: ``run(work_dir)`` (a coroutine
    function returning the results) in a temporary directory, then verdicts, the
    results file (``write``: ``bench/results/NAME.json``; ``output``: also this file)
    and the report. Returns the exit code (0: the run completed)."""
    import asyncio
    import tempfile

    t0 = time.perf_counter()
    res: dict[str, Any] = {"benchmark": name, "quick": quick, "env": env_info()}
    from meshxl.binaries import MissingBinary

    def finish() -> None:
        res["seconds"] = round(time.perf_counter() - t0, 1)
        verdict_list = verdicts(res)
        if output is not None:
            output.write_text(json.dumps({**res, "verdicts": [v.as_dict()
                                                              for v in verdict_list]},
                                         indent=2, default=str) + "\n")
        path = write_results(name, res, verdict_list) if write else output
        print_report(res, verdict_list)
        print(f"  results: {path}; ran in {res['seconds']} s", flush=True)

    with tempfile.TemporaryDirectory(prefix=work_prefix) as work:
        try:
            # The results are kept before the loop is closed: closing it cancels what
            # is left, and a library's thread that does not end (grpc.aio's poller,
            # seen once after a 7-minute run) must not cost the run.
            with asyncio.Runner() as runner:
                res.update(runner.run(run(Path(work))))
                finish()
        except MissingBinary as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            return 1
    return 0


# -- wrappers that watch a module between signals (profiled.py, gcwatched.py) -----------


def run_module_between_signals(module: str, argv: Sequence[str],
                               start: Callable[[], None], stop: Callable[[], None]) -> None:
    """Run ``module`` as ``__main__`` with ``argv``: SIGUSR1 calls ``start`` (a window
    opens), SIGUSR2 ``stop`` (it closes and is written out), SIGTERM ends the run. So a
    benchmark watches the load it measures, window by window, not the start-up."""

    def terminate(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGUSR1, lambda _signum, _frame: start())
    signal.signal(signal.SIGUSR2, lambda _signum, _frame: stop())
    signal.signal(signal.SIGTERM, terminate)
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except (KeyboardInterrupt, SystemExit):
        pass
