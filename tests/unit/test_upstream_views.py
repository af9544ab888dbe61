"""One node, one view (meshxl.xds.upstream): a node that floods a host with answers,
slow or fast, or fails them all, weighs no more than any other reporting node."""

from __future__ import annotations

import pytest

from meshxl.xds.upstream import MAX_VIEWS, HostSample, UpstreamSignals

T0 = 1_700_000_000.0
HOST = "10.0.0.1:80"


def feed(s: UpstreamSignals, node: str, n: int, seconds: float, failed: bool = False,
         window: int = 0) -> None:
    for i in range(n):
        s.record("web", HOST, seconds, failed, T0 + window * 0.5 + 0.4 * i / n, node)


def sample(s: UpstreamSignals, windows: int = 1) -> HostSample:
    return s.summary("web", T0, T0 + 0.5 * windows)[HOST]


def test_one_node_flooding_slow_answers_is_one_voice() -> None:
    s = UpstreamSignals()
    feed(s, "edge-1", 20, 0.010)
    feed(s, "edge-2", 20, 0.012)
    feed(s, "liar", 2000, 0.500)
    got = sample(s)
    assert got.p90 == pytest.approx(0.012, rel=0.05)
    assert got.requests == 60  # the liar counts as much as the busiest other node


def test_one_node_flooding_fast_answers_masks_nothing() -> None:
    s = UpstreamSignals()
    feed(s, "edge-1", 20, 0.200)
    feed(s, "edge-2", 20, 0.210)
    feed(s, "liar", 2000, 0.001)
    assert sample(s).p90 == pytest.approx(0.200, rel=0.05)


def test_error_shares_are_the_median_of_the_nodes() -> None:
    s = UpstreamSignals()
    feed(s, "edge-1", 20, 0.010)
    feed(s, "edge-2", 20, 0.010)
    feed(s, "liar", 500, 0.010, failed=True)
    assert sample(s).errors == 0
    feed(s, "edge-3", 20, 0.010, failed=True)
    feed(s, "edge-4", 20, 0.010, failed=True)
    got = sample(s)
    assert got.errors == got.requests == 100  # most nodes see failures: they count


def test_one_node_is_its_view_unchanged_and_views_merge_across_windows() -> None:
    s = UpstreamSignals()
    feed(s, "edge", 10, 0.010)
    feed(s, "edge", 10, 0.030, window=1)
    got = sample(s, windows=2)
    assert got.requests == 20 and got.p50 == pytest.approx(0.010, rel=0.05)
    assert got.p90 == pytest.approx(0.030, rel=0.05)
    # a second node over the same span: each node's windows merge before the median
    feed(s, "edge-2", 20, 0.030, window=1)
    assert sample(s, windows=2).p50 == pytest.approx(0.020, rel=0.05)


def test_nodes_past_the_bound_share_one_view() -> None:
    s = UpstreamSignals()
    for i in range(MAX_VIEWS):
        feed(s, f"edge-{i}", 10, 0.010)
    for i in range(50):  # fifty more nodes, all slow: one more voice
        feed(s, f"more-{i}", 1, 1.0)
    got = sample(s)
    assert got.p90 == pytest.approx(0.010, rel=0.05)
    assert got.requests == MAX_VIEWS * 10 + 10  # the pool capped at the busiest other
