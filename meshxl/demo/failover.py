"""``meshxl demo``: kill -9 a member under session traffic and measure what clients saw.

Everything runs on loopback: etcd (embedded unless ``--etcd``), an OTLP receiver for
Envoy's request spans, the xDS control plane, three members (the sample counter app
:mod:`meshxl.demo.app` plus its statesync sidecar each) and Envoy. Sessions are driven
through Envoy; part-way through, the member serving them is killed (app and sidecar,
SIGKILL). The run then reads every session back and writes, in the output directory:

* ``report.json``: requests, failures, acknowledged and lost writes, recovery time per
  session (RTO), detection, convergence and takeover times from the failover trace;
  and, beside the requests, resumable streams (:mod:`meshxl.local.tallies`) through the
  same kill: their messages lost, duplicated, reordered or applied twice, and how soon
  each answered again from the new owner (``streams``);
* ``traces.jsonl``: every process's spans (OTLP JSON lines), one failover trace among
  Envoy's, the apps' and the sidecars' request traces;
* ``timeline.png``: requests per member over time with the failover's events.

This module is the flow and its live progress only, over reusable parts: the traffic
(:mod:`meshxl.local.traffic`), the report's computations and summary table
(:mod:`meshxl.local.report`, percentiles by :mod:`meshxl.stats`) and the picture
(:mod:`meshxl.local.plot`).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.markup import escape

from meshxl.local.deployment import CLUSTER, MODES, DemoDeployment
from meshxl.local.plot import plot_timeline
from meshxl.local.procs import remove_if_empty
from meshxl.local.report import build_report, busiest_member, kill_failover, print_summary
from meshxl.local.streams import StreamTraffic, read_back_kind, reconnect_report
from meshxl.local.tallies import TallyTraffic
from meshxl.local.traffic import REQUEST_INTERVAL, Traffic, read_back
from meshxl.telemetry.otlpjson import merge_traces, read_spans


def _progress(traffic: Traffic, started: float, duration: float, killed: str | None) -> Any:
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    elapsed = min(duration, time.time() - started)
    table.add_row("[bold]time[/]", f"{elapsed:5.1f} / {duration:.0f} s",
                  "[bold]requests[/]", str(len(traffic.records)),
                  "[bold]failed[/]", f"[{'red' if traffic.failures else 'green'}]"
                                     f"{traffic.failures}[/]")
    row = []
    for member in sorted(set(traffic.counts) | {"a", "b", "c"}):
        mark = " [red](killed)[/]" if member == killed else ""
        row += [f"[bold]{member}[/]{mark}", str(traffic.counts[member])]
    table.add_row(*row)
    return table


async def _wait_spans_settled(path: Path, quiet: float = 0.6, timeout: float = 5.0) -> None:
    """Until Envoy's span file stops growing for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    def size_of() -> int:
        return path.stat().st_size if path.exists() else 0

    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        size = await asyncio.to_thread(size_of)
        if size != last:
            last, since = size, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        await asyncio.sleep(0.1)


#: ``--protocol`` -> the traffic that drives it (:mod:`meshxl.local.streams`'s kinds; HTTP
#: is :class:`meshxl.local.traffic.Traffic`).
KINDS = {"http": "http", "grpc": "grpc", "websocket": "websocket", "tcp": "tcp"}
#: ``--protocol`` -> the resumable streams run beside its traffic (TCP has none: a byte
#: stream without framing is reconnect-only).
STREAM_KINDS = {"http": "websocket", "websocket": "websocket", "grpc": "grpc"}
STREAMS = 10
"""Resumable streams beside the requests."""


def _traffic(protocol: str, deployment: DemoDeployment, sessions: int, until: float,
             traces: Path) -> Any:
    max_requests = int(sessions * ((until - time.time()) / REQUEST_INTERVAL + 10))
    if protocol == "http":
        return Traffic(f"{deployment.url}/counter", sessions, until,
                       max_requests=max_requests, trace_file=traces / "client.jsonl")
    return StreamTraffic(KINDS[protocol], deployment.target, sessions, until, max_requests)


async def _read_back(protocol: str, deployment: DemoDeployment,
                     sessions: list[str]) -> tuple[dict[str, int | None], list[Any]]:
    if protocol == "http":
        return await read_back(f"{deployment.url}/counter", sessions)
    return await read_back_kind(KINDS[protocol], deployment.target, sessions)


