"""The alerts and the docs say what the code guarantees.

Each guarantee below names the test that proves it against the real parts, and the
wording that would contradict it. Every alert's summary and description (the rules
file operators load) and every page of the docs is checked against the list, so a
sentence that promises what the code does not do (or warns of what it cannot do)
fails here, not in an operator's hands.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Guarantee:
    what: str
    contradicted_by: re.Pattern[str]
    proof: str
    """``path::test_function`` of the test that proves it."""


GUARANTEES = [
    Guarantee(
        "replication lag never serves an older state: every read of a cached session is "
        "checked against etcd's revision first, so lag costs a read from etcd",
        re.compile(r"stale sessions?|older than (its|their) last write|"
                   r"(serve|answer)s? (a )?sessions? older", re.I),
        "tests/integration/test_statesync.py::"
        "test_a_read_on_a_lagging_cache_answers_the_current_state"),
    Guarantee(
        "without a pin an overloaded member's hashed sessions move (Envoy's hash balancers "
        "place nothing on a DEGRADED host); only pinned sessions stay",
        re.compile(r"overloaded member(?![^.|]*pinned)[^.|]*keeps its sessions", re.I),
        "tests/integration/test_pinned_sessions.py::"
        "test_overload_without_a_pin_moves_the_hashed_sessions_of_the_member"),
    Guarantee(
        "a tier whose members are all overloaded keeps taking new sessions (they are sent "
        "healthy, active-attention): overload never fails a new session with 503",
        re.compile(r"overload[^.|]*(every|all) new sessions? (gets?|fails?)", re.I),
        "tests/integration/test_pinned_sessions.py::"
        "test_an_overloaded_member_keeps_its_pinned_sessions_and_gets_no_new_ones"),
    Guarantee(
        "when every member reports a problem the best one keeps serving "
        "(failover.all_withdrawn: keep-best), pinned sessions included",
        re.compile(r"problems? (on|from|of) every member[^.|]*(withdraws? (them|every)|"
                   r"total outage|503)", re.I),
        "tests/integration/test_problems_fallback.py::"
        "test_every_member_with_a_problem_keeps_the_best_one_serving"),
]


def texts() -> list[tuple[str, str]]:
    """(where, text) of every alert annotation and every docs paragraph."""
    found = []
    rules = yaml.safe_load((ROOT / "deploy/prometheus/meshxl-rules.yaml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            for key, text in rule.get("annotations", {}).items():
                found.append((f"alert {rule['alert']} {key}", " ".join(text.split())))
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for number, paragraph in _paragraphs(path.read_text()):
            found.append((f"{path.relative_to(ROOT)}:{number}", paragraph))
    return found


def _paragraphs(text: str) -> list[tuple[int, str]]:
    out, start, lines = [], 1, []
    for number, line in enumerate(text.splitlines() + [""], 1):
        if line.strip():
            if not lines:
                start = number
            lines.append(line.strip())
        elif lines:
            out.append((start, " ".join(lines)))
            lines = []
    return out


@pytest.mark.parametrize("guarantee", GUARANTEES, ids=[g.proof.rsplit("::", 1)[1]
                                                        for g in GUARANTEES])
def test_nothing_operators_read_contradicts_a_guarantee(guarantee: Guarantee) -> None:
    path, test = guarantee.proof.split("::")
    assert re.search(rf"^async def {test}\(|^def {test}\(", (ROOT / path).read_text(), re.M), \
        f"the proof of {guarantee.what!r} is gone: {guarantee.proof}"
    wrong = [f"{where}: {m.group(0)!r}" for where, text in texts()
             if (m := guarantee.contradicted_by.search(text))]
    assert not wrong, f"contradicts {guarantee.what!r}:\n" + "\n".join(wrong)


def test_the_check_would_catch_the_old_wording() -> None:
    old = ("The 99th percentile ... has been above 250 ms for 10 minutes: a failover now "
           "may serve sessions older than their last write.")
    assert GUARANTEES[0].contradicted_by.search(old)
    assert GUARANTEES[1].contradicted_by.search(
        "an overloaded member (`PUT /v1/overload` on its sidecar) keeps its sessions and "
        "gets no new ones")
    assert not GUARANTEES[1].contradicted_by.search(
        "an overloaded member keeps its pinned sessions and gets no new ones")
