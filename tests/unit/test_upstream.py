"""meshxl.xds.upstream: per upstream host windows, merging, percentile accuracy, bounds."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshxl import stats
from meshxl.xds import upstream
from meshxl.xds.upstream import KEEP, WINDOW, HostSample, UpstreamSignals

T0 = 1_700_000_000.0  # a multiple of WINDOW: window boundaries fall on it


def test_windows_are_fixed_on_the_clock_and_only_closed_ones_are_reported() -> None:
    s = UpstreamSignals()
    s.record("web", "10.0.0.1:80", 0.010, False, T0 + 0.1)
    s.record("web", "10.0.0.1:80", 0.020, True, T0 + 0.49)
    s.record("web", "10.0.0.1:80", None, False, T0 + 0.5)  # next window
    s.record("web", "10.0.0.2:80", 0.030, False, T0 + 1.2)
    got = s.windows("web", T0, T0 + 1.5)
    assert list(got) == ["10.0.0.1:80", "10.0.0.2:80"]
    first, second, third = got["10.0.0.1:80"]
    assert (first.requests, first.errors) == (2, 1)
    assert first.p50 is not None and first.p50 == pytest.approx(0.010, rel=0.05)
    assert first.p99 == pytest.approx(0.020, rel=0.05)
    assert second == HostSample(1, 0, None, None, None)  # a request without latency
    assert third == HostSample(0, 0, None, None, None)  # no request in this window
    assert [w.requests for w in got["10.0.0.2:80"]] == [0, 0, 1]
    # A window not fully inside [since, until) is left out: the one still open...
    assert [len(v) for v in s.windows("web", T0, T0 + 1.4).values()] == [2, 2]
    # ...and one that began before since.
    assert [len(v) for v in s.windows("web", T0 + 0.1, T0 + 1.5).values()] == [2, 2]
    assert s.windows("other", T0, T0 + 1.5) == {}
    assert s.clusters() == ["web"]


def test_summary_merges_the_span() -> None:
    s = UpstreamSignals()
    for i in range(100):
        s.record("web", "[::1]:8080", (i + 1) / 1000, i % 10 == 0, T0 + i * 0.02)
    merged = s.summary("web", T0, T0 + 2.0)["[::1]:8080"]
    assert (merged.requests, merged.errors) == (100, 10)
    assert merged.p50 == pytest.approx(0.050, rel=0.05)
    assert merged.p90 == pytest.approx(0.090, rel=0.05)
    assert merged.p99 == pytest.approx(0.099, rel=0.05)
    per_window = s.windows("web", T0, T0 + 2.0)["[::1]:8080"]
    assert sum(w.requests for w in per_window) == 100
    assert sum(w.errors for w in per_window) == 10


def test_tcp_connections_count_without_latency() -> None:
    s = UpstreamSignals()
    s.record("db", "10.0.0.1:5432", None, True, T0)
    s.record("db", "10.0.0.1:5432", None, False, T0)
    assert s.summary("db", T0, T0 + WINDOW) == {"10.0.0.1:5432": HostSample(2, 1, None, None,
                                                                           None)}


def test_old_windows_are_dropped_and_late_samples_ignored() -> None:
    s = UpstreamSignals()
    for k in range(KEEP + 30):
        s.record("web", "h:1", 0.001, False, T0 + k * WINDOW)
    host = s._hosts[("web", "h:1")]  # noqa: SLF001 - the bound itself is what is tested
    assert len(host.windows) == KEEP
    s.record("web", "h:1", 0.001, False, T0)  # older than anything kept
    assert len(host.windows) == KEEP
    # A span longer than what is kept: the last KEEP windows.
    until = T0 + (KEEP + 30) * WINDOW
    assert len(s.windows("web", T0, until)["h:1"]) == KEEP
    assert sum(w.requests for w in s.windows("web", T0, until)["h:1"]) == KEEP
    # A host silent for longer than KEEP windows before the span is left out.
    assert s.windows("web", until + 2 * KEEP * WINDOW, until + 2 * KEEP * WINDOW + 1) == {}


def test_hosts_are_bounded_least_recent_forgotten() -> None:
    s = UpstreamSignals(max_hosts=3)
    for i in range(5):
        s.record("web", f"10.0.0.{i}:80", 0.001, False, T0 + i)
    s.record("api", "10.0.1.1:80", 0.001, False, T0 + 9)
    assert s.hosts() == 3 and s.forgotten == 3
    assert sorted(s.summary("web", T0, T0 + 10)) == ["10.0.0.3:80", "10.0.0.4:80"]
    assert s.clusters() == ["api", "web"]
    with pytest.raises(ValueError):
        UpstreamSignals(max_hosts=0)


def test_histogram_is_small_and_covers_100us_to_60s() -> None:
    assert upstream._BUCKETS < 200  # noqa: SLF001
    assert upstream.bucket_bounds(1)[0] == pytest.approx(1e-4)
    assert upstream.bucket_bounds(upstream._OVER) == (60.0, math.inf)  # noqa: SLF001
    for i in range(1, upstream._OVER):  # noqa: SLF001
        lower, upper = upstream.bucket_bounds(i)
        assert upper / lower <= upstream.GROWTH + 1e-9
        assert upstream._bucket(math.sqrt(lower * upper)) == i  # noqa: SLF001


def test_bad_latencies_count_as_requests_without_latency() -> None:
    s = UpstreamSignals()
    s.record("web", "h:1", -0.5, False, T0)
    s.record("web", "h:1", math.nan, True, T0)
    assert s.summary("web", T0, T0 + 1) == {"h:1": HostSample(2, 1, None, None, None)}


latencies = st.one_of(
    st.floats(1e-4, 59.9),  # the log buckets
    st.floats(0.0, 1e-4, exclude_max=True),  # below the first
    st.floats(60.0, 600.0),  # above the last
)


def _close(estimate: float | None, exact: float | None) -> bool:
    assert estimate is not None and exact is not None
    if exact < 1e-4:
        return abs(estimate - exact) <= 5e-5 + 1e-12
    if exact >= 60.0:
        return estimate >= 60.0 and estimate <= 600.0
    return abs(estimate - exact) <= exact * (math.sqrt(upstream.GROWTH) - 1) * (1 + 1e-9)


@settings(max_examples=300, deadline=None)
@given(st.lists(latencies, min_size=1, max_size=400), st.integers(0, 7))
def test_percentiles_are_within_the_stated_error_of_the_exact_ones(
        values: list[float], spread: int) -> None:
    s = UpstreamSignals()
    for i, v in enumerate(values):  # over one to eight windows: merging is exercised
        s.record("web", "h:1", v, False, T0 + (i % (spread + 1)) * WINDOW)
    got = s.summary("web", T0, T0 + 8 * WINDOW)["h:1"]
    assert got.requests == len(values)
    for q, estimate in zip(stats.PERCENTILES, (got.p50, got.p90, got.p99), strict=True):
        exact = stats.quantile(values, q)
        assert _close(estimate, exact), (q, estimate, exact)
