"""Streams that outlive their member (docs/streams.md): 1,000 resumable streams per kind
through a real Envoy with meshxl's control plane, kill -9 and a drain of the member
serving them, beside the same streams without resumption and beside Socket.IO.

Run: ``.venv/bin/python bench/streams.py [--quick] [--streams N] [--kinds websocket,sse]
[--steady S] [--no-peer]`` (``BENCH_QUICK=1``: quick). Writes ``bench/results/streams.json``.

One local deployment per protocol (``meshxl.local.deployment.DemoDeployment``,
high-availability: etcd, one control plane, members a (active), b (standby), c (backup
site), each the demo app with its statesync sidecar, and Envoy; ``drain_window`` 2 s,
failback at once), all on loopback. Every kind runs the same ``--streams`` streams on
its own, one after the other (not split between kinds: each kind must carry the full
count), each stream its own session, sending the demo tally's ``{"n": N}`` every 0.2 s
and reading its answers: 5 messages a second each way per stream
(``bench/streamload.py``). Per kind:

1. **plain**: the same streams without resumption (the kind's plain equivalent through
   the same Envoy and app: ``streamload.KINDS``), steady for ``--steady`` seconds: the
   per-message latency (send -> answer) and the rate;
2. **kill -9**: the resumable streams, steady (latency, rate, and beside them one etcd
   put at a time to the deployment's etcd, what one commit costs at that moment, and
   the app's sidecar's bulk saves and sessions per save), then kill -9 of member a (app
   and sidecar) while HTTP sessions (``POST /counter``, the demo's counter) run too:
   their RTO (``bench/failover.py``'s definition) is the reference for the streams'
   resume time (kill -> first message on the resumed stream: on the connection that
   carries it from then on, ``bench/streamcheck.py``). Then a restarted;
3. **drain**: the resumable streams, then ``meshxl member down a`` (then up again).

Every stream's log is checked (``bench/streamcheck.py``): errors that reached the
application, messages lost, duplicated (answered or applied twice: the tally's totals
say) and reordered. Then Socket.IO's connection state recovery (``bench/streampeer.py``),
the same streams and message pattern, kill -9 of one of two servers.

Loopback only; every loop bounded in count and time; every process killed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchlib import Verdict, print_verdicts, quick_requested, run_benchmark, summary_ms
from failover import disruption_ms
from grpc import aio
from streamcheck import report
from streamload import (
    INTERVAL,
    KINDS,
    CommitProbe,
    Kind,
    Load,
    LoopLagLog,
    load_now,
    machine_busy,
    sidecar_counters,
)

from meshxl import etcd
from meshxl.local.deployment import CLUSTER, DemoDeployment
from meshxl.local.streams import StreamTraffic
from meshxl.local.traffic import Traffic
from meshxl.local.wait import LocalError, wait_until
from meshxl.operator.actions import set_member_admin
from meshxl.statesync.signals import LoopLag
from meshxl.stats import cpu_seconds

NAME = "streams"
_KEEP: list[Any] = []
"""What lives as long as the process (the idle gRPC channel of :func:`run`)."""
KILLED = "a"
DRAIN_WINDOW = 2.0
HTTP_SESSIONS = 50
HTTP_INTERVAL = 0.2
SETUP_TIMEOUT = 90.0
FIELDS = {"degradation": "{action: report}"}
"""Sick members are judged and reported, never moved: the active serving every stream
stays the active under the bench's own load (a predictive failover is not what is
measured here; docs/faults.md)."""
QUICK_STREAMS = 20
QUICK_STEADY = 1.5
"""The quick run's streams per kind and steady seconds: the smallest run that still has
every phase's streams talking, resumed and counted (the suite's smoke run: 32 CPU-s
where 40 streams and 3 s took 60), not a measurement (the full run is)."""


# -- one phase ---------------------------------------------------------------------------


def _processes(d: DemoDeployment) -> dict[str, int | None]:
    """Every process of the run (the other members' sidecars too: each follows every
    record written, through its etcd watch)."""
    out: dict[str, int | None] = {}
    for m in d.members:
        out[f"app-{m.name}"] = m.app.pid if m.app else None
        out[f"sidecar-{m.name}"] = m.sidecar.pid if m.sidecar else None
    out.update({"envoy": d.envoy.pid if d.envoy else None,
                "etcd": d.etcd_process.pid if d.etcd_process else None,
                "control-plane": d.replicas[0].process.pid if d.replicas[0].process
                else None, "bench": None})
    return out


class Window:
    """What the machine and the processes did during a steady window."""

    def __init__(self, d: DemoDeployment):
        import os

        self.pids = {k: (v if k != "bench" else os.getpid()) for k, v in _processes(d).items()}
        self.t0 = time.time()
        self.load = load_now()
        self.busy = machine_busy()
        self.cpu = {k: cpu_seconds(p) if p else None for k, p in self.pids.items()}

    def close(self) -> dict[str, Any]:
        self.t1 = time.time()
        span = max(self.t1 - self.t0, 1e-9)
        busy, total = machine_busy()
        cores = {}
        for k, p in self.pids.items():
            now = cpu_seconds(p) if p else None
            before = self.cpu[k]
            cores[k] = round((now - before) / span, 2) if now is not None \
                and before is not None else None
        return {"load_at_start": self.load, "load_at_end": load_now(),
                "machine_busy": round((busy - self.busy[0]) / max(total - self.busy[1], 1), 3),
                "cores_used": cores}


async def _sidecar_delta(url: str, before: dict[str, float]) -> dict[str, Any]:
    after = await sidecar_counters(url)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    saves = delta.get("bulk_saves", 0.0)
    batches = delta.get("batches", 0.0)
    return {"bulk_saves": int(saves), "sessions_saved": int(delta.get("bulk_saved_sessions", 0)),
            "sessions_per_bulk_save": round(delta.get("bulk_saved_sessions", 0) / saves, 1)
            if saves else None,
            "etcd_transactions": int(batches),
            "etcd_transaction_mean_ms": round(delta.get("batch_seconds_sum", 0) / batches
                                              * 1000, 2) if batches else None}


async def _on_a(d: DemoDeployment, kind: Kind) -> bool:
    """A fresh stream of the kind's plain tally is answered by member a."""
    load = Load(kind.plain, d.target, 1, f"probe{time.time_ns()}-")
    try:
        await load.open(5)
        conv = load.conversations[0]
        assert conv is not None
        await conv.send(1)
        async with asyncio.timeout(5):
            answer = await conv.receive()
        return answer.get("member") == KILLED
    finally:
        await load.close(0)


