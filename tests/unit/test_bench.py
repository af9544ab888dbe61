"""The benchmarks' pure parts: verdicts, the failover and rebalance computations, the
summary picture.

The benchmarks themselves run with ``make bench`` (not part of the test suite); this
keeps what they compute and draw honest without starting a process.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import ab  # noqa: E402
import benchlib  # noqa: E402
import dapr_state  # noqa: E402
import flap  # noqa: E402
import footprint  # noqa: E402
import rebalance  # noqa: E402
import statesync  # noqa: E402
import statesync_gc  # noqa: E402
import statesync_path  # noqa: E402
import summary  # noqa: E402
from failover import disruption_ms, regressions  # noqa: E402

from meshxl.local.traffic import Record  # noqa: E402


def test_verdict_directions() -> None:
    assert benchlib.Verdict("x", 99.0, 100.0, "ms").met is True
    assert benchlib.Verdict("x", 101.0, 100.0, "ms").met is False
    assert benchlib.Verdict("x", 0.9, 1.0, "x", at_most=False).met is False
    assert benchlib.Verdict("x", 1.0, 1.0, "x", at_most=False).met is True
    assert benchlib.Verdict("x", None, 1.0, "x").met is None
    assert "MISSED" in benchlib.Verdict("lost writes", 2, 0, "writes").line()


def test_summary_ms_and_quantile() -> None:
    s = benchlib.summary_ms([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["n"] == 5 and s["p50"] == 3.0 and s["max"] == 100.0
    assert s["p99"] == 100.0  # nearest rank: ceil(0.99 * 5) = 5th of 5, the slowest
    assert benchlib.summary_ms([]) == {"n": 0}


def _r(session: str, sent: float, ended: float, status: int = 200, member: str | None = "a",
       seq: int | None = None) -> Record:
    return Record(sent, ended, session, status, member if status == 200 else None, seq)


def test_disruption_counts_from_the_next_need_not_idle_time() -> None:
    kill = 10.0
    records = [
        # s1: served by a before the kill; in flight at the kill; retried to b at 10.040
        _r("s1", 9.5, 9.51, seq=1), _r("s1", 9.99, 10.040, member="b", seq=2),
        # s2: idle at the kill; next request 0.3 s later succeeds in 5 ms
        _r("s2", 9.6, 9.61, seq=1), _r("s2", 10.3, 10.305, member="b", seq=2),
        # s3: served by b: not a session of the killed member
        _r("s3", 9.7, 9.71, member="b", seq=1), _r("s3", 10.1, 10.2, member="b", seq=2),
        # s4: fails after the kill, then recovers at 10.100
        _r("s4", 9.8, 9.81, seq=1), _r("s4", 10.01, 10.05, status=503),
        _r("s4", 10.06, 10.100, member="b", seq=2),
        # s5: never recovers
        _r("s5", 9.9, 9.91, seq=1), _r("s5", 10.02, 10.5, status=0),
    ]
    rto, unrecovered = disruption_ms(records, kill, "a")
    assert sorted(round(x, 3) for x in rto) == [5.0, 40.0, 90.0]
    assert unrecovered == ["s5"]


def test_regressions_find_undone_writes() -> None:
    fine = [_r("s", t, t + 0.01, seq=i) for i, t in enumerate((1.0, 2.0, 3.0), start=1)]
    assert regressions(fine) == {}
    # seq 3 acknowledged, then the counter went back to 2: writes 2 and 3 were lost
    lost = [_r("s", 1.0, 1.01, seq=1), _r("s", 2.0, 2.01, seq=2), _r("s", 3.0, 3.01, seq=3),
            _r("s", 4.0, 4.01, seq=2), _r("s", 5.0, 5.01, seq=3)]
    assert regressions(lost) == {"s": 2}
    # a retried write that both members applied only skips a number: nothing lost
    assert regressions([_r("s", 1.0, 1.01, seq=1), _r("s", 2.0, 2.01, seq=3)]) == {}


def test_pin_from_reads_envoys_set_cookie() -> None:
    # Envoy quotes the value (base64 of the pinned address) and adds attributes.
    headers = ['meshxl-pin="MTI3LjAuMC4xOjgwODA="; Max-Age=3600; Path=/; HttpOnly',
               "other=1; Path=/"]
    assert rebalance.pin_from(headers, "meshxl-pin") == "MTI3LjAuMC4xOjgwODA="
    assert rebalance.pin_from(headers[1:], "meshxl-pin") is None
    assert rebalance.pin_from(["meshxl-pin=a", "meshxl-pin=b"], "meshxl-pin") == "b"
    assert rebalance.pin_from(['bad cookie "', "meshxl-pin=x"], "meshxl-pin") == "x"


def test_moves_split_the_leaving_members_sessions_from_the_others() -> None:
    before = {"s1": "a", "s2": "a", "s3": "b", "s4": "c", "s5": "c"}
    # a leaves: its two sessions move; s4 of c moves too; s6 is new (not counted)
    after = {"s1": "b", "s2": "c", "s3": "b", "s4": "b", "s5": "c", "s6": "b"}
    found = rebalance.moves(before, after, "a")
    assert found["moved"] == 3 and found["sessions"] == 5 and found["fraction"] == 0.6
    assert (found["on_leaving"], found["moved_on_leaving"]) == (2, 2)
    assert found["moved_others"] == 1 and found["others_fraction"] == round(1 / 3, 4)
    # a member joins: every session is someone else's
    joined = rebalance.moves(before, {**before, "s3": "d"}, None)
    assert (joined["moved"], joined["on_leaving"], joined["moved_others"]) == (1, 0, 1)


def test_lost_writes_per_step_and_on_readback() -> None:
    before = {"s1": 3, "s2": 5, "s3": 1}
    # s1 went on (4), s2 skipped a number (7: a retry applied twice), s3 fell back to
    # its counter before the last acknowledged write (1 again: one write lost)
    assert rebalance.lost_in_step(before, {"s1": 4, "s2": 7, "s3": 1, "new": 1}) == 1
    assert rebalance.lost_in_step(before, {"s2": 3}) == 3  # 4 and 5 lost, then 3 again
    assert rebalance.lost_in_step({}, {"s1": 1}) == 0
    # 4 acknowledged POSTs need a counter of at least 4; unreadable counts as 0
    assert rebalance.lost_on_readback({"s1": 4, "s2": 2, "s3": 1},
                                      {"s1": 5, "s2": 1, "s3": None}) == 2


def test_share_and_sampling_error() -> None:
    assert rebalance.share_of({"a": "m3", "b": "m1", "c": "m3", "d": "m0"}, "m3") == 0.5
    assert rebalance.share_of({}, "m3") == 0.0
    assert round(rebalance.sampling_error(0.25, 1000), 4) == 0.0411


def _run(name: str, pinned: bool, steps: list[dict], share: float) -> dict:
    return {"run": name, "pinned": pinned, "members": 3, "steps": steps,
            "new_sessions": {"sessions": 1000, "share": share, "ideal": 0.25},
            "lost_writes": 0, "lost_writes_readback": 0, "moved_sessions": 10}


def _step(name: str, fraction: float, ideal: float, leaving: str | None,
          moved_others: int = 0) -> dict:
    return {"step": name, "fraction": fraction, "ideal": ideal, "sessions": 1000,
            "leaving": leaving, "on_leaving": 250 if leaving else 0,
            "moved_on_leaving": 250 if leaving else 0, "moved_others": moved_others,
            "lost_writes": 0}


def test_rebalance_verdicts_judge_maglev_and_pinned() -> None:
    maglev = _run("maglev", False, [_step("3->4", 0.26, 0.25, None),
                                    _step("4->3", 0.26, 0.25, "m3"),
                                    _step("3->2", 0.34, 0.333, "m0", moved_others=2)], 0.26)
    ring = _run("ring_hash", False, [_step("3->4", 0.9, 0.25, None)], 0.3)
    pinned = _run("pinned", True, [_step("3->4", 0.0, 0.25, None),
                                   _step("4->3", 0.125, 0.25, "m3"),
                                   _step("3->2", 0.3, 0.333, "m0", moved_others=1)], 0.1)
    found = {v.name: v for v in rebalance.verdicts({"sessions": 1000,
                                                    "runs": [maglev, ring, pinned]})}
    assert found["rebalance maglev 3->4: moved fraction"].met
    assert not any(n.startswith("rebalance ring_hash 3->4") for n in found)  # not judged
    assert found["rebalance ring_hash N=3: lost writes"].met
    assert found["rebalance pinned 3->4: moved fraction"].met
    assert found["rebalance pinned 4->3: others' sessions moved"].met
    others = found["rebalance pinned 3->2: others' sessions moved"]
    assert others.met is False and "maglev moved 2 others'" in others.reference
    share = found["rebalance pinned N=3: new sessions to the new member"]
    assert share.met is False and share.target == round(0.25 / 1.5 - 0.0411, 4)


def test_summary_reads_verdicts_and_draws(tmp_path: Path) -> None:
    verdicts = [benchlib.Verdict("fast enough", 50.0, 100.0, "ms"),
                benchlib.Verdict("throughput", 0.5, 1.0, "x", at_most=False),
                benchlib.Verdict("lost writes", 0, 0, "writes")]
    (tmp_path / "one.json").write_text(json.dumps({
        "benchmark": "one", "quick": True, "env": {"loadavg_at_start": [1.0, 1.0, 1.0]},
        "verdicts": [v.as_dict() for v in verdicts]}))
    (tmp_path / "junk.json").write_text("not json")
    rows = summary.load(tmp_path)
    assert [r["met"] for r in rows] == [True, False, True]
    assert [summary._score(r) for r in rows] == [0.5, 2.0, 0.1]
    out = summary.draw(rows, tmp_path / "summary.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _gc_round(rate: float, cpu: float, gc_ms: float | None) -> dict[str, object]:
    return {"writes_per_s": rate, "sidecar_cpu_us_per_session": cpu,
            "gc_ms_per_1k_sessions": gc_ms, "gc_collections": [0, 0, 0],
            "gc_longest_ms": 0.0, "gc_threshold": [700, 10, 10]}


def test_statesync_gc_ratios_and_verdicts() -> None:
    runs = {"bulk16": {
        "shipped": [_gc_round(9000, 90, 0.5), _gc_round(7000, 110, 0.3),
                    _gc_round(8000, 100, 0.4)],
        "python-default": [_gc_round(7500, 104, 8.0), _gc_round(8500, 96, 6.0),
                           _gc_round(6500, 120, 10.0)]}}
    summary_ = statesync_gc.summarize(runs)["bulk16"]
    assert summary_["shipped"]["median_run"]["writes_per_s"] == 8000
    assert summary_["python-default"]["median_run"]["writes_per_s"] == 7500
    # Medians of all rounds, whichever round was the median by rate.
    assert summary_["ratio_gc_ms_per_1k_sessions"] == 0.05
    assert summary_["ratio_sidecar_cpu_us_per_session"] == round(100 / 104, 3)
    [verdict] = statesync_gc.verdicts({"workloads": {"bulk16": summary_}})
    assert verdict.met is True and verdict.measured == 0.05
    assert verdict.reference == "0.4 vs 8.0 ms per 1,000 sessions"

    # The shipped setting collecting half as much as the default or more misses.
    runs["bulk16"]["shipped"] = [_gc_round(8000, 100, 5.0)]
    runs["bulk16"]["python-default"] = [_gc_round(8000, 100, 8.0)]
    [verdict] = statesync_gc.verdicts({"workloads": statesync_gc.summarize(runs)})
    assert verdict.met is False


def test_statesync_path_runs_the_sidecars_write_path_in_process() -> None:
    """The in-process benchmark drives the real request path: every PUT answered 2xx,
    its write acknowledged from (in-process) etcd's answer."""
    for load in ("floor", "put", "bulk"):
        measured = asyncio.run(statesync_path.measure(load, rounds=3, repeats=1))
        assert measured["us_per_request"] > 0 and measured["calls_per_request"] > 10
    server, etcd = statesync_path._server("put")
    assert etcd is not None
    assert asyncio.run(_one_round(server)) == statesync_path.PIPELINED


