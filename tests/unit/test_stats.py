"""meshxl.stats: the one percentile definition (nearest rank) and summary of every report."""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshxl import stats
from meshxl.telemetry import slo

values = st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=60)
fractions = st.integers(0, 100).map(lambda pct: pct / 100)


def test_nearest_rank_on_known_values() -> None:
    hundred = [float(v) for v in range(1, 101)]
    assert stats.quantile(hundred, 0.5) == 50.0
    assert stats.quantile(hundred, 0.99) == 99.0
    assert stats.quantile(hundred, 0.07) == 7.0  # 0.07 * 100 is 7.000000000000001
    assert stats.quantile([5.0, 1.0, 3.0, 2.0], 0.5) == 2.0  # no midpoint of 2 and 3
    assert stats.quantile([1.0, 2.0, 3.0, 4.0, 100.0], 0.99) == 100.0
    assert stats.quantile([7.0], 0.0) == stats.quantile([7.0], 1.0) == 7.0
    assert stats.quantile([], 0.5) is None
    for bad in (-0.01, 1.01, math.nan):
        with pytest.raises(ValueError):
            stats.quantile([1.0], bad)


@settings(max_examples=200, deadline=None)
@given(values, fractions)
def test_quantile_is_the_smallest_observed_value_covering_q(data: list[float], q: float) -> None:
    value = stats.quantile(data, q)
    assert value in data
    n = len(data)
    # At least q * n values are at or below it, and it is the smallest such value.
    assert sum(v <= value for v in data) >= math.ceil(round(q * n, 9))
    assert sum(v < value for v in data) < max(1, math.ceil(round(q * n, 9)))


@settings(max_examples=100, deadline=None)
@given(values)
def test_slo_review_percentiles_are_the_stats_definition(data: list[float]) -> None:
    objective = slo.Objective(name="o", sli="rto_ms", target=0.5, op="lt", threshold=0.0,
                              display_name="")
    result = slo._evaluate(objective, data, (0, 0))
    assert (result.p50, result.p90, result.p99, result.max) == (
        stats.quantile(data, 0.5), stats.quantile(data, 0.9), stats.quantile(data, 0.99),
        max(data))


def test_summary() -> None:
    assert stats.summary([]) == {"n": 0}
    s = stats.summary([3.0, 1.0, 2.0, 10.0], digits=2)
    assert s == {"n": 4, "min": 1.0, "p50": 2.0, "p90": 10.0, "p99": 10.0, "max": 10.0,
                 "mean": 4.0}
    assert stats.summary([1.0, 2.0], digits=1)["mean"] == 1.5


def test_process_figures_of_a_live_and_a_missing_process() -> None:
    rss, cpu = stats.rss_bytes(os.getpid()), stats.cpu_seconds(os.getpid())
    assert rss is not None and rss > 1024 * 1024
    assert cpu is not None and cpu > 0
    gone = max(os.getpid(), 2**22) + 1  # above pid_max: no such process
    assert stats.rss_bytes(gone) is None and stats.cpu_seconds(gone) is None