async def plain_phase(d: DemoDeployment, kind: Kind, streams: int, warmup: float,
                      steady: float) -> dict[str, Any]:
    load = Load(kind.plain, d.target, streams, f"{kind.name}-plain-{time.time_ns()}-")
    try:
        await load.open(120)
        load.start()
        await asyncio.sleep(warmup)
        window = Window(d)
        await asyncio.sleep(steady)
        facts = window.close()
    finally:
        await load.close(10)
    return _per_message({**report(load.logs, steady=(window.t0, window.t1)), **facts})


def _per_message(phase: dict[str, Any]) -> dict[str, Any]:
    """CPU microseconds per answered message, per process, in the steady window: what a
    message costs, which the machine's other work moves far less than latency."""
    rate = phase.get("answers_per_s") or 0
    cores = phase.get("cores_used") or {}
    phase["cpu_us_per_message"] = {k: round(v * 1e6 / rate) for k, v in cores.items()
                                   if v is not None and rate} if rate else {}
    if phase["cpu_us_per_message"]:
        phase["cpu_us_per_message"]["total"] = sum(phase["cpu_us_per_message"].values())
    return phase


async def resumable_phase(d: DemoDeployment, kind: Kind, streams: int, warmup: float,
                          steady: float, after: float, resume_timeout: float,
                          action: str) -> dict[str, Any]:
    """The resumable streams, steady, then ``action`` (``kill`` or ``drain``) of a."""
    load = Load(kind.resumable, d.target, streams, f"{kind.name}-{action}-{time.time_ns()}-")
    lag = LoopLag(interval=0.05, window=LoopLagLog())
    http: Any = None
    http_task: asyncio.Task[None] | None = None
    probe = CommitProbe(d.etcd_url, f"{d.keys.root}/bench-commit-probe")
    sidecar = d.member(KILLED).sidecar_url
    try:
        await load.open(180)
        load.start()
        lag.start()
        await asyncio.sleep(warmup)
        counters = await sidecar_counters(sidecar)
        window = Window(d)
        probe.start()
        await asyncio.sleep(steady)
        await probe.stop()
        facts = window.close()
        facts["sidecar_a"] = await _sidecar_delta(sidecar, counters)
        if action == "kill":  # after the steady window: its latency is the streams' alone
            http = _requests(d, kind)
            http_task = asyncio.create_task(http.run())
            try:
                await wait_until(lambda: _all_served(http), timeout=30, interval=0.05,
                                 what="every HTTP session served by member a")
            except LocalError:  # a saturated a: Envoy retried some on b; the run goes on
                facts["http_not_on_a"] = sorted(set(http.sessions) - _served_by_a(http))
        served = {log.answers[-1][3] for log in load.logs if log.answers}
        load.mark()
        at = time.time()
        if action == "kill":
            await d.kill_member(KILLED)
        else:
            async with etcd.client(d.etcd_url) as client:
                await set_member_admin(client, d.keys, CLUSTER, KILLED, True, "bench")

        def resumed() -> bool:
            streams_back = load.resumed(at) + sum(1 for log in load.logs if log.errors)
            http_back = http is None or {r.session for r in http.records
                                         if r.ok and r.sent > at} >= set(http.sessions)
            return streams_back >= streams and http_back

        try:
            await wait_until(resumed, timeout=resume_timeout, interval=0.05,
                             what=f"every {kind.name} stream answered again after the {action}")
        except LocalError as exc:
            facts["not_resumed_in_time"] = str(exc).splitlines()[0]
        all_back = time.time() - at
        await asyncio.sleep(after)
    finally:
        lag.stop()
        if http is not None:
            http.until = 0.0
        if http_task is not None:
            async with asyncio.timeout(30):
                await http_task
        await load.close(20)
    out = {**_per_message({**report(load.logs, steady=(window.t0, window.t1), event=at,
                                    member=KILLED), **facts}),
           "served_by_before": sorted(s for s in served if s),
           "all_back_s": round(all_back, 3),
           "etcd_put_ms": summary_ms(probe.times_ms),
           "bench_loop_lag_ms": {"steady": summary_ms(lag.window.ms(window.t0, window.t1)),
                                 "after": summary_ms(lag.window.ms(at))}}
    if http is not None:
        rto, unrecovered = disruption_ms(http.records, at, KILLED)
        out["http"] = {"kind": kind.requests, "sessions": HTTP_SESSIONS,
                       "requests": len(http.records),
                       "failed": sum(1 for r in http.records if not r.ok),
                       "rto_ms": summary_ms(rto), "unrecovered": len(unrecovered),
                       "on_killed_member": HTTP_SESSIONS - len(facts.get("http_not_on_a", ()))}
    return out


