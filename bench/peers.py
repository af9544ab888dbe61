"""meshxl beside its peers: the same kill -9 failover through HAProxy, a static Envoy
and meshxl, per protocol; session writes through statesync beside Redis.

Run: ``.venv/bin/python bench/peers.py [--quick] [--runs N] [--sessions N]
[--kinds http,grpc,websocket,tcp] [--no-wan]`` (``BENCH_QUICK=1``: quick).
HAProxy and Redis are Debian's ``haproxy`` and ``redis-server``.

**Failover** (``bench/peerproxies.py``). Per protocol (HTTP/1.1 requests, unary gRPC,
WebSocket, TCP) one local meshxl deployment (high availability: a active, b standby, c
backup; the sample counter app and its statesync sidecar each) with, in front of the
same members, its own Envoy (meshxl's control plane), HAProxy and a static Envoy
configured by hand. meshxl runs with its features on, as they default: stickiness, pins
(HTTP: carried in a header), the access logs the sick-member judge reads, tracing (the
clients start no trace; Envoy records the default share of those it starts). Sessions
are first
written straight to each member in turn (the standby's takeover path warm before the
first kill, which went through whichever proxy came first). ``--runs`` times, the
proxies in rotating order (over six runs, the default, each proxy goes first, second
and last twice; alternating, HAProxy was always second): ``--sessions`` sticky
sessions (connections for WebSocket and TCP) through one proxy, :data:`STEADY` seconds
of steady load (the steady path's latency, after :data:`WARM_UP`), kill -9 of the
active member a, every session served again by the standby, a restarted until every
proxy sends a fresh session to it. A first round through every proxy is not measured:
Envoy keeps the connections it opened to the standby in a failover, so the proxy that
failed over first in the first run was the only one to fail over without them.
Per proxy: failed requests, acknowledged writes lost, the sessions on a at the kill
(when some are not: who served them since when, and the Envoy's hosts), and the time
from the kill to each session's next answer (HTTP and gRPC: the RTO, from when the
session next needed the service; WebSocket and TCP: to the first answer on the new
connection, and connections the proxy closed on a client while the standby was up). A
member that does not come back, or sessions that are not served again, are reported with
the run; the runs go on.

**Session writes** (``bench/peerstores.py``). ``--writers`` writers overwrite their
sessions' ~1 KiB values through a statesync sidecar (etcd) and through Redis 7 (a
primary and a replica), asynchronously and with ``WAIT 1``; then the primary's site is
lost over the dual-site bed's WAN link (as root: network namespaces), where Redis's
asynchronous replication loses acknowledged writes and meshxl must lose none.

Figures are ratios to the peer measured beside them in the same run. Writes
``bench/results/peers.json`` (``--output FILE``: there instead).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from pathlib import Path
from typing import Any

import peersteady
from benchlib import Verdict, print_verdicts, quick_requested, run_benchmark, summary_ms
from failover import disruption_ms, regressions
from peerproxies import (
    KINDS,
    PROXIES,
    Sessions,
    haproxy_config,
    static_envoy_config,
    warm_members,
)

from meshxl.local.deployment import DemoDeployment
from meshxl.local.envoy import EnvoyProcess
from meshxl.local.ports import free_ports
from meshxl.local.report import lost_writes
from meshxl.local.servers import HOST
from meshxl.local.streams import StreamTraffic, read_back_kind
from meshxl.local.traffic import Record, Traffic, read_back
from meshxl.local.wait import LocalError, wait_port, wait_until

NAME = "peers"
PROTOCOL_OF = {"http": "http", "grpc": "grpc", "websocket": "websocket", "tcp": "tcp"}
KILLED = "a"
STEADY = 3.0
"""Seconds of steady load before each kill."""
WARM_UP = 0.5
"""The first of them, while the sessions open their connections, is not the steady path."""
PHASE_TIMEOUT = 20.0
RUNS = 6
"""Kills per proxy and protocol by default: a run's p99 of 100 sessions swings by 30-90 ms
on either side (2026-11-29), so three runs could not tell a ratio of 1.0; six in
rotating order put each proxy in each place twice."""
PIN_HEADER = peersteady.PIN_HEADER
"""HTTP sessions are pinned (``stickiness.pin``), the pin carried in this header."""
LABEL = {"http": "HTTP/1.1", "grpc": "gRPC unary", "websocket": "WebSocket", "tcp": "TCP"}


def _timing_key(kind: str) -> str:
    return "rto_ms" if kind in ("http", "grpc") else "reconnect_ms"


async def _read(kind: str, target: str, sessions: list[str],
                ) -> tuple[dict[str, int | None], list[Record]]:
    """Each session read once over the kind's own path: HTTP reads with a ``GET`` of the
    requests' route (a WebSocket would take meshxl's upgrades twin, another cluster)."""
    if kind == "http":
        return await read_back(f"http://{target}/counter", sessions)
    return await read_back_kind(kind, target, sessions)


EJECTS_ON_WEBSOCKET_END = frozenset({"envoy-static"})
"""Proxies that eject a member when a WebSocket it served ends: the static Envoy, one
local-origin failure ejecting, counts every WebSocket's end as one (envoyproxy/envoy#24690;
meshxl's upgrades twin counts them without ejecting, HAProxy observes layer 4 errors)."""


