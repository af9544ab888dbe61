"""The steady path of ``bench/peers.py``: requests through meshxl's Envoy beside the
static Envoy configured by hand, and what each of meshxl's filters costs.

Per protocol, one local meshxl deployment (as the failover part's) with the static
Envoy in front of the same members. Arms, each a short phase of the same steady load
(``sessions`` sessions, one request every ``interval`` each; WebSocket and TCP: one
message per interval on a connection each), in rotating order over ``rounds`` rounds:

* ``envoy-static``: the static Envoy;
* ``meshxl``: meshxl's Envoy with its features on, as they default: stickiness, pins
  (HTTP: carried in a header), the access logs the sick-member judge reads, tracing
  (the clients start no trace, as the static Envoy's; Envoy records the default share
  of the traces it starts, a span per request and per upstream attempt);
* HTTP only: ``traced``, the same with a client that starts every request's trace,
  sampled (as the demo's: Envoy records each), and one feature off each (the model
  changed between arms, the control plane pushes it, the arm starts once Envoy has
  it): ``-tracing``, ``-access-log``, ``-pins``, and ``bare`` (all three off).

Per arm, pooled over its rounds: request latency (p50, p99; the first
:data:`WARM_UP` seconds of each phase, while connections open, left out) and the
Envoy's CPU per request (its process's user + system time over the phase / requests).
A filter's cost is what its arm saves against ``meshxl``. Verdicts: ``meshxl``'s
p50 and p99 at most :data:`TARGET` x the static Envoy's.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from benchlib import Verdict, summary_ms
from peerproxies import Sessions, static_envoy_config, warm_members

from meshxl.local.deployment import DemoDeployment, demo_model
from meshxl.local.envoy import EnvoyProcess
from meshxl.local.ports import free_ports
from meshxl.local.servers import HOST
from meshxl.local.streams import StreamTraffic
from meshxl.local.traffic import Traffic
from meshxl.local.wait import wait_until

TARGET = 1.05
WARM_UP = 0.5
PIN_HEADER = "x-meshxl-pin"
FEATURES = ("tracing", "access-log", "pins")
STATIC = "envoy-static"
MESHXL = "meshxl"
TRACED = "traced"
LABEL = {"http": "HTTP/1.1", "grpc": "gRPC unary", "websocket": "WebSocket", "tcp": "TCP"}
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def arms(kind: str) -> list[str]:
    """The arms of ``kind``: the two Envoys, and for HTTP every request traced and each
    feature off."""
    if kind != "http":
        return [STATIC, MESHXL]
    return [STATIC, MESHXL, TRACED, *(f"-{f}" for f in FEATURES), "bare"]


def features_of(arm: str) -> set[str]:
    """The meshxl features ``arm`` runs with."""
    if arm == "bare":
        return set()
    if arm.startswith("-"):
        return set(FEATURES) - {arm[1:]}
    return set(FEATURES)


def model_text(d: DemoDeployment, features: set[str]) -> str:
    """The deployment's model with ``features`` on (pins: HTTP only)."""
    fields = {} if "access-log" in features else {"degradation": "{action: off}"}
    pinned = "pins" in features and d.protocol == "http"
    text = demo_model(d.mode, d.listen_port, [(m.name, m.site) for m in d.members],
                      protocol=d.protocol, failover=d.failover, fields=fields,
                      pin_header=PIN_HEADER if pinned else None)
    if "tracing" not in features:
        text = text.replace("telemetry: {tracing: true}", "telemetry: {tracing: false}")
    return text


def features_served(dump: str) -> set[str]:
    """The features in the text of an Envoy's listeners and routes (``/config_dump``)."""
    found = set()
    if '"spawn_upstream_span"' in dump:
        found.add("tracing")
    if '"upstream_log"' in dump or '"access_log"' in dump:
        found.add("access-log")
    if "stateful_session" in dump:
        found.add("pins")
    return found


