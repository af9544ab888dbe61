"""Delayed sync's replication never replaces another member's record (issue 51, item 1):
the verdict on a replication etcd refused, and the cache giving up a kept copy when it
sees another member's record of the session. No etcd: the engine is built over a store
it never calls, and the cache is fed real aetcd event objects."""

from __future__ import annotations

import time

import pytest
from aetcd import rpc

from meshxl.etcd.keys import Keys
from meshxl.statesync.cache import SessionCache
from meshxl.statesync.conditions import OWNER, REPLICATE, known_expectation, written_since
from meshxl.statesync.errors import Superseded
from meshxl.statesync.metrics import StatesyncMetrics
from meshxl.statesync.record import SessionRecord
from meshxl.statesync.sessions import Sessions
from meshxl.statesync.store import KeyState
from meshxl.statesync.writes import PUT, Settings, Write

KEYS = Keys()
CLUSTER = "c"
PREFIX = KEYS.sessions_prefix(CLUSTER)


T0 = time.time() - 100
"""A moment shortly before the tests (a kept copy older than the session TTL expires)."""


def record(owner: str, data: bytes = b'{"n":1}') -> SessionRecord:
    return SessionRecord(owner=owner, content_type="application/json", created=T0 + 1,
                         updated=T0 + 2, data=data)


def engine(delay: float = 5.0) -> Sessions:
    cache = SessionCache(None, PREFIX)  # type: ignore[arg-type]  # never touches etcd here
    return Sessions(None, cache, KEYS, CLUSTER, "a",  # type: ignore[arg-type]
                    Settings(sync_delay=delay), StatesyncMetrics())


def superseded(sessions: Sessions) -> float:
    return float(sessions.metrics.superseded.lines()[-1].split()[-1])


def put_event(session: str, revision: int, value: bytes) -> rpc.Event:
    kv = rpc.KeyValue(key=(PREFIX + session).encode(), value=value, mod_revision=revision)
    return rpc.Event(type=rpc.Event.PUT, kv=kv)


def test_a_replication_that_finds_another_members_record_gives_way_to_it() -> None:
    s = engine()
    theirs = record("b", b'{"by":"b"}')
    refusal = s.ledger.refusal(PUT, "s", REPLICATE, None, 0, KeyState(7, theirs.encode()),
                               theirs)
    assert isinstance(refusal, Superseded)  # a Conflict: 409
    assert refusal.details == {"owner": "b", "revision": 7}
    assert "member 'b'" in str(refusal) and "given up" in str(refusal)
    # Fenced as a former owner is: its next write compares "observed, none", and etcd's
    # record of b is what the member's cache holds.
    assert s.ledger.observed_revision("s") == 0
    assert known_expectation(Write(session_id="s", data=b"{}"), 0, 7) == (OWNER, 0)
    entry = s.cache.get("s")
    assert entry is not None and (entry.revision, entry.record.owner) == (7, "b")
    assert s.ledger.conflicts == 1


@pytest.mark.parametrize("current,mine", [
    (KeyState(0), None),  # gone meanwhile (expired): created again
    (KeyState(9, record("a").encode()), record("a")),  # its own, whose answer was lost
])
def test_a_replication_is_sent_again_only_over_nothing_or_its_own_record(
        current: KeyState, mine: SessionRecord | None) -> None:
    s = engine()
    assert s.ledger.refusal(PUT, "s", REPLICATE, None, 0, current, mine) is None
    assert s.ledger.observed_revision("s") is None and s.ledger.conflicts == 0


def test_only_a_record_older_than_the_copy_is_replaced_by_it() -> None:
    """A record whose last write came before the copy was created holds a state the
    client had left behind (the session moved here and started afresh): replaced. One
    written since (a paused member's copy, the session moved on) is not."""
    s = engine()
    theirs = record("b")  # last written at T0 + 2
    for created, replaced in ((T0 + 2.5, True), (T0 + 2, False), (T0 + 1, False)):
        kept = SessionRecord(owner="a", content_type="application/json", created=created,
                             updated=created + 1, data=b"{}")
        assert written_since(theirs, kept) is not replaced
        verdict = s.ledger.refusal(PUT, "s", REPLICATE, None, 0,
                                   KeyState(7, theirs.encode()), theirs, kept)
        assert (verdict is None) is replaced, (created, verdict)
    assert written_since(theirs, None)  # nothing kept: written since, always


def test_an_undecodable_record_is_not_replaced_by_a_kept_copy_either() -> None:
    s = engine()
    refusal = s.ledger.refusal(PUT, "s", REPLICATE, None, 0, KeyState(4, b"junk"), None)
    assert isinstance(refusal, Superseded) and refusal.details == {"revision": 4}


def test_the_cache_seeing_another_members_record_gives_up_the_kept_copy() -> None:
    s = engine()
    s.local.keep("s", b'{"by":"a"}', "application/json", None, T0 + 1)
    s.local.keep("own", b"{}", "application/json", None, T0 + 1)
    s.cache._apply(put_event("own", 3, record("a").encode()))  # its own: kept still
    assert s.local.get("own") is not None and superseded(s) == 0
    s.cache._apply(put_event("s", 5, record("b", b'{"by":"b"}').encode()))
    assert s.local.get("s") is None and superseded(s) == 1
    assert s.ledger.observed_revision("s") == 0  # its next write is fenced (409)
    entry = s.cache.get("s")
    assert entry is not None and entry.record.owner == "b"
    s.cache._apply(put_event("s", 6, record("b", b'{"n":2}').encode()))
    assert superseded(s) == 1  # nothing kept any more: nothing to give up
    # A record older than the copy (written at T0 + 2, the copy created at T0 + 3) is one
    # the copy replaces when it replicates: the copy stays, and is served here.
    s.local.keep("young", b'{"by":"a"}', "application/json", None, T0 + 3)
    s.cache._apply(put_event("young", 7, record("b").encode()))
    assert s.local.get("young") is not None and superseded(s) == 1
    assert s.ledger.observed_revision("young") is None


def test_without_delayed_sync_the_cache_calls_nothing() -> None:
    s = engine(delay=0.0)
    assert s.cache.on_seen is None


def test_a_copy_outliving_its_session_ttl_expires_here_and_is_never_replicated() -> None:
    """A member paused longer than the session TTL: its copy would have expired in etcd,
    and a deletion record (which lives at least the TTL after its delete) may be gone,
    so the copy is dropped rather than replicated."""
    local = engine().local
    local.ttl = 60.0
    now = time.time()
    local.keep("old", b"{}", "application/json", None, now - 61, floor=5)
    local.keep("live", b"{}", "application/json", None, now - 59, floor=5)
    assert [session for session, _ in local.due(now)] == ["live"]
    assert local.get("old") is None and len(local) == 1
    assert local.get("live", now + 2) is None and len(local) == 0


def test_a_copy_keeps_the_floor_of_its_first_version() -> None:
    local = engine().local
    now = time.time()
    local.keep("s", b"{}", "application/json", None, now, floor=7)
    local.keep("s", b"{}", "application/json", None, now + 1, floor=99)
    kept = local.get("s")
    assert kept is not None and kept.floor == 7 and kept.version == 2
    moved = local.drop("s")
    assert moved is not None
    local.adopt("s", moved)  # another shard's engine: its floor means nothing here
    adopted = local.get("s")
    assert adopted is not None and adopted.floor is None and adopted.version == 2