def probe_kind(kind: str, proxy: str) -> str:
    """The protocol that probes ``proxy`` for ``kind``'s sessions (see :func:`_probe`)."""
    return "http" if kind == "websocket" and proxy in EJECTS_ON_WEBSOCKET_END else kind


async def _probe(kind: str, target: str, proxy: str) -> str | None:
    """The member a fresh session is served by through ``target``. A WebSocket probe of a
    proxy in :data:`EJECTS_ON_WEBSOCKET_END` would eject the member it found when it
    closes, and put the sessions that follow on the standby (0 to 19 of 100 on the active
    at the kill, in 2026-11-29's runs): it is a plain request of the same route, cluster
    and session hash."""
    try:
        async with asyncio.timeout(10):
            _, records = await _read(probe_kind(kind, proxy), target, ["probe"])
    except Exception:  # noqa: BLE001 - not yet
        return None
    return records[0].member if records and records[0].ok else None


ENVOY_COUNTERS = ("upstream_cx_connect_attempts_exceeded", "upstream_cx_connect_fail",
                  "outlier_detection.ejections_enforced_total",
                  "outlier_detection.ejections_overflow", "upstream_rq_retry")


async def envoy_counters(admin: tuple[str, str] | None) -> dict[str, int]:
    """The cluster's counters that say how a failover went, from an Envoy's admin."""
    if admin is None:
        return {}
    from meshxl.proxy.admin import EnvoyAdmin
    from meshxl.xds.upgrades import upgrade_cluster

    url, cluster = admin
    # meshxl's WebSockets go through the cluster's upgrades twin: counted with it.
    names = (cluster, upgrade_cluster(cluster))
    async with EnvoyAdmin(url) as envoy:
        found = await envoy.stats(filter="^cluster\\.(" + "|".join(map(re.escape, names))
                                  + ")\\.")
    return {name: sum(int(found.get(f"cluster.{c}.{name}") or 0) for c in names)
            for name in ENVOY_COUNTERS}


async def envoy_hosts(admin: tuple[str, str] | None) -> dict[str, list[str]]:
    """The cluster's hosts as the proxy's Envoy sees them, ``"MEMBER pN"`` and the
    failure flags set (ejected, failed its health check), per Envoy cluster (meshxl's
    plain one and its upgrades twin)."""
    if admin is None:
        return {}
    from meshxl.proxy.admin import EnvoyAdmin
    from meshxl.xds.upgrades import model_cluster

    url, cluster = admin
    try:
        async with EnvoyAdmin(url, timeout=1.0) as envoy:
            clusters = await envoy.clusters()
    except Exception as exc:  # noqa: BLE001 - a diagnosis, not the measurement
        return {"error": [f"{type(exc).__name__}: {exc}"[:200]]}
    return {name: [" ".join([h.hostname or h.endpoint, f"p{h.priority}", *sorted(h.flags)])
                   for h in sorted(hosts, key=lambda h: h.priority)]
            for name, hosts in sorted(clusters.items()) if model_cluster(name) == cluster}


def _off_the_active(records: list[Record], kill: float) -> dict[str, Any]:
    """Who served the sessions the killed member did not serve at the kill, and since
    when (ms before the kill; their last streak on that member)."""
    last: dict[str, Record] = {}
    since: dict[str, float] = {}
    for r in sorted(records, key=lambda r: r.sent):
        if not r.ok or r.ended > kill:
            continue
        if r.session not in last or last[r.session].member != r.member:
            since[r.session] = r.sent
        last[r.session] = r
    off = {s: r.member for s, r in last.items() if r.member != KILLED}
    members: dict[str, int] = {}
    for member in off.values():
        members[str(member)] = members.get(str(member), 0) + 1
    return {"members": members,
            "since_ms_before_kill": summary_ms([(kill - since[s]) * 1000 for s in off])}