async def _one_round(server: Any) -> int:
    connection = statesync_path.Connection(server.site)
    transport = statesync_path._Transport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    connection.data_received(statesync_path._requests("put", 0))
    for _ in range(8):
        await asyncio.sleep(0)
    return transport.answers  # a 2xx each


def test_statesync_ratios_pair_each_run_with_raw_beside_it() -> None:
    """A run's ratio is over raw's rate at that moment: interpolated between the raw
    runs around it, the nearest one at the ends; a drift of the machine's speed that
    moves raw and the sidecar alike leaves the ratio where it is."""
    # The machine slows down steadily; the sidecar always writes at 1.5x raw.
    speed = [1.0 - 0.05 * i for i in range(12)]
    sequence: list[tuple[str, float]] = []
    for i, s in enumerate(speed):
        mode = ("raw", "bulk16", "batched")[i % 3]
        sequence.append((mode, 1000 * s * (1.0 if mode == "raw" else 1.5)))
    ratios = statesync.paired_ratios(sequence)
    assert set(ratios) == {"bulk16", "batched"} and len(ratios["bulk16"]) == 4
    # Inside: exact; after the last raw run: the nearest raw (here faster than the run).
    assert all(abs(r - 1.5) < 1e-9 for r in ratios["bulk16"][:3] + ratios["batched"][:3])
    assert ratios["batched"][-1] < 1.5
    # No raw run: no ratio; one raw run: every ratio is to it.
    assert statesync.paired_ratios([("bulk16", 10.0)]) == {}
    assert statesync.paired_ratios([("bulk16", 10.0), ("raw", 5.0)]) == {"bulk16": [2.0]}
    assert statesync.paired_ratios([("raw", 4.0), ("x", 6.0), ("raw", 8.0)]) == {"x": [1.0]}


