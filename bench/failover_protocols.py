"""The protocol rows of ``bench/failover.py``: the same kill -9 through real Envoy with
members that speak gRPC (unary calls, server streams), WebSocket or TCP.

One local deployment per protocol (high availability: a active, b standby, c backup in
a second site; each member the demo counter over that protocol plus its statesync
sidecar), ``--sessions`` sessions incrementing their counter every ``--interval``
through Envoy (:class:`meshxl.local.streams.StreamTraffic`). Then, ``--repeats`` times:
steady load, kill -9 of the member serving the most sessions (the active first; a
long-lived connection stays where it reconnected, so the next kill takes the member it
moved to), wait until every session of the killed member is served again, restart it.

Measured per protocol: failed calls or requests (no answer within the client's
reconnect deadline), lost acknowledged writes (a count going back, or the read-back
short of the last acknowledged value), and

* unary gRPC: the data-plane RTO per session (``disruption_ms``, as for HTTP/1.1);
* gRPC streams, WebSocket, TCP: the reconnect time, from the kill to the first answer
  on the re-established connection, per connection the killed member served (and
  beside it, from the break the client saw to that answer), and whether the new owner
  continued every session's count.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchlib import Verdict, stop_load, summary_ms

from meshxl.local.deployment import DemoDeployment
from meshxl.local.report import lost_writes
from meshxl.local.streams import StreamTraffic, read_back_kind, reconnect_report
from meshxl.local.wait import wait_until

KINDS = ("grpc", "grpc-stream", "websocket", "tcp")
PROTOCOL_OF = {"grpc": "grpc", "grpc-stream": "grpc", "websocket": "websocket", "tcp": "tcp"}
TARGET_FAILED = 0
TARGET_LOST = 0
TARGET_RTO_P99_MS = 100.0
"""Unary gRPC: as HTTP/1.1's (Envoy retries the call on the standby)."""
TARGET_RECONNECT_P99_MS = 500.0
"""Long-lived connections: the client must see the break (the member's connection
closes with it), connect again and be placed on the new owner (for TCP, Envoy's
connect retry after the dead member refuses); half a second keeps a reconnect below
one health-check detection (2 x 250 ms)."""
STEADY = 2.0
PHASE_TIMEOUT = 20.0
LEASE_TTL = 2.0


def _busiest(records: Sequence[Any], since: float) -> str:
    recent: dict[str, int] = {}
    for r in records:
        if r.ok and r.member and r.ended >= since:
            recent[r.member] = recent.get(r.member, 0) + 1
    return max(recent, key=lambda m: recent[m]) if recent else "a"


