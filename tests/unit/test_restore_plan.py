"""What ``meshxl restore bump`` refuses and what ``meshxl restore check`` advises
(``meshxl.operator.restore``), without etcd: the bound is decided from etcd's revision
and ``--past`` alone, before anything is written. The real thing:
``tests/integration/test_restore_bump.py``."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from meshxl.cli import main
from meshxl.operator.restore import (
    MAX_REVISION,
    MAX_WRITES,
    Checked,
    bump_refusal,
    writes_to_pass,
)

revisions = st.integers(0, MAX_REVISION - 1)


def test_a_bump_writes_until_one_past() -> None:
    assert writes_to_pass(10, 15) == 6  # 11 .. 16: past 15
    assert writes_to_pass(16, 15) == 0  # already past: the compaction alone
    assert bump_refusal(10, 10 + MAX_WRITES - 1) is None
    refused = bump_refusal(10, 10 + MAX_WRITES)
    assert refused is not None and "10,000,001 revisions ahead" in refused
    assert "10,000,000 at most" in refused and "--bump-revision" in refused


@pytest.mark.parametrize("past", [-1, MAX_REVISION, 2**64, 10**30])
def test_a_revision_etcd_cannot_pass_is_refused_whatever_the_bound(past: int) -> None:
    refused = bump_refusal(0, past, max_writes=2**200)
    assert refused is not None and str(MAX_REVISION) in refused and "64-bit" in refused


@given(revisions, revisions, st.integers(1, 10**12))
def test_the_bound_is_the_writes_the_bump_would_make(revision: int, past: int,
                                                     max_writes: int) -> None:
    refused = bump_refusal(revision, past, max_writes)
    assert (refused is None) == (writes_to_pass(revision, past) <= max_writes)
    if refused is not None:  # one line, naming the bound and what to do instead
        assert "\n" not in refused and f"{max_writes:,} at most" in refused


@given(revisions, revisions, st.booleans())
def test_check_never_advises_a_bump_the_bump_would_refuse(revision: int, past: int,
                                                          compacted: bool) -> None:
    checked = Checked(revision, past, compacted)
    advised = "meshxl restore bump --past" in checked.advice
    assert advised == checked.bumpable == (bump_refusal(revision, past) is None)
    if not advised:
        assert "etcdutl snapshot restore" in checked.advice and "--max-writes" in checked.advice


def test_the_command_line_bounds_are_the_operator_s() -> None:
    runner = CliRunner()
    shown = runner.invoke(main, ["restore", "bump", "--help"]).output
    assert f"[default: {MAX_WRITES:,}]" in " ".join(shown.split()), shown
    refused = runner.invoke(main, ["restore", "check", "--past", str(2**64)])
    assert refused.exit_code == 2 and str(MAX_REVISION) in refused.output, refused.output
    refused = runner.invoke(main, ["restore", "bump", "--past", "ten"])
    assert refused.exit_code == 2 and "is not a revision" in refused.output, refused.output