def test_session_moves_count_changes_of_member_from_where_the_session_was() -> None:
    from meshxl.local.flap import session_moves

    def rec(t: float, session: str, member: str | None, status: int = 200) -> Record:
        return Record(sent=t, ended=t + 0.01, session=session, status=status, member=member)

    records = [rec(0, "s1", "a"), rec(1, "s1", "b"), rec(2, "s1", "b", 503),
               rec(3, "s1", "a"), rec(4, "s1", "a"), rec(0.5, "s2", "a"),
               rec(2.5, "s2", "a"), rec(9, "s1", "b")]
    # s1: a (before) -> b -> (a failed request counts nothing) -> a; s2 never moved.
    assert session_moves(records, since=0.9, until=5) == {"s1": 2, "s2": 0}
    assert session_moves(records) == {"s1": 3, "s2": 0}


def test_flap_verdicts_judge_the_hold_against_one_move_per_flap() -> None:
    def run(policy: str, most: int, flaps: int = 5, failed: int = 0) -> dict[str, object]:
        return {"policy": policy, "flaps": flaps, "failed_requests": failed,
                "moves_per_session": {"min": most, "max": most, "mean": most},
                "moves_per_session_per_flap": most / flaps}

    found = {v.name: v for v in flap.verdicts([run("none", 10), run("automatic", 2),
                                                run("manual", 1)])}
    assert found["automatic failback: moves per session per flap"].met
    assert "10 moves per session" in found["manual failback: moves per session (all flaps)"
                                          ].reference
    missed = flap.verdicts([run("automatic", 10), run("manual", 2, failed=1)])
    assert [v.met for v in missed] == [False, False, True, False]


