"""meshxl beside its peers: the same kill -9 failover through HAProxy, a static Envoy
and meshxl, per protocol; session writes through statesync beside Redis.

Run: ``.venv/bin/python bench/peers.py [--quick] [--runs N] [--sessions N]
[--kinds http,grpc,websocket,tcp] [--no-wan]`` (``BENCH_QUICK=1``: quick).
HAProxy and Redis are Debian's ``haproxy`` and ``redis-server``.

**Failover** (``bench/peerproxies.py``). Per protocol (HTTP/1.1 requests, unary gRPC,
WebSocket, TCP) one local meshxl deployment (high availability: a active, b standby,
c backup; the sample counter app and its statesync sidecar each) with, in front of the
same members, its own Envoy (meshxl's control plane), HAProxy and a static Envoy
configured by hand. ``--runs`` times, the proxies in rotating order (over three runs each
proxy goes first, second and last once; alternating, HAProxy was always second):
``--sessions`` sticky sessions (connections for WebSocket and TCP) through one proxy, kill -9 of the
active member a, every session served again by the standby, a restarted. Per proxy:
failed requests, acknowledged writes lost, and the time from the kill to each session's
next answer (HTTP and gRPC: the RTO, from when the session next needed the service;
WebSocket and TCP: to the first answer on the new connection, and connections the proxy
closed on a client while the standby was up).

**Session writes** (``bench/peerstores.py``). ``--writers`` writers overwrite their
sessions' ~1 KiB values through a statesync sidecar (etcd) and through Redis 7 (a
primary and a replica), asynchronously and with ``WAIT 1``; then the primary's site is
lost over the dual-site bed's WAN link (as root: network namespaces), where Redis's
asynchronous replication loses acknowledged writes and meshxl must lose none.

Figures are ratios to the peer measured beside them in the same run. Writes
``bench/results/peers.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import Verdict, print_verdicts, quick_requested, run_benchmark, summary_ms
from failover import disruption_ms, regressions
from peerproxies import KINDS, PROXIES, Sessions, haproxy_config, static_envoy_config

from meshxl.local.deployment import DemoDeployment
from meshxl.local.envoy import EnvoyProcess
from meshxl.local.ports import free_ports
from meshxl.local.report import lost_writes
from meshxl.local.servers import HOST
from meshxl.local.streams import StreamTraffic, read_back_kind
from meshxl.local.traffic import Traffic
from meshxl.local.wait import wait_port, wait_until

NAME = "peers"
PROTOCOL_OF = {"http": "http", "grpc": "grpc", "websocket": "websocket", "tcp": "tcp"}
KILLED = "a"
STEADY = 1.5
PHASE_TIMEOUT = 20.0
LABEL = {"http": "HTTP/1.1", "grpc": "gRPC unary", "websocket": "WebSocket", "tcp": "TCP"}


def _timing_key(kind: str) -> str:
    return "rto_ms" if kind in ("http", "grpc") else "reconnect_ms"


async def _probe(kind: str, target: str) -> str | None:
    """The member a fresh session is served by through ``target``."""
    read_kind = "websocket" if kind == "http" else kind
    try:
        _, records = await asyncio.wait_for(read_back_kind(read_kind, target, ["probe"]), 10)
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


async def one_failover(d: DemoDeployment, kind: str, target: str, sessions: int,
                       interval: float, prefix: str,
                       admin: tuple[str, str] | None = None) -> dict[str, Any]:
    """Traffic through ``target``, kill -9 of a, until every session is served again;
    ``admin``: the proxy's Envoy admin URL and cluster, for its counters."""
    counted = await envoy_counters(admin)
    until = time.time() + STEADY + PHASE_TIMEOUT + 30
    traffic: Any
    if kind == "http":
        traffic = Traffic(f"http://{target}/counter", sessions, until,
                          max_requests=sessions * 2000, interval=interval, prefix=prefix)
    elif kind == "grpc":
        traffic = StreamTraffic("grpc", target, sessions, until, max_requests=sessions * 2000,
                                interval=interval, prefix=prefix)
    else:
        traffic = Sessions(kind, target, sessions, interval, until, prefix)
    load = asyncio.create_task(traffic.run())
    try:
        await asyncio.sleep(STEADY)
        # How many sessions the killed member serves at the kill: only those can break,
        # and a run whose sessions sit elsewhere measures nothing of a failover.
        last: dict[str, str | None] = {}
        for r in traffic.records:
            if r.ok:
                last[r.session] = r.member
        on_killed = sum(1 for m in last.values() if m == KILLED)
        kill = await d.kill_member(KILLED)

        def back() -> bool:
            again = {r.session for r in traffic.records
                     if r.ok and r.sent > kill and r.member != KILLED}
            return len(again) == sessions

        await wait_until(back, timeout=PHASE_TIMEOUT, interval=0.05,
                         what=f"every {kind} session served again after the kill")
        await asyncio.sleep(0.5)
    finally:
        traffic.until = 0.0
        await asyncio.wait_for(load, 30)
    after = await envoy_counters(admin)
    final, readback = await read_back_kind("websocket" if kind == "http" else kind, target,
                                           traffic.sessions)
    records = traffic.records
    unreadable = sum(1 for r in readback if not r.ok)
    readable = {s: v for s, v in final.items() if v is not None}
    lost = sum(lost_writes([r for r in records if r.session in readable], readable).values())
    out: dict[str, Any] = {
        "requests": len(records), "failed": sum(1 for r in records if not r.ok),
        "lost_writes": lost + sum(regressions(records).values()),
        "unreadable_sessions": unreadable, "on_killed_member": on_killed}
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