async def one_failover(d: DemoDeployment, kind: str, target: str, sessions: int,
                       interval: float, prefix: str,
                       admin: tuple[str, str] | None = None) -> dict[str, Any]:
    """Traffic through ``target``, kill -9 of a, until every session is served again;
    ``admin``: the proxy's Envoy admin URL and cluster, for its counters and hosts. The
    requests of the steady load before the kill (after :data:`WARM_UP`) are the steady
    path's latency."""
    counted = await envoy_counters(admin)
    until = time.time() + STEADY + PHASE_TIMEOUT + 30
    traffic: Any
    if kind == "http":
        traffic = Traffic(f"http://{target}/counter", sessions, until,
                          max_requests=sessions * 2000, interval=interval, prefix=prefix,
                          pin_header=PIN_HEADER, traced=False)
    elif kind == "grpc":
        traffic = StreamTraffic("grpc", target, sessions, until, max_requests=sessions * 2000,
                                interval=interval, prefix=prefix)
    else:
        traffic = Sessions(kind, target, sessions, interval, until, prefix)
    started = time.time()
    load = asyncio.create_task(traffic.run())
    out: dict[str, Any] = {}
    try:
        await asyncio.sleep(STEADY)
        # How many sessions the killed member serves at the kill: only those can break,
        # and a run whose sessions sit elsewhere measures nothing of a failover.
        last: dict[str, str | None] = {}
        for r in traffic.records:
            if r.ok:
                last[r.session] = r.member
        on_killed = sum(1 for m in last.values() if m == KILLED)
        hosts = await envoy_hosts(admin) if on_killed < sessions else {}
        kill = await d.kill_member(KILLED)

        def back() -> bool:
            again = {r.session for r in traffic.records
                     if r.ok and r.sent > kill and r.member != KILLED}
            return len(again) == sessions

        try:
            await wait_until(back, timeout=PHASE_TIMEOUT, interval=0.05,
                             what=f"every {kind} session served again after the kill")
        except LocalError as exc:
            out["timed_out"] = str(exc)[:300]  # counted as unrecovered below
        await asyncio.sleep(0.5)
    finally:
        traffic.until = 0.0
        async with asyncio.timeout(30):
            await load
    after = await envoy_counters(admin)
    final, readback = await _read(kind, target, traffic.sessions)
    records = traffic.records
    unreadable = sum(1 for r in readback if not r.ok)
    readable = {s: v for s, v in final.items() if v is not None}
    lost = sum(lost_writes([r for r in records if r.session in readable], readable).values())
    steady = [(r.ended - r.sent) * 1000 for r in records
              if r.ok and r.sent >= started + WARM_UP and r.ended <= kill]
    out.update({
        "requests": len(records), "failed": sum(1 for r in records if not r.ok),
        "lost_writes": lost + sum(regressions(records).values()),
        "unreadable_sessions": unreadable, "on_killed_member": on_killed,
        "steady_ms": summary_ms(steady), "steady_samples_ms": _sample(steady)})
    if on_killed < sessions:
        out["off_the_active"] = {**_off_the_active(records, kill), "hosts_at_kill": hosts}
    if admin is not None:
        out["envoy_counters"] = {k: after[k] - counted.get(k, 0) for k in after}
    if kind in ("http", "grpc"):
        times, unrecovered = disruption_ms(records, kill, KILLED)
        out.update(times_ms=[round(t, 2) for t in times], unrecovered=len(unrecovered))
    else:
        mine = [r for r in traffic.reconnects if r.broken >= kill - 0.05]
        out.update(times_ms=[round((r.answered - kill) * 1000, 2) for r in mine],
                   break_seen_ms=[round((r.broken - kill) * 1000, 2) for r in mine],
                   redialled=sum(1 for r in mine if r.dials > 1),
                   unrecovered=sessions - len({r.session for r in mine}))
    return out


