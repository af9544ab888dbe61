"""bench/peers.py's pure parts: who served the sessions that were not on the active at
a kill, the verdicts against the static Envoy, the steady part's features and costs.

The benchmark itself runs with ``make bench``; this keeps what it computes honest
without starting a process.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import peers  # noqa: E402
import peersteady  # noqa: E402

from meshxl.local.traffic import Record  # noqa: E402

KILL = 100.0


def _ok(session: str, sent: float, member: str) -> Record:
    return Record(sent, sent + 0.01, session, 200, member, 1)


def test_sessions_off_the_active_say_who_served_them_since_when() -> None:
    records = [_ok("s1", 97.0, "a"), _ok("s1", 99.0, "a"),        # on the active
               _ok("s2", 97.0, "a"), _ok("s2", 98.0, "b"), _ok("s2", 99.5, "b"),
               _ok("s3", 99.8, "c"),
               Record(99.9, 100.2, "s2", 0, None, None),           # failed: not a server
               _ok("s1", 100.5, "b")]                              # after the kill
    off = peers._off_the_active(records, KILL)
    assert off["members"] == {"b": 1, "c": 1}
    # s2 on b since 98.0 (2 s before the kill), s3 on c since 99.8.
    assert off["since_ms_before_kill"]["max"] == 2000.0
    assert off["since_ms_before_kill"]["min"] == 200.0


def test_a_sample_keeps_the_spread_of_what_it_stands_for() -> None:
    values = [float(v) for v in range(10_000)]
    kept = peers._sample(values, 1000)
    assert len(kept) == 1000 and kept[0] == 0.0 and kept[-1] == 9999.0
    assert peers._sample([3.0, 1.0], 1000) == [1.0, 3.0]


def _proxy(p99: float, on: list[int], failed: int = 0) -> dict[str, Any]:
    return {"rto_ms": {"p50": p99 / 2, "p99": p99}, "p99_per_run_ms": [p99],
            "on_killed_member": on, "failed": failed, "lost_writes": 0,
            "unreadable_sessions": 0, "unrecovered": 0, "requests": 1000}


def test_failover_verdicts_hold_meshxl_to_the_static_envoy_and_every_session() -> None:
    res = {"http": {"sessions": 100, "proxies": {
        "meshxl": _proxy(30.0, [100, 96]), "haproxy": _proxy(120.0, [100, 100], 3),
        "envoy-static": _proxy(25.0, [100, 100])}}}
    found = {v.name: v for v in peers.failover_verdicts(res)}
    static = found["HTTP/1.1 failover: RTO p99 / static Envoy's"]
    assert static.measured == 1.2 and static.met is False
    assert found["HTTP/1.1 failover: RTO p99 / HAProxy's"].met is True
    off = found["HTTP/1.1 failover: sessions off the active at the kill (meshxl)"]
    assert off.measured == 4 and off.met is False


def test_the_steady_part_reads_features_from_listeners_and_routes() -> None:
    assert peersteady.features_served('"spawn_upstream_span": true "upstream_log": [' +
                                      '"envoy.filters.http.stateful_session"') == \
        {"tracing", "access-log", "pins"}
    assert peersteady.features_served('"access_log": [') == {"access-log"}  # TCP proxy
    assert peersteady.features_served("{}") == set()
    assert peersteady.arms("tcp") == ["envoy-static", "meshxl"]
    assert peersteady.arms("http")[:3] == ["envoy-static", "meshxl", "traced"]
    assert peersteady.features_of("traced") == {"tracing", "access-log", "pins"}
    assert peersteady.features_of("-pins") == {"tracing", "access-log"}
    assert peersteady.features_of("bare") == set()


def _arm(p50: float, p99: float, cpu: float) -> dict[str, Any]:
    return {"latency_ms": {"p50": p50, "p99": p99}, "envoy_cpu_us_per_request": cpu}


def test_each_filter_costs_what_its_arm_saves_and_the_verdicts_compare_to_static() -> None:
    res = {"rounds": 6, "arms": {
        "envoy-static": _arm(10.0, 20.0, 50.0), "meshxl": _arm(10.4, 21.5, 90.0),
        "-tracing": _arm(10.2, 21.0, 70.0), "-access-log": _arm(10.3, 21.2, 80.0),
        "-pins": _arm(10.4, 21.4, 85.0), "bare": _arm(10.0, 20.1, 52.0),
        "traced": _arm(11.0, 23.0, 150.0)}}
    costs = peersteady.costs(res)
    assert costs["tracing every request"]["envoy_cpu_us_per_request"] == 60.0
    assert costs["tracing"]["envoy_cpu_us_per_request"] == 20.0
    assert costs["all three"]["envoy_cpu_us_per_request"] == 38.0
    verdicts = {v.name: v for v in peersteady.verdicts({"http": res})}
    assert verdicts["HTTP/1.1 steady path: request p50 / static Envoy's"].measured == 1.04
    assert verdicts["HTTP/1.1 steady path: request p99 / static Envoy's"].met is False


def test_a_proxy_that_ejects_on_a_websocket_end_is_probed_without_one() -> None:
    # The static Envoy ejected member a when the probe's WebSocket closed, so the next
    # run's sessions opened on the standby (0 of 100 on the active at the kill).
    assert peers.probe_kind("websocket", "envoy-static") == "http"
    assert peers.probe_kind("websocket", "meshxl") == "websocket"
    assert peers.probe_kind("websocket", "haproxy") == "websocket"
    for kind in ("http", "grpc", "tcp"):
        assert {peers.probe_kind(kind, p) for p in peers.PROXIES} == {kind}