def test_the_protocol_rows_have_one_target_per_figure() -> None:
    import failover_protocols

    rows = failover_protocols.verdicts({
        "grpc": {"failed": 0, "requests": 10, "repeats": 1, "lost_writes": 0,
                 "acknowledged_writes": 10, "rto_ms": {"p50": 20.0, "p99": 150.0}},
        "tcp": {"failed": 1, "requests": 10, "repeats": 1, "lost_writes": 0,
                "acknowledged_writes": 9, "reconnect_ms": {"p99": 120.0},
                "break_to_answer_ms": {"p99": 80.0}, "state_intact": True},
    })
    assert [(v.name, v.met) for v in rows] == [
        ("failover gRPC unary: failed", True),
        ("failover gRPC unary: lost acknowledged writes", True),
        ("failover gRPC unary: RTO p99", False),
        ("failover TCP: failed", False),
        ("failover TCP: lost acknowledged writes", True),
        ("failover TCP: reconnect p99 (kill -> first answer)", True),
    ]


def test_cold_start_orders_and_verdicts() -> None:
    import random

    import coldstart

    from meshxl.local.coldstart import PARTS, random_orders

    orders = random_orders(5, random.Random(7))
    assert len(orders) == 5 and all(sorted(o) == sorted(PARTS) for o in orders)
    assert orders[-1][-1] == "etcd"  # the last order starts etcd last

    def result(lost: int, exited: int, worst: float) -> dict[str, object]:
        return {"first_start_seconds": 2.5, "lost": lost, "exited": exited,
                "orders": [{"seconds": 1.0}, {"seconds": worst}]}

    assert all(v.met for v in coldstart.verdicts(result(0, 0, 3.0)))
    assert [v.met for v in coldstart.verdicts(result(1, 0, 3.0))] == [False, True, True]
    assert [v.met for v in coldstart.verdicts(result(0, 1, 30.0))] == [True, False, False]