def _requests(d: DemoDeployment, kind: Kind) -> Any:
    """The sessions whose RTO under the kill is the reference: the demo's HTTP counter,
    or its unary gRPC calls in a gRPC deployment (``Kind.requests``)."""
    until, prefix = time.time() + 600, f"rto-{kind.name}-{time.time_ns()}-"
    if kind.requests == "grpc":
        return StreamTraffic("grpc", d.target, HTTP_SESSIONS, until,
                             max_requests=HTTP_SESSIONS * 3000, interval=HTTP_INTERVAL,
                             prefix=prefix)
    return Traffic(f"{d.url}/counter", HTTP_SESSIONS, until, max_requests=HTTP_SESSIONS * 3000,
                   interval=HTTP_INTERVAL, prefix=prefix)


def _served_by_a(http: Any) -> set[str]:
    return {r.session for r in http.records if r.ok and r.member == KILLED}


def _all_served(http: Any) -> bool:
    return _served_by_a(http) >= set(http.sessions)


async def _back_to_a(d: DemoDeployment, kind: Kind, killed: bool) -> None:
    if killed:
        await d.reap_member(KILLED)
        await d.start_member(d.member(KILLED))
    else:
        async with etcd.client(d.etcd_url) as client:
            await set_member_admin(client, d.keys, CLUSTER, KILLED, False, "bench")
    await d.wait_all_healthy(30)
    await wait_until(lambda: _on_a(d, kind), timeout=30, interval=0.2,
                     what="new streams served by member a again")