def cpu_seconds(pid: int) -> float:
    """A process's user + system CPU seconds so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


async def _serve(d: DemoDeployment, features: set[str]) -> None:
    """Store the model with ``features`` and wait until meshxl's Envoy serves it."""
    from meshxl import etcd
    from meshxl.operator.actions import apply_model
    from meshxl.proxy.admin import EnvoyAdmin

    # Pins are HTTP's here; a TCP listener has no tracing.
    wanted = features - ({"pins"} if d.protocol != "http" else set()) \
        - ({"tracing"} if d.protocol == "tcp" else set())
    async with etcd.client(d.etcd_url) as client:
        await apply_model(client, d.keys, model_text(d, features), "bench peers steady")

    async def served() -> bool:
        # Listeners and routes only: the dump's bootstrap lists every extension built in.
        async with EnvoyAdmin(d.admin_url, timeout=2.0) as envoy:
            dumps = [await envoy.get("/config_dump", resource=resource)
                     for resource in ("dynamic_listeners", "dynamic_route_configs")]
        return all(status == 200 for status, _ in dumps) and features_served(
            "".join(text for _, text in dumps)) == wanted

    await wait_until(served, timeout=30, interval=0.1,
                     what=f"meshxl's Envoy serving {sorted(wanted) or 'no feature'}")
    await d.wait_all_healthy(30)


async def phase(kind: str, target: str, pid: int, sessions: int, interval: float,
                seconds: float, prefix: str, pins: bool, traced: bool = False,
                ) -> dict[str, Any]:
    """``seconds`` of steady load through ``target``; its latencies and the Envoy's
    (``pid``) CPU per request. ``traced``: the HTTP client starts every trace, sampled."""
    until = time.time() + seconds
    traffic: Any
    if kind == "http":
        traffic = Traffic(f"http://{target}/counter", sessions, until,
                          max_requests=sessions * 1000, interval=interval, prefix=prefix,
                          pin_header=PIN_HEADER if pins else None, traced=traced)
    elif kind == "grpc":
        traffic = StreamTraffic("grpc", target, sessions, until,
                                max_requests=sessions * 1000, interval=interval,
                                prefix=prefix)
    else:
        traffic = Sessions(kind, target, sessions, interval, until, prefix)
    started, cpu = time.time(), cpu_seconds(pid)
    async with asyncio.timeout(seconds + 30):
        await traffic.run()
    cpu = cpu_seconds(pid) - cpu
    records = traffic.records
    latencies = [(r.ended - r.sent) * 1000 for r in records
                 if r.ok and r.sent >= started + WARM_UP]
    return {"latencies_ms": latencies, "requests": len(records),
            "failed": sum(1 for r in records if not r.ok),
            "envoy_cpu_us_per_request": round(cpu / max(len(records), 1) * 1e6, 1)}


async def run_kind(work: Path, kind: str, rounds: int, sessions: int, interval: float,
                   seconds: float) -> dict[str, Any]:
    d = DemoDeployment(work, protocol=kind, mode="high-availability",
                       lease_ttl=2.0, failover="{failback_delay: 0s}",
                       pin_header=PIN_HEADER if kind == "http" else None)
    names = arms(kind)
    found: dict[str, list[dict[str, Any]]] = {a: [] for a in names}
    try:
        async with asyncio.timeout(90):
            await d.start()
        members = [(m.name, m.app_port) for m in d.members]
        port, admin = free_ports(2)
        static = EnvoyProcess(static_envoy_config(kind, (HOST, port), admin, members),
                              work / "envoy-static", log_level="warning", hot_restart=False,
                              name="envoy-static")
        d.owner.own(static)
        await static.start()
        await static.wait_ready(30)
        await warm_members(d, kind, sessions)
        serving = set(FEATURES)
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for arm in order:
                if arm != STATIC and features_of(arm) != serving:
                    serving = features_of(arm)
                    await _serve(d, serving)
                target, envoy = ((f"{HOST}:{port}", static) if arm == STATIC
                                 else (d.target, d.envoy))
                assert envoy.pid is not None
                result = await phase(kind, target, envoy.pid, sessions, interval, seconds,
                                     f"{r}{names.index(arm)}-",
                                     pins=arm != STATIC and "pins" in serving,
                                     traced=arm == TRACED)
                found[arm].append(result)
                s = summary_ms(result["latencies_ms"])
                print(f"  {kind:<9} round {r + 1} {arm:<13} p50 {s.get('p50')} p99 "
                      f"{s.get('p99')} ms, Envoy {result['envoy_cpu_us_per_request']} us "
                      f"per request, failed {result['failed']}", flush=True)
    finally:
        await d.close()
    return {"kind": kind, "rounds": rounds, "sessions": sessions, "interval_s": interval,
            "seconds": seconds, "arms": {a: _pooled(rs) for a, rs in found.items()}}