def test_dualsite_verdicts_hold_every_site_loss_to_its_targets() -> None:
    import dualsite

    def run(lost: int = 0, failed: int = 0, rto_max: float = 1500.0,
            ratio: float = 1.05, unverified: int = 0) -> dict[str, object]:
        loss = {"lost_writes": lost, "surviving_failed": failed, "unrecovered": [],
                "rto": {"max": rto_max}, "unverified_writes": unverified}
        return {"rtts": [
            {"rtt_ms": 0.0, "writes_leader_near": {"sidecar_ms": {"p50": 3.0}}},
            {"rtt_ms": 20.0, "losses": [loss], "writes_leader_near": {
                "ratio_p50": ratio, "raw_etcd_ms": {"p50": 24.0}}}]}

    assert all(v.met for v in dualsite.verdicts(run()))
    assert [v.met for v in dualsite.verdicts(run(lost=1, rto_max=70_000.0, ratio=2.0))] == [
        False, True, True, True, False, False]
    # Writes of sessions that could not be read back are judged on their own.
    assert [v.met for v in dualsite.verdicts(run(unverified=3))] == [
        True, False, True, True, True, True]


def test_shard_verdicts_compare_like_with_like() -> None:
    import statesync_shards

    def cpu(shards: int, writers: int, per_write: float, batch: float) -> dict[str, Any]:
        return {"shards": shards, "writers": writers, "lost": 0,
                "sidecar_cpu_us_per_write": per_write, "writes_per_transaction": batch}

    # Unsharded: 30 us a write + 640 us a transaction shared by its batch.
    modes = [cpu(0, 8, 110.0, 8.0), cpu(0, 16, 70.0, 16.0), cpu(0, 32, 70.0, 16.0),
             cpu(0, 64, 55.0, 25.6), cpu(1, 32, 71.0, 16.0), cpu(2, 32, 110.0, 8.0),
             cpu(2, 64, 78.0, 13.3)]
    extras = [{"shards": 2, "writers": 32, "lost": 0, "reshard_moved_fraction": 0.34,
               "reshard": {"moved_fraction": 0.33, "moved": 33, "sessions": 100,
                           "seconds": 1.5, "failed_during": 0, "lost": 0,
                           "writes_during": 100},
               "one_down": {"of": 3, "failed_fraction": 0.33, "others_failed": 0},
               "others_while_down": {"of": 3, "rate_ratio": 1.2, "p99_ratio": 0.8,
                                     "up": {"writes_per_s": 3000.0, "p50_ms": 6.0,
                                            "p99_ms": 12.0},
                                     "down": {"writes_per_s": 3600.0, "p50_ms": 5.0,
                                              "p99_ms": 9.6}}}]
    a, b = statesync_shards.curve(modes)
    assert abs(a - 30.0) < 1.0 and abs(b - 640.0) < 10.0, (a, b)
    found = {v.name: v.met for v in statesync_shards.verdicts({"modes": modes,
                                                               "extras": extras})}
    assert all(found.values()), found
    # K = 2 at one sidecar load costs 1.57x unsharded per write, as its batch of 8 does
    # unsharded: no verdict misses. A write dearer than its batch explains does.
    extras[0]["one_down"] = {"of": 3, "failed_fraction": 0.2, "others_failed": 4}
    extras[0]["reshard"]["lost"] = 1
    extras[0]["others_while_down"].update(rate_ratio=0.6, p99_ratio=2.0)
    modes[6]["sidecar_cpu_us_per_write"] = 90.0
    modes[4]["sidecar_cpu_us_per_write"] = 80.0
    found = {v.name: v.met for v in statesync_shards.verdicts({"modes": modes,
                                                               "extras": extras})}
    assert [name for name, met in found.items() if not met] == [
        "K=1, 32 writers: sidecar CPU per write / unsharded",
        "K=1, 32 writers: sidecar CPU per write / unsharded at its batch",
        "K=2, 64 writers: sidecar CPU per write / unsharded at its batch",
        "K=2 -> 3 online: writes failed or lost",
        "one of 3 shards down: the others' writes/s / all up",
        "one of 3 shards down: the others' p99 latency / all up",
        "one of 3 shards down, failing writes off 1/3 by",
        "one of 3 shards down, other shards' writes failing"], found