async def run_protocol(work: Path, kinds: list[Kind], streams: int, t: dict[str, float]
                       ) -> dict[str, Any]:
    d = DemoDeployment(work, protocol=kinds[0].protocol, mode="high-availability",
                       lease_ttl=2.0, drain_window=DRAIN_WINDOW,
                       failover="{failback_delay: 0s}", fields=FIELDS)
    out: dict[str, Any] = {}
    step = "starting the deployment"
    try:
        async with asyncio.timeout(SETUP_TIMEOUT):
            await d.start()
        await wait_until(lambda: _on_a(d, kinds[0]), timeout=30, interval=0.2,
                         what="new streams served by member a")
        for kind in kinds:
            res: dict[str, Any] = {}
            step = f"{kind.name}: plain streams"
            print(f"== {kind.label}: {streams} plain streams", flush=True)
            res["plain"] = await plain_phase(d, kind, streams, t["warmup"], t["steady"])
            step = f"{kind.name}: kill -9"
            print(f"== {kind.label}: {streams} resumable streams, kill -9", flush=True)
            res["kill"] = await resumable_phase(d, kind, streams, t["warmup"], t["steady"],
                                                t["after"], t["resume_timeout"], "kill")
            step = f"{kind.name}: restarting a"
            await _back_to_a(d, kind, killed=True)
            step = f"{kind.name}: drain"
            print(f"== {kind.label}: {streams} resumable streams, member down", flush=True)
            res["drain"] = await resumable_phase(d, kind, streams, t["warmup"], t["steady"],
                                                 t["after"], t["resume_timeout"]
                                                 + DRAIN_WINDOW, "drain")
            step = f"{kind.name}: member up"
            await _back_to_a(d, kind, killed=False)
            out[kind.name] = res
    except (LocalError, TimeoutError, OSError) as exc:
        traceback.print_exc()
        raise SystemExit(f"failed {step}: {exc!r}\n{d.owner.report()}") from None
    finally:
        await d.close()
    return out


async def run(work: Path, kinds: list[str], streams: int, t: dict[str, float],
              peer: bool) -> dict[str, Any]:
    res: dict[str, Any] = {"streams": streams, "interval_s": INTERVAL,
                           "drain_window_s": DRAIN_WINDOW, "timings_s": t,
                           "http_sessions": HTTP_SESSIONS, "kinds": {}}
    chosen = [KINDS[k] for k in kinds]
    # grpc.aio shuts its engine down when its last channel is freed (the gRPC kind's),
    # joining its poller thread, which may never wake (grpc/grpc#40989): two runs hung
    # there, one in the Socket.IO phase (the garbage collector freeing the channel),
    # one at the end. One idle channel, never connected and never closed, keeps the
    # engine up for the process's life (grpc/grpc#22365's workaround).
    _KEEP.append(aio.insecure_channel("127.0.0.1:9"))
    for protocol in dict.fromkeys(k.protocol for k in chosen):
        res["kinds"].update(await run_protocol(
            work / protocol, [k for k in chosen if k.protocol == protocol], streams, t))
    if peer:
        await _peer(work, streams, t, res)
    return res


