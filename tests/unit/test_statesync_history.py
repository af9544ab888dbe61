"""What a sidecar tells from etcd's answers about one cluster's history
(``meshxl.statesync.history``), without processes: the answers are what each test says.

The real thing (a snapshot restored under a running sidecar, with and without a watch,
and one shard of two restored) is ``tests/integration/test_etcd_restore.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from meshxl.statesync.history import History, Rewound

CLUSTER = 0xC1


@dataclass
class Header:
    """etcd's ``ResponseHeader``, the two fields that matter here."""

    revision: int
    cluster_id: int = CLUSTER


def history() -> tuple[History, list[Rewound]]:
    seen: list[Rewound] = []
    h = History()
    h.listen(seen.append)
    return h, seen


def test_answers_in_order_raise_what_was_seen() -> None:
    h, seen = history()
    for revision in (5, 9, 9, 12):
        assert h.answered(Header(revision), h.floor()) is None
    assert (h.highest, h.cluster_id, seen) == (12, CLUSTER, [])


def test_requests_in_flight_together_are_answered_in_any_order() -> None:
    # A read sent before a write was answered may carry the revision before it: etcd
    # answered it first, the client took it up later. No rewind.
    h, seen = history()
    h.answered(Header(10), h.floor())
    read, write = h.floor(), h.floor()
    assert h.answered(Header(15), write) is None
    assert h.answered(Header(11), read) is None
    assert seen == [] and h.highest == 15


def test_an_answer_below_what_was_seen_when_it_was_asked_is_a_rewind() -> None:
    h, seen = history()
    h.answered(Header(40), h.floor())
    rewound = h.answered(Header(7), h.floor())
    assert isinstance(rewound, Rewound) and seen == [rewound]
    assert (rewound.applied, rewound.now, rewound.cluster) == (40, 7, None)
    assert "went back from 40 to 7" in str(rewound)
    # The new history goes on from there: its answers are no rewind, and an answer to a
    # request sent before the rewind was found is no evidence of another one.
    before = (h.generation - 1, 40)
    assert h.answered(Header(8), h.floor()) is None
    assert h.answered(Header(3), before) is None
    assert len(seen) == 1 and h.highest == 8


def test_another_cluster_id_is_a_replaced_history_whatever_its_revision() -> None:
    h, seen = history()
    h.answered(Header(40), h.floor())
    rewound = h.answered(Header(900, cluster_id=0xC2), h.floor())
    assert rewound is not None and rewound.cluster == (CLUSTER, 0xC2)
    assert "cluster id changed from c1 to c2" in str(rewound)
    assert h.cluster_id == 0xC2 and seen == [rewound]


def test_a_session_gone_back_is_a_rewind_that_keeps_what_was_seen() -> None:
    # A restore whose revision was bumped past the old one: no header goes back, but a
    # session etcd has below the revision this sidecar held it at.
    h, seen = history()
    h.answered(Header(1_000_050), h.floor())
    rewound = h.went_back("s1", held=30, now=5)
    assert seen == [rewound] and (rewound.applied, rewound.now) == (1_000_050, 5)
    assert "session 's1' is at revision 5" in str(rewound)
    assert h.highest == 1_000_050
    assert h.answered(Header(1_000_051), h.floor()) is None


def test_a_watch_raises_what_was_seen_but_never_shows_a_rewind() -> None:
    # A watch's member may lag: its events are committed, so they raise the floor of
    # what is asked later, but nothing it brings is compared.
    h, seen = history()
    h.answered(Header(10), h.floor())
    h.watched(25)
    h.watched(12)
    assert h.highest == 25 and seen == []
    assert h.answered(Header(20), h.floor()) is not None


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 10**6)), max_size=40))
def test_one_history_answered_in_order_never_rewinds(steps: list[tuple[bool, int]]) -> None:
    """Any interleaving of answers and watch events of one history, each answer asked
    after everything before it was taken up: never a rewind."""
    h, seen = history()
    revision = 0
    for is_watch, step in steps:
        revision += step % 1000
        if is_watch:
            h.watched(revision)
        else:
            assert h.answered(Header(revision), h.floor()) is None
    assert seen == [] and h.highest == revision