async def _restart(d: DemoDeployment, kind: str, targets: dict[str, str]) -> None:
    await d.reap_member(KILLED)
    await d.start_member(d.member(KILLED))
    await d.wait_all_healthy(PHASE_TIMEOUT)

    async def every_proxy_on_a() -> bool:
        members = await asyncio.gather(*(_probe(kind, t) for t in targets.values()))
        return all(m == KILLED for m in members)

    await wait_until(every_proxy_on_a, timeout=PHASE_TIMEOUT, interval=0.2,
                     what="every proxy back on member a")


async def run_kind(work: Path, kind: str, runs: int, sessions: int,
                   interval: float) -> dict[str, Any]:
    d = DemoDeployment(work, protocol=PROTOCOL_OF[kind], mode="high-availability",
                       lease_ttl=2.0, failover="{failback_delay: 0s}")
    per_proxy: dict[str, list[dict[str, Any]]] = {p: [] for p in PROXIES}
    try:
        await asyncio.wait_for(d.start(), 90)
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
        for run in range(runs):
            order = PROXIES[run % len(PROXIES):] + PROXIES[:run % len(PROXIES)]
            for proxy in order:
                result = await one_failover(d, kind, targets[proxy], sessions, interval,
                                            prefix=f"{proxy[0]}{run}-",
                                            admin=admins.get(proxy))
                result["order"] = order.index(proxy)
                per_proxy[proxy].append(result)
                print(f"  {kind:<9} run {run + 1} {proxy:<12} "
                      f"on {KILLED} at the kill {result['on_killed_member']}, "
                      f"p99 {summary_ms(result['times_ms']).get('p99')} ms, failed "
                      f"{result['failed']}, lost {result['lost_writes']} "
                      f"{result.get('envoy_counters', '')}", flush=True)
                await _restart(d, kind, targets)
    finally:
        await d.close()
    return {"kind": kind, "runs": runs, "sessions": sessions, "interval_s": interval,
            "proxies": {p: _pooled(kind, rs) for p, rs in per_proxy.items()}}


async def _all_on_a(kind: str, targets: dict[str, str]) -> bool:
    members = await asyncio.gather(*(_probe(kind, t) for t in targets.values()))
    return all(m == KILLED for m in members)