async def _peer(work: Path, streams: int, t: dict[str, float], res: dict[str, Any]) -> None:
    """Socket.IO beside the streams (``res["socketio"]``: its figures, or why it failed)."""
    import streampeer

    print(f"== Socket.IO: {streams} clients, kill -9", flush=True)
    try:
        res["socketio"] = await streampeer.run_peer(
            work / "socketio", streams, INTERVAL, t["warmup"], t["steady"], t["after"],
            t["resume_timeout"])
    except (LocalError, OSError) as exc:
        traceback.print_exc()
        res["socketio"] = {"failed": str(exc)[:2000]}


# -- verdicts and report -------------------------------------------------------------------


def verdicts(res: dict[str, Any]) -> list[Verdict]:
    out: list[Verdict] = []
    n = res["streams"]
    want_rate = round(n / res["interval_s"] * 0.98, 1)
    sio = res.get("socketio") or {}
    for name, r in res["kinds"].items():
        label = KINDS[name].label if name in KINDS else name
        kill, drain, plain = r["kill"], r["drain"], r["plain"]
        msgs = f"{n} streams, {kill['messages_sent']} messages sent, " \
               f"{kill.get('unanswered', 0)} unanswered when the run stopped"
        for what in ("errors", "lost", "duplicated", "reordered"):
            out.append(Verdict(f"{label} kill -9: {what}", kill[what], 0, "msgs"
                               if what != "errors" else "errors", reference=msgs))
        out.append(Verdict(
            f"{label} drain: errors + lost + duplicated + reordered",
            drain["errors"] + drain["lost"] + drain["duplicated"] + drain["reordered"], 0,
            "", reference=f"{drain['errors']} / {drain['lost']} / {drain['duplicated']} / "
                          f"{drain['reordered']} of {drain['messages_sent']} messages"))
        http = kill.get("http", {}).get("rto_ms", {})
        what_rto = "unary gRPC" if kill.get("http", {}).get("kind") == "grpc" else "HTTP"
        resume = kill.get("resume_ms", {})
        rto = http.get("p99")
        out.append(Verdict(
            f"{label} kill -9: resume p99 (kill -> first message)",
            resume.get("p99") if rto else None, round(2 * rto, 1) if rto else 0.0, "ms",
            reference=f"2 x {what_rto} RTO p99 {rto} ms of the same kill; resume p50 "
                      f"{resume.get('p50')} ms, {kill.get('unresumed')} not resumed; "
                      f"drain (member down -> first message, {res['drain_window_s']:g} s "
                      f"window) p99 {drain.get('resume_ms', {}).get('p99')} ms"))
        put = kill["etcd_put_ms"].get("p50")
        base = plain["latency_ms"].get("p50")
        out.append(Verdict(
            f"{label}: steady per-message latency p50",
            kill["latency_ms"].get("p50") if base is not None and put is not None else None,
            round(base + put, 2) if base is not None and put is not None else 0.0,
            "ms", reference=f"plain {base} ms + one etcd put {put} ms (same run); p99 "
                            f"{kill['latency_ms'].get('p99')} vs plain "
                            f"{plain['latency_ms'].get('p99')} ms"))
        rate = min(kill["sent_per_s"], kill["answers_per_s"])
        out.append(Verdict(
            f"{label}: messages a second each way, sustained", rate, want_rate, "msg/s",
            at_most=False, reference=f"{n} streams x {1 / res['interval_s']:g}/s; plain "
                                     f"{min(plain['sent_per_s'], plain['answers_per_s'])}; "
                                     f"CPU per message {_cpu(kill)} us, plain {_cpu(plain)}"))
        if "lost" in sio:
            theirs = sio["lost"] + sio["duplicated"]
            out.append(Verdict(
                f"{label} kill -9: lost + duplicated, fewer than Socket.IO's",
                kill["lost"] + kill["duplicated"], theirs - 1, "msgs",
                reference=f"Socket.IO {sio['lost']} lost, {sio['duplicated']} duplicated "
                          f"of {sio['messages_sent']}; resume p99 "
                          f"{sio.get('resume_ms', {}).get('p99')} ms, "
                          f"{sio.get('recovered', 0)} of {sio.get('reconnections', 0)} "
                          "sessions recovered"))
    return out