def _pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    cpu = sorted(r["envoy_cpu_us_per_request"] for r in runs)
    return {"latency_ms": summary_ms([t for r in runs for t in r["latencies_ms"]]),
            "p50_per_round_ms": [summary_ms(r["latencies_ms"]).get("p50") for r in runs],
            "p99_per_round_ms": [summary_ms(r["latencies_ms"]).get("p99") for r in runs],
            "envoy_cpu_us_per_request": cpu[len(cpu) // 2] if cpu else None,
            "envoy_cpu_us_per_round": [r["envoy_cpu_us_per_request"] for r in runs],
            "requests": sum(r["requests"] for r in runs),
            "failed": sum(r["failed"] for r in runs)}


async def run(work: Path, kinds: list[str], rounds: int, sessions: int, interval: float,
              seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in kinds:
        print(f"== {kind} steady: {rounds} round(s) x {len(arms(kind))} arms, {sessions} "
              f"sessions", flush=True)
        out[kind] = await run_kind(work / f"steady-{kind}", kind, rounds, sessions, interval,
                                   seconds)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def costs(res: dict[str, Any]) -> dict[str, Any]:
    """Each feature's cost: Envoy CPU per request and latency p50, ``meshxl`` against the
    arm without it (HTTP); tracing every request: ``traced`` against ``meshxl``."""
    a = res["arms"]
    out = {}
    for arm in a:
        if arm in (STATIC, MESHXL):
            continue
        more, less = (a[arm], a[MESHXL]) if arm == TRACED else (a[MESHXL], a[arm])
        name = ("tracing every request" if arm == TRACED else "all three" if arm == "bare"
                else arm[1:])
        out[name] = {
            "envoy_cpu_us_per_request": round((more["envoy_cpu_us_per_request"] or 0)
                                              - (less["envoy_cpu_us_per_request"] or 0), 1),
            "p50_ms": round((more["latency_ms"].get("p50") or 0)
                            - (less["latency_ms"].get("p50") or 0), 2)}
    return out


def verdicts(steady: dict[str, Any]) -> list[Verdict]:
    out = []
    for kind, res in steady.items():
        mine, static = res["arms"][MESHXL], res["arms"][STATIC]
        for q in ("p50", "p99"):
            out.append(Verdict(
                f"{LABEL[kind]} steady path: request {q} / static Envoy's",
                _ratio(mine["latency_ms"].get(q), static["latency_ms"].get(q)), TARGET, "x",
                reference=f"meshxl {mine['latency_ms'].get(q)} ms, static Envoy "
                          f"{static['latency_ms'].get(q)} ms over {res['rounds']} rounds; "
                          f"Envoy CPU {mine['envoy_cpu_us_per_request']} / "
                          f"{static['envoy_cpu_us_per_request']} us per request"))
    return out


def print_rows(steady: dict[str, Any]) -> None:
    print("\n== the steady path (pooled over the rounds)")
    print(f"  {'protocol':<11} {'arm':<13} {'p50 ms':>8} {'p99 ms':>8} {'Envoy us/req':>13}")
    for kind, res in steady.items():
        for arm, a in res["arms"].items():
            print(f"  {LABEL[kind]:<11} {arm:<13} {a['latency_ms'].get('p50', '-'):>8} "
                  f"{a['latency_ms'].get('p99', '-'):>8} "
                  f"{a['envoy_cpu_us_per_request'] or '-':>13}")
        if kind == "http":
            for feature, cost in costs(res).items():
                print(f"    {feature:<11} costs {cost['envoy_cpu_us_per_request']} us of "
                      f"Envoy CPU and {cost['p50_ms']} ms of p50 per request")