def test_the_footprints_model_has_a_cluster_per_replication() -> None:
    from meshxl.model import parse_model

    model = parse_model(footprint.model())
    assert {c.name: c.sessions.replication for c in model.clusters} == {
        cluster: replication for replication, cluster in footprint.CLUSTERS.items()}
    assert len(footprint.document("all-0000001", 1024)) == 1024


def test_mapped_names_the_extensions_a_process_maps(tmp_path: Path) -> None:
    import _json

    mapped_here = footprint.mapped([Path(_json.__file__), tmp_path / "none.so"])
    assert mapped_here == {Path(_json.__file__)}
    assert footprint.mapped([Path(_json.__file__)], pid=2**22 + 1) == set()


def test_ab_compares_the_figures_asked_for() -> None:
    result = {"loads": {"put": {"us_per_request": 90.5, "runs_us": [1.0]},
                        "floor": {"us_per_request": 40}}, "quick": True, "seconds": 3.2}
    assert ab.figures(result, ("us_per_request",)) == {
        "loads.put.us_per_request": 90.5, "loads.floor.us_per_request": 40.0}
    assert ab.figures(result, ("seconds", "quick")) == {"seconds": 3.2}
    # List items by position (bench/sidecar_memory.py's sidecars, one per replication).
    owned = {"owned": [{"idle": {"rss_mb": 47.5}}, {"idle": {"rss_mb": 47.4}}]}
    assert ab.figures(owned, ("rss_mb",)) == {"owned.0.idle.rss_mb": 47.5,
                                              "owned.1.idle.rss_mb": 47.4}



def test_dapr_state_verdicts_take_each_apis_ratio_to_native() -> None:
    def kind(us: float, ratio: float) -> dict[str, float]:
        return {"cpu_us_per_save": us, "ratio_to_native": ratio, "saves_per_s": 1000}

    res = {"failed": 0, "kinds": {"native": kind(100, 1.0), "dapr-http": kind(96, 0.96),
                                  "dapr-grpc": kind(130, 1.3)}}
    http, grpc, failed = dapr_state.verdicts(res)
    assert (http.measured, http.met) == (0.96, True)
    assert (grpc.measured, grpc.met) == (1.3, False) and grpc.target == dapr_state.TARGET
    assert "native 100 us" in grpc.reference and failed.met is True
    res["failed"] = 3
    assert dapr_state.verdicts(res)[-1].met is False