def _sample(values: list[float], n: int = 1000) -> list[float]:
    """At most ``n`` of ``values``, evenly spaced in sorted order (pooling runs'
    percentiles needs the values, not their summaries; every run weighs alike)."""
    ordered = sorted(values)
    if len(ordered) <= n:
        return [round(v, 3) for v in ordered]
    return [round(ordered[i * (len(ordered) - 1) // (n - 1)], 3) for i in range(n)]


async def _restart(d: DemoDeployment, kind: str, targets: dict[str, str]) -> dict[str, Any]:
    """a started again, until every proxy sends a fresh session to it. What does not come
    back in time is returned (and reported with the next run), not raised: the runs go
    on, and those it spoils say so (their sessions on the active at the kill)."""
    problems: dict[str, Any] = {}
    try:
        await d.reap_member(KILLED)
        await d.start_member(d.member(KILLED))
        await d.wait_all_healthy(PHASE_TIMEOUT)
    except LocalError as exc:
        problems["member"] = str(exc)[:300]
    waited = time.monotonic()

    async def members() -> dict[str, str | None]:
        found = await asyncio.gather(*(_probe(kind, t, p) for p, t in targets.items()))
        return dict(zip(targets, found, strict=True))

    async def every_proxy_on_a() -> bool:
        return all(m == KILLED for m in (await members()).values())

    try:
        await wait_until(every_proxy_on_a, timeout=PHASE_TIMEOUT, interval=0.2,
                         what="every proxy back on member a")
    except LocalError:
        problems["not_back"] = {p: m for p, m in (await members()).items() if m != KILLED}
    problems["back_after_s"] = round(time.monotonic() - waited, 2)
    return problems


async def run_kind(work: Path, kind: str, runs: int, sessions: int,
                   interval: float) -> dict[str, Any]:
    d = DemoDeployment(work, protocol=PROTOCOL_OF[kind], mode="high-availability",
                       lease_ttl=2.0, failover="{failback_delay: 0s}",
                       pin_header=PIN_HEADER if kind == "http" else None)
    per_proxy: dict[str, list[dict[str, Any]]] = {p: [] for p in PROXIES}
    warm_up: list[dict[str, Any]] = []
    restarts: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(90):
            await d.start()
        members = [(m.name, m.app_port) for m in d.members]
        haproxy_port, envoy_port, envoy_admin = free_ports(3)
        cfg = work / "haproxy.cfg"
        cfg.write_text(haproxy_config(kind, (HOST, haproxy_port), members))
        haproxy = d.owner.spawn("haproxy", ["haproxy", "-db", "-f", str(cfg)])
        envoy = EnvoyProcess(static_envoy_config(kind, (HOST, envoy_port), envoy_admin, members),
                             work / "envoy-static", log_level="warning", hot_restart=False,
                             name="envoy-static")
        d.owner.own(envoy)
        await envoy.start()
        await envoy.wait_ready(30)
        await wait_port(HOST, haproxy_port, process=haproxy, timeout=15)
        targets = {"meshxl": d.target, "haproxy": f"{HOST}:{haproxy_port}",
                   "envoy-static": f"{HOST}:{envoy_port}"}
        admins = {"meshxl": (d.admin_url, "demo"),
                  "envoy-static": (f"http://{HOST}:{envoy_admin}", "members")}
        await wait_until(lambda: _all_on_a(kind, targets), timeout=PHASE_TIMEOUT,
                         interval=0.2, what="every proxy serving from member a")
        await warm_members(d, kind, sessions)
        for run in range(-1, runs):
            order = PROXIES[run % len(PROXIES):] + PROXIES[:run % len(PROXIES)]
            for proxy in order:
                result = await one_failover(d, kind, targets[proxy], sessions, interval,
                                            prefix=f"{proxy[0]}{run}-",
                                            admin=admins.get(proxy))
                result["order"] = order.index(proxy)
                if run >= 0:
                    per_proxy[proxy].append(result)
                else:
                    warm_up.append({"proxy": proxy, **result})
                print(f"  {kind:<9} {f'run {run + 1}' if run >= 0 else 'warm-up'} {proxy:<12} "
                      f"on {KILLED} at the kill {result['on_killed_member']}, "
                      f"p99 {summary_ms(result['times_ms']).get('p99')} ms, failed "
                      f"{result['failed']}, lost {result['lost_writes']}, steady p50/p99 "
                      f"{result['steady_ms'].get('p50')}/{result['steady_ms'].get('p99')} ms "
                      f"{result.get('envoy_counters', '')}", flush=True)
                if "off_the_active" in result:
                    print(f"    off the active at the kill: {result['off_the_active']}",
                          flush=True)
                restart = await _restart(d, kind, targets)
                restarts.append({"run": run, "after": proxy, **restart})
                if "member" in restart or "not_back" in restart:
                    print(f"    not back on {KILLED}: {restart}", flush=True)
    finally:
        await d.close()
    return {"kind": kind, "runs": runs, "sessions": sessions, "interval_s": interval,
            "restarts": restarts,
            "warm_up": [{k: v for k, v in r.items() if k not in ("steady_samples_ms",)}
                        for r in warm_up],
            "proxies": {p: _pooled(kind, rs) for p, rs in per_proxy.items()}}


async def _all_on_a(kind: str, targets: dict[str, str]) -> bool:
    members = await asyncio.gather(*(_probe(kind, t, p) for p, t in targets.items()))
    return all(m == KILLED for m in members)


def _pooled(kind: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One proxy's runs pooled: every session's time in one distribution."""
    times = [t for r in runs for t in r["times_ms"]]
    out: dict[str, Any] = {
        _timing_key(kind): summary_ms(times),
        "p99_per_run_ms": [summary_ms(r["times_ms"]).get("p99") for r in runs],
        "steady_ms": summary_ms([t for r in runs for t in r["steady_samples_ms"]]),
        "on_killed_member": [r["on_killed_member"] for r in runs],
        **{k: sum(r[k] for r in runs) for k in ("requests", "failed", "lost_writes",
                                                  "unreadable_sessions", "unrecovered")},
        "runs": [{k: v for k, v in r.items() if k != "steady_samples_ms"} for r in runs]}
    if kind in ("websocket", "tcp"):
        out["break_seen_ms"] = summary_ms([t for r in runs for t in r["break_seen_ms"]])
        out["redialled"] = sum(r["redialled"] for r in runs)
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


# -- verdicts and report -------------------------------------------------------------------


def failover_verdicts(failover: dict[str, Any]) -> list[Verdict]:
    out: list[Verdict] = []
    for kind, res in failover.items():
        key = _timing_key(kind)
        mine, peer = res["proxies"]["meshxl"], res["proxies"]["haproxy"]
        static = res["proxies"]["envoy-static"]
        what = "RTO" if key == "rto_ms" else "reconnect"
        both = (f"meshxl {mine[key].get('p99')} ms, HAProxy {peer[key].get('p99')} ms, "
                f"static Envoy {static[key].get('p99')} ms (p50 {mine[key].get('p50')} / "
                f"{peer[key].get('p50')} / {static[key].get('p50')}); per run "
                f"{mine['p99_per_run_ms']} / {static['p99_per_run_ms']}")
        out.append(Verdict(f"{LABEL[kind]} failover: {what} p99 / static Envoy's",
                           ratio(mine[key].get("p99"), static[key].get("p99")), 1.0, "x",
                           reference=both))
        out.append(Verdict(f"{LABEL[kind]} failover: {what} p99 / HAProxy's",
                           ratio(mine[key].get("p99"), peer[key].get("p99")), 1.0, "x",
                           reference=both))
        out.append(Verdict(
            f"{LABEL[kind]} failover: failed + lost (meshxl)",
            mine["failed"] + mine["lost_writes"] + mine["unreadable_sessions"]
            + mine["unrecovered"], 0, "",
            reference=f"HAProxy {peer['failed']} failed, {peer['lost_writes']} lost; "
                      f"{mine['requests']} requests"))
        missing = sum(res["sessions"] - n for n in mine.get("on_killed_member", []))
        out.append(Verdict(
            f"{LABEL[kind]} failover: sessions off the active at the kill (meshxl)",
            missing, 0, "",
            reference=f"on the active, per run: meshxl {mine.get('on_killed_member')}, "
                      f"static Envoy {static.get('on_killed_member')}, HAProxy "
                      f"{peer.get('on_killed_member')} of {res['sessions']}"))
        if kind in ("websocket", "tcp"):
            out.append(Verdict(
                f"{LABEL[kind]} failover: connections redialled (more than one dial)",
                mine["redialled"], 0, "conns",
                reference=f"HAProxy {peer['redialled']}, static Envoy "
                          f"{static['redialled']}"))
    return out


def verdicts(res: dict[str, Any]) -> list[Verdict]:
    import peerstores

    out = failover_verdicts(res.get("failover", {}))
    out += peersteady.verdicts(res.get("steady", {}))
    if "stores" in res:
        out += peerstores.verdicts(res["stores"])
    return out


def print_failover(res: dict[str, Any]) -> None:
    print(f"\n== the same kill -9 through three proxies ({res.get('runs')} runs each, "
          "rotating order; pooled over the runs)")
    print(f"  {'protocol':<11} {'proxy':<13} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
          f"{'failed':>6} {'lost':>5} {'closed':>6}   steady p50 / p99 ms")
    for kind, r in res.get("failover", {}).items():
        key = _timing_key(kind)
        for proxy, p in r["proxies"].items():
            s, steady = p[key], p.get("steady_ms", {})
            print(f"  {LABEL[kind]:<11} {proxy:<13} {s.get('p50', '-'):>8} "
                  f"{s.get('p99', '-'):>8} {s.get('max', '-'):>8} {p['failed']:>6} "
                  f"{p['lost_writes']:>5} {p.get('redialled', ''):>6}   "
                  f"{steady.get('p50', '-')} / {steady.get('p99', '-')}")


def print_report(res: dict[str, Any], found: list[Verdict]) -> None:
    import peerstores

    if res.get("failover"):
        print_failover(res)
    if res.get("steady"):
        peersteady.print_rows(res["steady"])
    if "stores" in res:
        peerstores.print_rows(res["stores"])
    print_verdicts("meshxl beside its peers", found)


async def run(work: Path, kinds: list[str], runs: int, sessions: int, interval: float,
              writers: int, seconds: float, wan: bool, quick: bool,
              stores: bool = True, steady_kinds: list[str] | None = None,
              steady_rounds: int = 6) -> dict[str, Any]:
    import peerstores

    failover: dict[str, Any] = {}
    for kind in kinds:
        print(f"== {kind}: {runs} run(s) x {len(PROXIES)} proxies, {sessions} sessions",
              flush=True)
        failover[kind] = await run_kind(work / kind, kind, runs, sessions, interval)
    out: dict[str, Any] = {"runs": runs, "failover": failover}
    if steady_kinds:
        out["steady"] = await peersteady.run(work, steady_kinds, steady_rounds, sessions,
                                             interval, STEADY)
    if stores:
        out["stores"] = await peerstores.run(work / "stores", writers, seconds, wan=wan,
                                             quick=quick)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 run, 20 sessions, WebSocket and TCP, short writes")
    parser.add_argument("--runs", type=int, help="kills per proxy and protocol (default 6)")
    parser.add_argument("--sessions", type=int, help="sessions per run (default 100)")
    parser.add_argument("--kinds", help=f"protocols among {','.join(KINDS)} (default all)")
    parser.add_argument("--interval", type=float, default=0.1,
                        help="seconds between a session's requests (default 0.1)")
    parser.add_argument("--writers", type=int, default=16, help="session writers (16)")
    parser.add_argument("--parts", default="failover,steady,stores",
                        help="among failover, steady (the steady path beside the static "
                             "Envoy, each filter's cost) and stores (default: all)")
    parser.add_argument("--steady-rounds", type=int,
                        help="rounds of the steady part (default 6; quick 2)")
    parser.add_argument("--no-wan", action="store_true",
                        help="skip the primary loss over the WAN (needs root)")
    parser.add_argument("--output", type=Path,
                        help="write the results here instead of bench/results/peers.json")
    args = parser.parse_args()
    quick = quick_requested(args.quick)
    runs = args.runs or (1 if quick else RUNS)
    sessions = args.sessions or (20 if quick else 100)
    kinds = ([k.strip() for k in args.kinds.split(",") if k.strip()] if args.kinds
             else (["websocket", "tcp"] if quick else list(KINDS)))
    if runs < 1 or sessions < 1 or args.interval <= 0 or args.writers < 1 \
            or not kinds or set(kinds) - set(KINDS):
        parser.error(f"runs, sessions, writers >= 1, interval > 0, kinds among "
                     f"{','.join(KINDS)}")
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"failover", "steady", "stores"}:
        parser.error("parts among failover, steady, stores")
    steady_rounds = args.steady_rounds or (2 if quick else 6)
    if steady_rounds < 1:
        parser.error("steady rounds >= 1")
    seconds = 1.5 if quick else 4.0
    return run_benchmark(
        NAME, quick, "meshxl-peers-",
        lambda work: run(work, kinds if "failover" in parts else [], runs, sessions,
                         args.interval, args.writers, seconds, not args.no_wan, quick,
                         "stores" in parts, kinds if "steady" in parts else [],
                         steady_rounds),
        verdicts, print_report, write=args.output is None, output=args.output)


if __name__ == "__main__":
    sys.exit(main())