def _pooled(kind: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One proxy's runs pooled: every session's time in one distribution."""
    times = [t for r in runs for t in r["times_ms"]]
    out: dict[str, Any] = {
        _timing_key(kind): summary_ms(times),
        "p99_per_run_ms": [summary_ms(r["times_ms"]).get("p99") for r in runs],
        **{k: sum(r[k] for r in runs) for k in ("requests", "failed", "lost_writes",
                                                  "unreadable_sessions", "unrecovered")},
        "runs": runs}
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
        p99 = ratio(mine[key].get("p99"), peer[key].get("p99"))
        out.append(Verdict(
            f"{LABEL[kind]} failover: {what} p99 / HAProxy's", p99, 1.0, "x",
            reference=f"meshxl {mine[key].get('p99')} ms, HAProxy {peer[key].get('p99')} ms, "
                      f"static Envoy {static[key].get('p99')} ms (p50 {mine[key].get('p50')} / "
                      f"{peer[key].get('p50')} / {static[key].get('p50')})"))
        out.append(Verdict(
            f"{LABEL[kind]} failover: failed + lost (meshxl)",
            mine["failed"] + mine["lost_writes"] + mine["unreadable_sessions"], 0, "",
            reference=f"HAProxy {peer['failed']} failed, {peer['lost_writes']} lost; "
                      f"{mine['requests']} requests"))
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
    if "stores" in res:
        out += peerstores.verdicts(res["stores"])
    return out


def print_report(res: dict[str, Any], found: list[Verdict]) -> None:
    import peerstores

    print(f"\n== the same kill -9 through three proxies ({res.get('runs')} runs each, "
          "rotating order; pooled over the runs)")
    print(f"  {'protocol':<11} {'proxy':<13} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
          f"{'failed':>6} {'lost':>5} {'closed':>6}")
    for kind, r in res.get("failover", {}).items():
        key = _timing_key(kind)
        for proxy, p in r["proxies"].items():
            s = p[key]
            print(f"  {LABEL[kind]:<11} {proxy:<13} {s.get('p50', '-'):>8} "
                  f"{s.get('p99', '-'):>8} {s.get('max', '-'):>8} {p['failed']:>6} "
                  f"{p['lost_writes']:>5} {p.get('redialled', ''):>6}")
    if "stores" in res:
        peerstores.print_rows(res["stores"])
    print_verdicts("meshxl beside its peers", found)


async def run(work: Path, kinds: list[str], runs: int, sessions: int, interval: float,
              writers: int, seconds: float, wan: bool, quick: bool,
              stores: bool = True) -> dict[str, Any]:
    import peerstores

    failover: dict[str, Any] = {}
    for kind in kinds:
        print(f"== {kind}: {runs} run(s) x {len(PROXIES)} proxies, {sessions} sessions",
              flush=True)
        failover[kind] = await run_kind(work / kind, kind, runs, sessions, interval)
    out: dict[str, Any] = {"runs": runs, "failover": failover}
    if stores:
        out["stores"] = await peerstores.run(work / "stores", writers, seconds, wan=wan,
                                             quick=quick)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 run, 20 sessions, WebSocket and TCP, short writes")
    parser.add_argument("--runs", type=int, help="kills per proxy and protocol (default 3)")
    parser.add_argument("--sessions", type=int, help="sessions per run (default 100)")
    parser.add_argument("--kinds", help=f"protocols among {','.join(KINDS)} (default all)")
    parser.add_argument("--interval", type=float, default=0.1,
                        help="seconds between a session's requests (default 0.1)")
    parser.add_argument("--writers", type=int, default=16, help="session writers (16)")
    parser.add_argument("--parts", default="failover,stores",
                        help="failover, stores or both (default)")
    parser.add_argument("--no-wan", action="store_true",
                        help="skip the primary loss over the WAN (needs root)")
    args = parser.parse_args()
    quick = quick_requested(args.quick)
    runs = args.runs or (1 if quick else 3)
    sessions = args.sessions or (20 if quick else 100)
    kinds = ([k.strip() for k in args.kinds.split(",") if k.strip()] if args.kinds
             else (["websocket", "tcp"] if quick else list(KINDS)))
    if runs < 1 or sessions < 1 or args.interval <= 0 or args.writers < 1 \
            or not kinds or set(kinds) - set(KINDS):
        parser.error(f"runs, sessions, writers >= 1, interval > 0, kinds among "
                     f"{','.join(KINDS)}")
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"failover", "stores"}:
        parser.error("parts among failover, stores")
    seconds = 1.5 if quick else 4.0
    return run_benchmark(
        NAME, quick, "meshxl-peers-",
        lambda work: run(work, kinds if "failover" in parts else [], runs, sessions,
                         args.interval, args.writers, seconds, not args.no_wan, quick,
                         "stores" in parts),
        verdicts, print_report)


if __name__ == "__main__":
    sys.exit(main())