async def run_demo(console: Any, *, mode: str = "high-availability", sessions: int = 40,
                   duration: float = 20.0, output_dir: Path | None = None,
                   etcd_url: str | None = None, kill_at: float | None = None,
                   protocol: str = "http") -> int:
    """Run the failover demo; returns 1 if an acknowledged write was lost (or a stream's
    message was lost, duplicated, reordered or applied twice), else 0.
    ``protocol``: what the members speak and the clients drive (:data:`KINDS`)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if protocol not in KINDS:
        raise ValueError(f"protocol must be one of {', '.join(KINDS)}, got {protocol!r}")
    if sessions < 1 or duration <= 0:
        raise ValueError("sessions must be >= 1 and duration > 0")
    kill_after = duration * 0.4 if kill_at is None else kill_at
    if not 0 < kill_after < duration:
        raise ValueError(f"kill_at must be inside the run (0 < {kill_after} < {duration})")
    out = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="meshxl-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    traces = out / "traces"
    traces.mkdir(exist_ok=True)
    for old in traces.glob("*.jsonl"):
        old.unlink()
    # Everything a run leaves is in `out`: its results, and its processes' logs in
    # out/logs (etcd's data there is removed at close: Owner.scratch).
    work = out / "logs"
    deployment = DemoDeployment(work, mode=mode, etcd_url=etcd_url, trace_dir=traces,
                                protocol=protocol)
    try:
        with console.status("starting etcd, the control plane, three members and Envoy..."):
            await deployment.start()
        console.print(f"[bold]meshxl demo[/] ({protocol}, {mode}): {sessions} sessions "
                      f"for {duration:g} s through Envoy {escape(deployment.target)}; kill -9 "
                      f"at {kill_after:g} s. Logs in {escape(str(work))}")

        started = time.time()
        traffic = _traffic(protocol, deployment, sessions, started + duration, traces)
        tallies = TallyTraffic(deployment.url if protocol != "grpc" else deployment.target,
                               STREAM_KINDS[protocol], STREAMS, started + duration,
                               interval=0.1, prefix="demo") \
            if protocol in STREAM_KINDS else None
        streaming = asyncio.create_task(tallies.run()) if tallies is not None else None
        killed: str | None = None
        kill_time: float | None = None
        from rich.live import Live

        with Live(_progress(traffic, started, duration, None), console=console,
                  refresh_per_second=5, transient=False) as live:
            load = asyncio.create_task(traffic.run())
            while not load.done():
                if killed is None and time.time() - started >= kill_after:
                    killed = ("a" if mode == "high-availability"
                              else busiest_member(traffic.records) or "a")
                    kill_time = await deployment.kill_member(killed)
                live.update(_progress(traffic, started, duration, killed))
                await asyncio.wait([load], timeout=0.05)
            await load
            if streaming is not None:
                await streaming
            live.update(_progress(traffic, started, duration, killed))
        console.print()
        ended = time.time()
        if killed is not None:
            await deployment.reap_member(killed)

        final, readback = await _read_back(protocol, deployment, traffic.sessions)
        records = traffic.records + readback

        # Stop: the control plane first (so no member's shutdown looks like a
        # failover), Envoy once its spans are out, then the members, gracefully so
        # every process flushes its trace file.
        await deployment.stop_replicas()
        await _wait_spans_settled(traces / "envoy.jsonl")
        await deployment.stop_envoy()
        await deployment.stop_members()
        await deployment.stop_receiver()
        merge_traces(traces, out / "traces.jsonl")
        spans = read_spans([str(out / "traces.jsonl")])

        fo = kill_failover(spans, killed, kill_time)
        report = build_report(records, final, spans, cluster=CLUSTER, mode=mode,
                              members=[m.name for m in deployment.members],
                              sessions=sessions, duration=duration, started=started,
                              kill_time=kill_time, killed=killed, failover=fo)
        report["protocol"] = protocol
        if isinstance(traffic, StreamTraffic) and protocol != "grpc":
            report["reconnects"] = reconnect_report(traffic.reconnects, kill_time, killed)
        if tallies is not None:
            report["streams"] = tallies.report(kill_time, killed)
        report["traffic_ended_s"] = round(ended - started, 3)
        report["readback_failed"] = sum(1 for r in readback if not r.ok)
        # The picture needs matplotlib (the `demo` extra); without it the run still counts.
        plotting = importlib.util.find_spec("matplotlib") is not None
        report["files"] = {"report": str(out / "report.json"),
                           "traces": str(out / "traces.jsonl"), "logs": str(work)}
        if plotting:
            report["files"]["timeline"] = str(out / "timeline.png")
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        plot_report = dict(report)
        plot_report["failover"] = {**report.get("failover", {}), "_pushes_ns": fo.pushes_ns,
                                   "_acks_ns": fo.acks_ns, "_takeovers_ns": fo.takeovers_ns}
        if plotting:
            await asyncio.to_thread(plot_timeline, out / "timeline.png", traffic.records,
                                    plot_report, started, max(ended, started + duration))
        print_summary(console, report, out)
        broken = report.get("streams") or {}
        return 1 if report["lost_writes"] or any(
            broken.get(k) for k in ("lost", "duplicated", "reordered", "misapplied",
                                    "errors")) else 0
    finally:
        await deployment.close()
        if output_dir is None:
            remove_if_empty(out)


__all__ = ["KINDS", "run_demo"]
