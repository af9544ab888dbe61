"""The pure parts of ``bench/grayfailure.py``: per-second p99 with stuck requests,
SLO-breach seconds, lost writes, session moves, the control plane's degraded members,
the arms' order and the verdicts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import grayfailure as g  # noqa: E402

from meshxl.local.traffic import Record  # noqa: E402


def rec(sent: float, took: float, session: str = "s1", member: str = "a", status: int = 200,
        seq: int | None = None) -> Record:
    return Record(sent, sent + took, session, status, member, seq)


def test_arms_alternate_which_runs_first() -> None:
    assert g.arm_order(0) == ("outlier", "meshxl")
    assert g.arm_order(1) == ("meshxl", "outlier")
    assert g.arm_order(2) == g.arm_order(0)


def test_per_second_p99_counts_requests_still_waiting_with_their_age() -> None:
    fast = [rec(100.0 + i / 100, 0.005, f"f{i}") for i in range(300)]  # 3 s of fast
    # three sessions (of a hundred answers a second) wait from 100.2 to 102.7
    stuck = [rec(100.2, 2.5, f"stuck{i}") for i in range(3)]
    p99s = g.per_second_p99([*fast, *stuck], 100.0, 103.0)
    assert len(p99s) == 3
    # second 0: they are 0.8 s old at its end; second 1: 1.8 s old; second 2: they
    # finished in it after 2.5 s
    assert p99s == [pytest.approx(0.8), pytest.approx(1.8), pytest.approx(2.5)]
    assert g.breach_seconds(p99s, 1.0) == 2
    assert g.per_second_p99(fast, 100.0, 103.0) == [pytest.approx(0.005)] * 3
    one = g.per_second_p99([*fast, stuck[0]], 100.0, 103.0)  # 1 in 101: under the p99
    assert one == [pytest.approx(0.005)] * 3


def test_served_per_second_counts_one_members_answers_in_each_whole_second() -> None:
    records = [rec(99.9, 0.01, member="b"),  # before the window
               *(rec(100.0 + i / 10, 0.01, member="b") for i in range(25)),  # 2.5 s
               rec(100.5, 0.01, member="a"),  # another member
               rec(103.0, 0.01, member="b")]  # at the window's end: not in it
    assert g.served_per_second(records, "b", 100.0, 103.0) == [10, 10, 5]
    assert g.served_per_second(records, "b", 100.0, 100.0) == []
    assert g.served_per_second(records, "c", 100.0, 102.0) == [0, 0]


def test_the_healthy_p99_is_the_median_half_seconds_not_one_burst() -> None:
    steady = [rec(10.0 + i / 100, 0.010, f"s{i}") for i in range(400)]  # 4 s of 10 ms
    burst = [rec(11.0 + i / 100, 0.300, f"b{i}") for i in range(20)]  # one bad half-second
    assert g.typical_p99([*steady, *burst], 10.0, 14.0) == pytest.approx(0.010)
    assert g.typical_p99([], 10.0, 14.0) is None


def test_a_failed_request_is_infinitely_slow_and_an_empty_second_is_none() -> None:
    p99s = g.per_second_p99([rec(10.1, 0.01, status=503), rec(12.2, 0.01)], 10.0, 13.0)
    assert p99s[0] == float("inf") and p99s[1] is None
    assert p99s[2] == pytest.approx(0.01)
    assert g.breach_seconds(p99s, 0.1) == 1


def test_regressions_count_acknowledged_writes_undone() -> None:
    assert g.regressions([rec(1, 0.1, seq=1), rec(2, 0.1, seq=2), rec(3, 0.1, seq=3)]) == 0
    # 5 then 3: the writes 3, 4 and 5 were undone; failed answers are no evidence
    records = [rec(1, 0.1, seq=4), rec(2, 0.1, seq=5), rec(3, 0.1, seq=3),
               rec(4, 0.1, status=503), rec(5, 0.1, seq=4)]
    assert g.regressions(records) == 3


def test_session_moves_count_changes_of_member_within_the_window() -> None:
    records = [rec(1, 0.1, "x", "a"), rec(1, 0.1, "y", "b"),
               rec(5, 0.1, "x", "a"), rec(5, 0.1, "y", "c"),  # y moves off the sick b
               rec(6, 0.1, "y", "b"), rec(7, 0.1, "y", "c"),  # back and off again
               rec(20, 0.1, "x", "c")]  # after the window
    moves = g.session_moves(records, 4.0, 10.0)
    assert moves == {"sessions": 1, "moves": 3, "from_sick": 2}


def test_degraded_entries_read_the_demo_cluster_only() -> None:
    assert g.degraded_entries({}) == {}
    assert g.degraded_entries({"degraded": "nonsense"}) == {}
    status: dict[str, Any] = {"degraded": {
        "demo": {"b": {"since": 1.0, "reason": "p90 4x peers", "share": 0.5}},
        "other": {"a": {}}}}
    assert g.degraded_entries(status) == {
        "b": {"since": 1.0, "reason": "p90 4x peers", "share": 0.5}}


def test_ratio_and_compare() -> None:
    assert g.ratio(1, 5) == 0.2 and g.ratio(0, 0) == 1.0
    assert g.ratio(3, 0) is None and g.ratio(None, 1) is None
    arms = {"outlier": {"breach_seconds": 10, "failed": 0, "sessions_moved": 4, "lost": 0},
            "meshxl": {"breach_seconds": 2, "failed": 0, "sessions_moved": 6, "lost": 0}}
    assert g.compare(arms) == {"breach_seconds": 0.2, "failed": 1.0, "sessions_moved": 1.5,
                               "lost": 1.0}


def arm(breach: int, detect: float | None = None, lost: int = 0) -> dict[str, Any]:
    return {"breach_seconds": breach, "detect_s": detect, "lost": lost}


def test_verdicts_judge_the_issues_targets() -> None:
    res = {"scenarios": {
        "latency": {"arms": {"outlier": arm(20), "meshxl": arm(3, detect=2.1)}},
        "cpu": {"arms": {"outlier": arm(20), "meshxl": arm(20, lost=1)}},
        "errors": {"arms": {"outlier": arm(0), "meshxl": arm(0)}}},
        "soak": {"lost": 0, "degraded_verdicts": 2, "seconds": 600, "kills": [{}] * 10}}
    got = {v.name: v for v in g.verdicts(res)}
    assert got["latency 10x: detected (meshxl)"].met is True
    assert got["latency: SLO-breach seconds meshxl/outlier"].measured == 0.15
    assert got["latency: SLO-breach seconds meshxl/outlier"].met is True
    assert got["cpu: SLO-breach seconds meshxl/outlier"].met is False
    assert got["errors: SLO-breach seconds meshxl/outlier"].met is True  # 0 and 0
    assert got["acknowledged writes lost (every run)"].measured == 1
    assert got["soak: DEGRADED verdicts (false moves)"].met is False
    undetected = g.verdicts({"scenarios": {"latency": {"arms": {
        "outlier": arm(20), "meshxl": arm(20)}}}})
    assert undetected[0].met is None  # no degraded members reported: not measured
    missed = g.verdicts({"scenarios": {"latency": {"arms": {"outlier": arm(20), "meshxl": {
        **arm(20), "control_plane_reports_degraded": True, "seconds": 30}}}}})
    assert missed[0].measured == 30.0 and missed[0].met is False  # never within the fault


def test_fault_values_follow_the_calibration() -> None:
    assert g.fault_values("latency", 21.0) == {"delay_ms": 210.0}
    assert g.fault_values("errors", 21.0) == {"fail_fraction": 0.2}
    assert g.fault_values("cpu", 21.0) == {}