async def run_kind(work: Path, kind: str, repeats: int, sessions: int, interval: float,
                   disruption: Callable[..., tuple[list[float], list[str]]],
                   regressions: Callable[..., dict[str, int]]) -> dict[str, Any]:
    """One protocol's run (module docstring); ``disruption`` and ``regressions`` are
    bench/failover.py's computations."""
    d = DemoDeployment(work, protocol=PROTOCOL_OF[kind], mode="high-availability",
                       lease_ttl=LEASE_TTL)
    traffic: StreamTraffic | None = None
    load: asyncio.Task[None] | None = None
    kills: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(90):
            await d.start()
        started = time.time()
        budget = 30.0 + repeats * (STEADY + 3 * PHASE_TIMEOUT)
        traffic = StreamTraffic(kind, d.target, sessions, started + budget,
                                max_requests=int(sessions * budget / interval) + 1000,
                                interval=interval, prefix=kind[0])
        load = asyncio.create_task(traffic.run())
        for _ in range(repeats):
            await asyncio.sleep(STEADY)
            victim = _busiest(traffic.records, time.time() - 1.0)
            served = {r.session for r in traffic.records[-4 * sessions:]
                      if r.ok and r.member == victim}
            kill = await d.kill_member(victim)

            def back(t: StreamTraffic = traffic, served: set[str] = served,
                     kill: float = kill, victim: str = victim) -> bool:
                again = {r.session for r in t.records
                         if r.ok and r.sent > kill and r.member != victim}
                return served <= again

            await wait_until(back, timeout=PHASE_TIMEOUT, interval=0.05,
                             what=f"the {kind} sessions of {victim} served again")
            await asyncio.sleep(1.0)
            kills.append({"kill_unix": kill, "victim": victim, "sessions": len(served)})
            await d.reap_member(victim)
            await d.start_member(d.member(victim))
            await d.wait_all_healthy(PHASE_TIMEOUT)
        traffic.until = time.time()
        async with asyncio.timeout(30):
            await load
        final, readback = await read_back_kind(kind, d.target, traffic.sessions)
    finally:
        await stop_load(load, traffic)
        await d.close()
    assert traffic is not None
    posts = traffic.records
    lost = sum(lost_writes(posts, final).values()) + sum(regressions(posts).values())
    out: dict[str, Any] = {
        "kind": kind, "sessions": sessions, "repeats": len(kills),
        "requests": len(posts), "failed": sum(1 for r in posts if not r.ok),
        "failures": sorted({r.error for r in posts if not r.ok})[:5],
        "acknowledged_writes": sum(1 for r in posts if r.ok), "lost_writes": lost,
        "readback_failed": sum(1 for r in readback if not r.ok), "kills": kills,
    }
    if kind == "grpc":
        rto: list[float] = []
        for k in kills:
            times, _ = disruption(posts, k["kill_unix"], k["victim"])
            rto += times
        out["rto_ms"] = summary_ms(rto)
    else:
        first: list[float] = []
        seen: list[float] = []
        intact = True
        ends = [k["kill_unix"] for k in kills[1:]] + [float("inf")]
        for k, end in zip(kills, ends, strict=True):
            # This kill's reconnects: the killed member's connections, until the next kill.
            mine = [r for r in traffic.reconnects if r.member_before == k["victim"]
                    and k["kill_unix"] <= r.broken < min(end, k["kill_unix"] + PHASE_TIMEOUT)]
            part = reconnect_report(mine, k["kill_unix"], k["victim"])
            intact &= part["state_intact"]
            k["reconnect_ms"] = part["kill_to_first_answer_ms"]
            k["slowest"] = [
                {"session": r.session, "broken_s": round(r.broken - k["kill_unix"], 3),
                 "answered_s": round(r.answered - k["kill_unix"], 3),
                 "to": r.member_after, "attempts": r.attempts, "error": r.error}
                for r in sorted(mine, key=lambda r: r.answered)[-3:]]
            first += [(r.answered - k["kill_unix"]) * 1000 for r in mine]
            seen += [(r.answered - r.broken) * 1000 for r in mine]
        out.update(reconnect_ms=summary_ms(first), break_to_answer_ms=summary_ms(seen),
                   reconnects=len(traffic.reconnects), state_intact=intact)
    return out


_LABEL = {"grpc": "gRPC unary", "grpc-stream": "gRPC streams", "websocket": "WebSocket",
          "tcp": "TCP"}


def verdicts(results: dict[str, dict[str, Any]]) -> list[Verdict]:
    out: list[Verdict] = []
    for kind, res in results.items():
        label = _LABEL[kind]
        out += [
            Verdict(f"failover {label}: failed", res["failed"], TARGET_FAILED, "calls",
                    reference=f"{res['requests']} answered, {res['repeats']} kills"),
            Verdict(f"failover {label}: lost acknowledged writes", res["lost_writes"],
                    TARGET_LOST, "writes", reference=f"{res['acknowledged_writes']} "
                    "acknowledged"),
        ]
        if kind == "grpc":
            out.append(Verdict(f"failover {label}: RTO p99", res["rto_ms"].get("p99"),
                               TARGET_RTO_P99_MS, "ms",
                               reference=f"p50 {res['rto_ms'].get('p50')} ms"))
        else:
            out.append(Verdict(
                f"failover {label}: reconnect p99 (kill -> first answer)",
                res["reconnect_ms"].get("p99"), TARGET_RECONNECT_P99_MS, "ms",
                reference=f"break seen -> answer p99 {res['break_to_answer_ms'].get('p99')} "
                f"ms; state {'intact' if res['state_intact'] else 'LOST'}"))
    return out


def print_rows(results: dict[str, dict[str, Any]]) -> None:
    print("\n== the same kill -9 for each protocol (high availability)")
    print(f"  {'protocol':<13} {'answered':>8} {'failed':>6} {'lost':>5} "
          f"{'RTO/reconnect p50':>18} {'p99':>7} {'max':>7}")
    for kind, res in results.items():
        s = res.get("rto_ms") or res.get("reconnect_ms") or {}
        print(f"  {_LABEL[kind]:<13} {res['requests']:>8} {res['failed']:>6} "
              f"{res['lost_writes']:>5} {s.get('p50', 0):>18.1f} {s.get('p99', 0):>7.1f} "
              f"{s.get('max', 0):>7.1f}")
