"""The sidecar's random spreads (``meshxl.spread``) stay in their ranges and reach every
value of them."""

from __future__ import annotations

from collections import Counter

import pytest

from meshxl import spread


def test_uniform_stays_in_its_range_and_spreads_over_it() -> None:
    draws = [spread.uniform(0.8, 1.2) for _ in range(2000)]
    assert all(0.8 <= d < 1.2 for d in draws)
    assert min(draws) < 0.82 and max(draws) > 1.18
    assert 0.98 < sum(draws) / len(draws) < 1.02


def test_below_reaches_every_value_about_evenly() -> None:
    seen = Counter(spread.below(3) for _ in range(3000))
    assert set(seen) == {0, 1, 2}
    assert min(seen.values()) > 800
    assert spread.below(1) == 0


def test_below_an_empty_range_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty range"):
        spread.below(0)