def _cpu(phase: dict[str, Any]) -> Any:
    return (phase.get("cpu_us_per_message") or {}).get("total")


def _row(label: str, r: dict[str, Any]) -> str:
    lat = r.get("latency_ms", {})
    resume = r.get("resume_ms", {})
    return (f"  {label:<28} {r['streams']:>6} {r['messages_sent']:>8} {r['errors']:>5} "
            f"{r['lost']:>5} {r['duplicated']:>5} {r['reordered']:>5} "
            f"{lat.get('p50', '-'):>8} {lat.get('p99', '-'):>8} "
            f"{r['answers_per_s']:>8} {resume.get('p50', '-'):>8} {resume.get('p99', '-'):>8}")


def print_report(res: dict[str, Any], found: list[Verdict]) -> None:
    print(f"\n== streams: {res['streams']} per kind, one message each way every "
          f"{res['interval_s']:g} s, kill -9 and member down of the member serving them")
    print(f"  {'':<28} {'streams':>6} {'sent':>8} {'err':>5} {'lost':>5} {'dup':>5} "
          f"{'reord':>5} {'lat p50':>8} {'p99':>8} {'ans/s':>8} {'res p50':>8} {'p99':>8}")
    for name, r in res["kinds"].items():
        label = KINDS[name].label if name in KINDS else name
        for phase in ("plain", "kill", "drain"):
            print(_row(f"{label} {phase}", r[phase]))
        k = r["kill"]
        print(f"    kill: {k.get('http', {}).get('kind')} RTO {k.get('http', {}).get('rto_ms')}; "
              f"etcd put "
              f"{k['etcd_put_ms']}; sidecar a {k['sidecar_a']}; cores {k['cores_used']}; "
              f"load {k['load_at_start']} -> {k['load_at_end']}; served by "
              f"{k['served_by_before']}; errors {k['error_kinds']}; the bench's loop late "
              f"{k.get('bench_loop_lag_ms')}")
    sio = res.get("socketio")
    if sio and "lost" in sio:
        print(_row("Socket.IO kill", sio))
        print(f"    Socket.IO: {sio.get('recovered')} of {sio.get('reconnections')} "
              f"reconnections recovered; answered twice {sio['answered_twice']}, applied "
              f"twice {sio['applied_twice']}; load {sio['load_at_steady']}")
    elif sio:
        print(f"  Socket.IO: {sio.get('failed', '')[:300]}")
    print_verdicts("streams", found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="20 streams per kind, 1.5 s steady (the suite's smoke run)")
    parser.add_argument("--streams", type=int, help="streams per kind (default 1000)")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"comma-separated among {', '.join(KINDS)} (default all)")
    parser.add_argument("--steady", type=float, help="seconds of steady load (default 10)")
    parser.add_argument("--no-peer", action="store_true", help="skip Socket.IO")
    parser.add_argument("--output", type=Path, help="also write the results here")
    parser.add_argument("--no-write", action="store_true",
                        help="do not write bench/results/streams.json (with --output)")
    args = parser.parse_args()
    quick = quick_requested(args.quick)
    streams = args.streams or (QUICK_STREAMS if quick else 1000)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if streams < 1 or not kinds or set(kinds) - set(KINDS) \
            or (args.steady is not None and args.steady <= 0):
        parser.error(f"streams >= 1, steady > 0, kinds among {', '.join(KINDS)}")
    t = {"warmup": 1.0 if quick else 3.0,
         "steady": args.steady or (QUICK_STEADY if quick else 10.0),
         "after": 1.0 if quick else 3.0, "resume_timeout": 30.0}
    return run_benchmark(NAME, quick, "meshxl-bench-streams-",
                         lambda work: run(work, kinds, streams, t, not args.no_peer),
                         verdicts, print_report, write=not args.no_write, output=args.output)


if __name__ == "__main__":
    sys.exit(main())
