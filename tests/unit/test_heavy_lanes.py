"""The heavy lanes of tests/conftest.py: the second lane names modules that exist and
hold heavy tests, so a renamed or moved module cannot leave the lanes unbalanced
unnoticed (a name that matches nothing would put its tests in the first lane)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import HEAVY_LANE_B

TESTS = Path(__file__).resolve().parents[1]


def test_the_second_lane_names_modules_with_heavy_tests() -> None:
    for name in sorted(HEAVY_LANE_B):
        found = [p for p in TESTS.rglob(f"{name}.py") if "unit" not in p.parts]
        assert len(found) == 1, (name, found)
        assert "pytest.mark.heavy" in found[0].read_text(), found[0]
