"""Failover through real Envoy: kill -9 of the active member under steady session load.

Run: ``.venv/bin/python bench/failover.py [--quick] [--repeats N] [--sessions N] [--traces]``

One local deployment (``meshxl.local.deployment.DemoDeployment``, high-availability:
etcd, one ``meshxl serve xds``, members a (active), b (standby), c (backup site), each
the sample counter app plus its statesync sidecar, and a real Envoy), all on loopback.
``--sessions`` sticky sessions send one POST at a time each through Envoy (every POST
reads the session's counter from the member's sidecar and writes it back + 1, so
every acknowledged POST is an acknowledged write). Then, ``--repeats`` times: steady
load, ``kill -9`` of member a (app and sidecar), wait until the control plane has
pushed the loss and Envoy ACKed it, restart a, wait until traffic is back on it.

Measured, per kill and over all kills:

* failed requests (any non-2xx or no answer, over the whole run, failback included);
* lost acknowledged writes: a session's counter going back below a value already
  acknowledged, plus the final read-back of every session short of its last
  acknowledged value;
* data-plane RTO per session that a was serving: from the moment the session next
  needed the service (the kill, or its next request's send time if later) to the end
  of its first success; beside it the demo's definition (kill -> first success's
  end), which also counts the session's idle time between requests;
* control-plane convergence, once the loss is known: the control plane's own
  ``meshxl_xds_convergence_seconds`` observation for the loss (change seen in its etcd
  watch -> Envoy's EDS ACK; the histogram's sum over exactly one observation is the
  exact value) and, as a cross-check, this process's own etcd watch seeing the
  registration disappear -> the EDS ACK time in ``/v1/nodes``; and with the lease TTL
  in the count: kill -> EDS ACK.

The reference beside the RTO is the steady-state request latency of the same run.
``--traces`` also runs every process with its trace file (the demo's way) and adds
the failover trace's detection, convergence and takeover times; it costs CPU on
every request, so it is off by default.

Then the same kill -9 for each other protocol (``--protocols``; gRPC unary calls and
server streams, WebSocket, TCP): one row each, ``bench/failover_protocols.py``.

Writes ``bench/results/failover.json``. Loopback only; request loops bounded in count
and time; every process is killed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
from benchlib import (
    Verdict,
    convergence_histogram,
    print_verdicts,
    quick_requested,
    run_benchmark,
    stop_load,
    summary_ms,
)

from meshxl import etcd
from meshxl.local.deployment import CLUSTER, DemoDeployment
from meshxl.local.report import lost_writes, recovery_times_ms
from meshxl.local.traffic import Record, Traffic, read_back
from meshxl.local.wait import LocalError, wait_until
from meshxl.telemetry import names, slo
from meshxl.telemetry.otlpjson import merge_traces, read_spans
from meshxl.xds.types import ENDPOINT

NAME = "failover"
NODE = "meshxl-demo"  # the deployment's Envoy node id
KILLED = "a"
TARGET_FAILED = 0
TARGET_LOST = 0
TARGET_RTO_P99_MS = 100.0
TARGET_CONVERGENCE_P99_MS = 100.0
LEASE_TTL = 2.0
STEADY = 2.0
"""Seconds of steady load on member a before each kill."""
SETTLE = 1.0
"""Seconds of load after the EDS ACK before a is restarted (late retries, takeovers)."""
PHASE_TIMEOUT = 20.0
SETUP_TIMEOUT = 60.0


# -- pure computations over the request records -------------------------------------------


def disruption_ms(records: Sequence[Record], kill: float, killed: str) -> tuple[list[float],
                                                                                  list[str]]:
    """Data-plane RTO per session ``killed`` was serving at ``kill`` (Unix seconds).

    From the moment the session next needed the service (the kill for a request in
    flight, else its next request's send time) to the end of its first success.
    Returns the times and the sessions that never succeeded again.
    """
    by_session: dict[str, list[Record]] = {}
    for r in records:
        if r.method == "POST":
            by_session.setdefault(r.session, []).append(r)
    out, unrecovered = [], []
    for session, recs in sorted(by_session.items()):
        recs.sort(key=lambda r: r.sent)
        before = [r for r in recs if r.ok and r.ended <= kill]
        if not before or before[-1].member != killed:
            continue
        after = [r for r in recs if r.ended > kill]
        if not after:
            continue
        first_ok = next((r for r in after if r.ok), None)
        if first_ok is None:
            unrecovered.append(session)
            continue
        out.append((first_ok.ended - max(kill, after[0].sent)) * 1000)
    return out, unrecovered


def regressions(records: Sequence[Record]) -> dict[str, int]:
    """Acknowledged writes undone while the run went on, per session.

    A session sends one request at a time, so each success must carry a ``seq`` above
    the previous success's; when it does not, the writes from its ``seq`` up to the
    previous one were lost (counted once; the session is then followed from its new
    value).
    """
    by_session: dict[str, list[Record]] = {}
    for r in records:
        if r.method == "POST" and r.ok and r.seq is not None:
            by_session.setdefault(r.session, []).append(r)
    lost: dict[str, int] = {}
    for session, recs in by_session.items():
        recs.sort(key=lambda r: r.sent)
        previous: int | None = None
        for r in recs:
            assert r.seq is not None
            if previous is not None and r.seq <= previous:
                lost[session] = lost.get(session, 0) + previous - r.seq + 1
            previous = r.seq
    return lost


def latency_ms(records: Sequence[Record], since: float, until: float) -> list[float]:
    return [(r.ended - r.sent) * 1000 for r in records
            if r.method == "POST" and r.ok and since <= r.sent and r.ended < until]


# -- observing the control plane ---------------------------------------------------------


async def _get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as resp:
        return await resp.json(content_type=None)


async def _eds_status(http: aiohttp.ClientSession, admin: str) -> dict[str, Any]:
    nodes = await _get_json(http, f"{admin}/v1/nodes")
    return dict(nodes.get(NODE, {}).get("types", {}).get(ENDPOINT) or {})



class RegistrationWatch:
    """This process's own watch on the cluster's registrations: when each disappeared."""

    def __init__(self, client: Any, prefix: str) -> None:
        self._client = client
        self._prefix = prefix.encode()
        self.deleted: dict[str, list[float]] = {}
        self._task: asyncio.Task[None] | None = None
        self._watch: Any = None

    async def start(self) -> None:
        self._watch = await self._client.watch_prefix(self._prefix)
        self._task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        assert self._watch is not None
        async for event in self._watch:
            if event.kind == "DELETE":
                member = event.kv.key[len(self._prefix):].decode().strip("/")
                self.deleted.setdefault(member, []).append(time.time())

    async def wait_deleted(self, member: str, after: float, timeout: float) -> float:
        def deleted() -> float | None:
            found = [t for t in self.deleted.get(member, []) if t >= after]
            return found[0] if found else None

        found: float = await wait_until(deleted, timeout=timeout, interval=0.005,
                                        what=f"the registration of {member} to be deleted")
        return found

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._watch is not None:
            with contextlib.suppress(Exception):
                await self._watch.cancel()


def _served_by(traffic: Traffic, member: str, since: float) -> float:
    """Share of successful POSTs since ``since`` served by ``member``."""
    recent = [r for r in traffic.records[-4 * len(traffic.sessions):]
              if r.ok and r.sent >= since]
    return sum(r.member == member for r in recent) / len(recent) if recent else 0.0


# -- the run ----------------------------------------------------------------------------


async def run(work: Path, repeats: int, sessions: int, interval: float,
              traces: bool) -> dict[str, Any]:
    trace_dir = work / "traces" if traces else None
    d = DemoDeployment(work / "deployment", mode="high-availability", trace_dir=trace_dir,
                       lease_ttl=LEASE_TTL)
    client: Any = None
    watch: RegistrationWatch | None = None
    load: asyncio.Task[None] | None = None
    traffic: Traffic | None = None
    kills: list[dict[str, Any]] = []
    step = "starting the deployment"
    try:
        async with asyncio.timeout(SETUP_TIMEOUT):
            await d.start()
        admin = d.replicas[0].admin_url
        client = etcd.client(d.etcd_url)
        await client.connect()
        watch = RegistrationWatch(client, d.keys.members_prefix(CLUSTER))
        await watch.start()
        started = time.time()
        budget = 60.0 + repeats * (STEADY + SETTLE + 3 * PHASE_TIMEOUT)
        traffic = Traffic(f"{d.url}/counter", sessions, started + budget,
                          max_requests=int(sessions * budget / interval) + 1000,
                          interval=interval)
        load = asyncio.create_task(traffic.run())
        window_start = started
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as http:
            for rep in range(repeats):
                step = f"kill {rep + 1}: waiting for traffic on member {KILLED}"
                since = time.time()
                await wait_until(lambda since=since: _at_least(
                    _served_by(traffic, KILLED, since), 0.95), what="traffic on a",
                    timeout=PHASE_TIMEOUT, interval=0.1)
                await asyncio.sleep(STEADY)
                before = await _eds_status(http, admin)
                hist_before = await convergence_histogram(http, admin)
                step = f"kill {rep + 1}: waiting for the loss to be pushed and ACKed"
                kill = await d.kill_member(KILLED)
                loss_known = await watch.wait_deleted(KILLED, kill, LEASE_TTL + PHASE_TIMEOUT)
                status: dict[str, Any] = {}

                async def acked(before: dict[str, Any] = before) -> bool:
                    nonlocal status
                    status = await _eds_status(http, admin)
                    return (status.get("acked_version") not in (None, before.get(
                        "acked_version")) and status.get("acked_version")
                        == status.get("sent_version"))

                await wait_until(acked, what="Envoy's EDS ACK of the loss",
                                 timeout=PHASE_TIMEOUT, interval=0.01)
                await asyncio.sleep(SETTLE)
                hist_after = await convergence_histogram(http, admin)
                window_end = time.time()
                step = f"kill {rep + 1}: restarting member {KILLED}"
                await d.reap_member(KILLED)
                await d.start_member(d.member(KILLED))
                await wait_until(d.all_healthy, what="Envoy to see a healthy again",
                                 timeout=PHASE_TIMEOUT)
                observed = hist_after[0] - hist_before[0]
                kills.append({
                    "kill_unix": kill, "window": [window_start, window_end],
                    "loss_known_unix": loss_known, "eds_ack_unix": status["ack_time"],
                    "control_plane_observations": observed,
                    "control_plane_convergence_ms": round(
                        (hist_after[1] - hist_before[1]) * 1000, 2) if observed == 1 else None,
                })
                window_start = time.time()
            step = "final steady load"
            since = time.time()
            await wait_until(lambda: _at_least(_served_by(traffic, KILLED, since), 0.95),
                             what="traffic back on a", timeout=PHASE_TIMEOUT, interval=0.1)
        traffic.until = time.time()
        async with asyncio.timeout(15.0):
            await load
        ended = time.time()
        step = "reading every session back"
        final, readback = await read_back(f"{d.url}/counter", traffic.sessions)
        spans: list[Any] = []
        if trace_dir is not None:
            step = "collecting traces"
            await d.stop_replicas()
            await d.stop_envoy()
            await d.stop_members()
            await d.stop_receiver()
            merge_traces(trace_dir, work / "traces.jsonl")
            spans = read_spans([str(work / "traces.jsonl")])
    except (LocalError, TimeoutError, OSError, KeyError) as exc:
        traceback.print_exc()
        logs = d.owner.report()
        raise SystemExit(f"failed {step}: {exc!r}\n{logs}") from None
    finally:
        await stop_load(load, traffic)
        if watch is not None:
            await watch.close()
        if client is not None:
            await client.close()
        await d.close()
    assert traffic is not None
    return analyse(traffic.records, readback, final, kills, spans, sessions=sessions,
                   interval=interval, started=started, ended=ended)


def _at_least(value: float, threshold: float) -> bool:
    return value >= threshold


def analyse(records: list[Record], readback: list[Record], final: dict[str, int | None],
            kills: list[dict[str, Any]], spans: list[Any], *, sessions: int, interval: float,
            started: float, ended: float) -> dict[str, Any]:
    posts = [r for r in records if r.method == "POST"]
    failed = [r for r in posts if not r.ok]
    lost_final = lost_writes(posts, final)
    lost_regress = regressions(posts)
    per_kill = []
    rto_all: list[float] = []
    rto_demo_all: list[float] = []
    conv_known: list[float] = []
    conv_watch: list[float] = []
    conv_ttl: list[float] = []
    steady: list[float] = []
    unrecovered = 0
    for k in kills:
        kill = k["kill_unix"]
        lo, hi = k["window"]
        window = [r for r in posts if lo <= r.sent < hi]
        rto, unrec = disruption_ms(window, kill, KILLED)
        demo_rto, demo_unrec = recovery_times_ms(window, kill, KILLED)
        steady += latency_ms(window, lo, kill - 0.05)
        cp = k["control_plane_convergence_ms"]
        watch_ms = (k["eds_ack_unix"] - k["loss_known_unix"]) * 1000
        ttl_ms = (k["eds_ack_unix"] - kill) * 1000
        rto_all += rto
        rto_demo_all += demo_rto
        unrecovered += len(unrec)
        if cp is not None:
            conv_known.append(cp)
        conv_watch.append(watch_ms)
        conv_ttl.append(ttl_ms)
        per_kill.append({
            "kill_at_s": round(kill - started, 3),
            "sessions_on_killed_member": len(rto) + len(unrec),
            "failed_requests": sum(1 for r in window if not r.ok),
            "rto_ms": summary_ms(rto), "rto_demo_definition_ms": summary_ms(demo_rto),
            "unrecovered_sessions": unrec + [s for s in demo_unrec if s not in unrec],
            "detection_ms": round((k["loss_known_unix"] - kill) * 1000, 1),
            "convergence_known_ms": cp, "convergence_watch_ms": round(watch_ms, 2),
            "convergence_with_ttl_ms": round(ttl_ms, 1),
            "control_plane_observations": k["control_plane_observations"],
        })
    trace_part = _from_traces(spans, kills) if spans else None
    return {
        "sessions": sessions, "request_interval_s": interval, "repeats": len(kills),
        "lease_ttl_s": LEASE_TTL, "duration_s": round(ended - started, 1),
        "requests": len(posts), "requests_per_s": round(len(posts) / max(ended - started, 1e-9)),
        "failed_requests": len(failed),
        "failures": _kinds(failed),
        "acknowledged_writes": sum(1 for r in posts if r.ok),
        "lost_writes": sum(lost_final.values()) + sum(lost_regress.values()),
        "lost_writes_final_readback": lost_final, "lost_writes_regressions": lost_regress,
        "sessions_read_back": sum(1 for v in final.values() if v is not None),
        "readback_failed": sum(1 for r in readback if not r.ok),
        "unrecovered_sessions": unrecovered,
        "rto_ms": summary_ms(rto_all), "rto_demo_definition_ms": summary_ms(rto_demo_all),
        "steady_latency_ms": summary_ms(steady),
        "convergence_known_ms": summary_ms(conv_known),
        "convergence_known_watch_ms": summary_ms(conv_watch),
        "convergence_with_ttl_ms": summary_ms(conv_ttl),
        "kills": per_kill,
        "traces": trace_part,
    }


def _kinds(failed: Sequence[Record]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in failed:
        detail = " ".join(r.error.split())[:80]
        key = f"HTTP {r.status}: {detail}" if r.status else (r.error or "no answer")
        out[key] = out.get(key, 0) + 1
    return out


def _from_traces(spans: list[Any], kills: list[dict[str, Any]]) -> dict[str, Any]:
    """Per kill, the failover trace of a: detection, convergence, takeovers (the demo's
    and ``meshxl slo review``'s definitions)."""
    failovers = [f for f in slo.find_failovers(spans)
                 if f.root.attributes.get(names.MEMBER) == KILLED and not f.root.parent_span_id]
    out: list[dict[str, Any]] = []
    for k in kills:
        kill_ns = int(k["kill_unix"] * 1e9)
        mine = [f for f in failovers if kill_ns <= f.root.start_ns <= kill_ns + 30 * 10**9]
        if not mine:
            out.append({"found": False})
            continue
        f = mine[0]
        (conv,) = slo.convergence_ms(spans, [f])
        take = slo.takeover_ms(spans, [f])
        out.append({"found": True, "detection_ms": round((f.root.start_ns - kill_ns) / 1e6, 1),
                    "convergence_ms": round(conv, 2), "takeover_ms": summary_ms(take)})
    conv = [x["convergence_ms"] for x in out if x.get("found")]
    return {"per_kill": out, "convergence_ms": summary_ms(conv)}


# -- report ---------------------------------------------------------------------------


def verdicts(res: dict[str, Any]) -> list[Verdict]:
    rto, demo, steady = res["rto_ms"], res["rto_demo_definition_ms"], res["steady_latency_ms"]
    known, watch, ttl = (res["convergence_known_ms"], res["convergence_known_watch_ms"],
                         res["convergence_with_ttl_ms"])
    return [
        Verdict("failover: failed requests", res["failed_requests"], TARGET_FAILED, "req",
                reference=f"{res['requests']} requests, {res['repeats']} kills"),
        Verdict("failover: lost acknowledged writes", res["lost_writes"], TARGET_LOST,
                "writes", reference=f"{res['acknowledged_writes']} acknowledged"),
        Verdict("failover: data-plane RTO p99", rto.get("p99"), TARGET_RTO_P99_MS, "ms",
                reference=f"steady request latency p99 {steady.get('p99')} ms; kill -> "
                f"first success p99 {demo.get('p99')} ms at {res['request_interval_s']:g} s "
                "between a session's requests"),
        Verdict("failover: convergence p99 once the loss is known",
                known.get("p99") if known.get("n") else watch.get("p99"),
                TARGET_CONVERGENCE_P99_MS, "ms",
                reference=f"own etcd watch -> ACK p99 {watch.get('p99')} ms; with the "
                f"{res['lease_ttl_s']:g} s lease TTL p99 {ttl.get('p99')} ms"),
    ]


def print_report(res: dict[str, Any], verdict_list: list[Verdict]) -> None:
    print(f"\n== failover through real Envoy: {res['sessions']} sessions, one POST per "
          f"{res['request_interval_s']:g} s each ({res['requests_per_s']} req/s), "
          f"kill -9 of member {KILLED} x {res['repeats']}, lease TTL {res['lease_ttl_s']:g} s")
    print(f"  {'kill':<5} {'at s':>6} {'sess':>5} {'failed':>6} {'RTO p50':>8} {'p99':>7} "
          f"{'demo p99':>9} {'detect':>7} {'conv':>6} {'watch':>6} {'w/ TTL':>7}")
    for i, k in enumerate(res["kills"]):
        print(f"  {i + 1:<5} {k['kill_at_s']:>6.1f} {k['sessions_on_killed_member']:>5} "
              f"{k['failed_requests']:>6} {k['rto_ms'].get('p50', 0):>8.1f} "
              f"{k['rto_ms'].get('p99', 0):>7.1f} "
              f"{k['rto_demo_definition_ms'].get('p99', 0):>9.1f} {k['detection_ms']:>7.0f} "
              f"{k['convergence_known_ms'] if k['convergence_known_ms'] is not None else '-':>6}"
              f" {k['convergence_watch_ms']:>6.1f} {k['convergence_with_ttl_ms']:>7.0f}")
    rows = (("data-plane RTO (next need -> first success)", res["rto_ms"]),
            ("  demo definition (kill -> first success)", res["rto_demo_definition_ms"]),
            ("  reference: steady request latency", res["steady_latency_ms"]),
            ("convergence, loss known (control plane metric)", res["convergence_known_ms"]),
            ("  cross-check: own etcd watch -> EDS ACK", res["convergence_known_watch_ms"]),
            ("convergence with the lease TTL (kill -> ACK)", res["convergence_with_ttl_ms"]))
    print(f"  {'':<48} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for label, s in rows:
        if s.get("n"):
            print(f"  {label:<48} {s['n']:>5} {s['p50']:>8.1f} {s['p99']:>8.1f} "
                  f"{s['max']:>8.1f}")
    print(f"  requests {res['requests']}, failed {res['failed_requests']} {res['failures']}, "
          f"acknowledged writes {res['acknowledged_writes']}, lost {res['lost_writes']}, "
          f"sessions read back {res['sessions_read_back']}/{res['sessions']}")
    if res.get("traces"):
        t = res["traces"]
        print(f"  from the failover traces: convergence {t['convergence_ms']}")
        for i, k in enumerate(t["per_kill"]):
            print(f"    kill {i + 1}: {k}")
    print_verdicts("failover", verdict_list)


async def run_all(work: Path, repeats: int, sessions: int, interval: float, traces: bool,
                  kinds: Sequence[str], kind_repeats: int, kind_sessions: int,
                  ) -> dict[str, Any]:
    """HTTP/1.1 (:func:`run`), then one row per other protocol
    (``bench/failover_protocols.py``)."""
    import failover_protocols

    res = await run(work / "http", repeats, sessions, interval, traces) if "http" in kinds \
        else {}
    res["protocols"] = {}
    for kind in kinds:
        if kind == "http":
            continue
        try:
            res["protocols"][kind] = await failover_protocols.run_kind(
                work / kind, kind, kind_repeats, kind_sessions, 0.1, disruption_ms,
                regressions)
        except (LocalError, TimeoutError, OSError) as exc:
            traceback.print_exc()
            raise SystemExit(f"failed the {kind} run: {exc!r}") from None
    return res


def all_verdicts(res: dict[str, Any]) -> list[Verdict]:
    import failover_protocols

    out = verdicts(res) if "rto_ms" in res else []
    return out + failover_protocols.verdicts(res.get("protocols", {}))


def print_all(res: dict[str, Any], verdict_list: list[Verdict]) -> None:
    import failover_protocols

    if "rto_ms" in res:
        print_report(res, [v for v in verdict_list if v.name.startswith("failover:")])
    if res.get("protocols"):
        failover_protocols.print_rows(res["protocols"])
        print_verdicts("failover, per protocol",
                       [v for v in verdict_list if not v.name.startswith("failover:")])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 kills, 50 sessions")
    parser.add_argument("--repeats", type=int, help="kills (default 5; quick 2)")
    parser.add_argument("--sessions", type=int, help="sessions (default 200; quick 50)")
    parser.add_argument("--interval", type=float, default=0.5,
                        help="seconds between one session's requests (default 0.5)")
    parser.add_argument("--traces", action="store_true",
                        help="trace every process too (adds trace-based figures; costs CPU)")
    parser.add_argument("--protocols", default="http,grpc,grpc-stream,websocket,tcp",
                        help="which rows to run, comma-separated (default: all of http, "
                             "grpc, grpc-stream, websocket, tcp)")
    args = parser.parse_args()
    quick = quick_requested(args.quick)
    repeats = args.repeats or (2 if quick else 5)
    sessions = args.sessions or (50 if quick else 200)
    kinds = [k.strip() for k in args.protocols.split(",") if k.strip()]
    unknown = set(kinds) - {"http", "grpc", "grpc-stream", "websocket", "tcp"}
    if repeats < 1 or sessions < 1 or args.interval <= 0 or unknown or not kinds:
        parser.error("repeats and sessions must be >= 1, interval > 0, protocols among "
                     "http, grpc, grpc-stream, websocket, tcp")
    # The other protocols: fewer kills and sessions (each is its own deployment).
    kind_repeats, kind_sessions = (1, 20) if quick else (3, 50)
    return run_benchmark(
        NAME, quick, "meshxl-bench-failover-",
        lambda work: run_all(work, repeats, sessions, args.interval, args.traces, kinds,
                             kind_repeats, kind_sessions),
        all_verdicts, print_all)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["disruption_ms", "regressions"]
