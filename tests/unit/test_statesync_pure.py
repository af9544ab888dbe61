"""statesync's pure parts: the record codec, ETags, config checks, the cache's
ordering rules (fed real aetcd event objects, no etcd), and how writes form batches."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aetcd import rpc
from hypothesis import given, settings
from hypothesis import strategies as st

from meshxl.errors import InputError, PreconditionFailed
from meshxl.statesync.app import StatesyncConfig
from meshxl.statesync.cache import SessionCache, _prefix_end
from meshxl.statesync.conditions import parse_etag
from meshxl.statesync.locks import SessionLocks
from meshxl.statesync.record import STREAM_RECORDS, SessionRecord, is_json, valid_session_id

PREFIX = "/meshxl/v1/sessions/c/"


def record(owner: str = "a", data: bytes = b'{"n":1}') -> SessionRecord:
    return SessionRecord(owner=owner, content_type="application/json", created=1.0, updated=2.0,
                         data=data, traceparent=None)


def test_record_round_trips_any_bytes_including_newlines() -> None:
    original = SessionRecord(owner="member-a", content_type="application/octet-stream", created=1.5,
                             updated=2.5, data=b"\x00line1\nline2\n\xff",
                             traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01")
    assert SessionRecord.decode(original.encode()) == original


@pytest.mark.parametrize("raw", [b"no header", b"{not json}\nx", b'{"owner":"a"}\nx',
                                 b"\n", b"[1]\nx"])
def test_record_decode_names_the_problem(raw: bytes) -> None:
    with pytest.raises(ValueError, match="session record"):
        SessionRecord.decode(raw)


@pytest.mark.parametrize("session_id,ok", [
    ("abc-123_X.~", True), ("a" * 200, True), ("a" * 201, False), ("", False),
    ("a/b", False), ("a b", False), ("..", False), (".", False), ("é", False),
])
def test_session_ids(session_id: str, ok: bool) -> None:
    assert valid_session_id(session_id) is ok


@pytest.mark.parametrize("content_type,ok", [
    ("application/json", True), ("application/json; charset=utf-8", True),
    ("application/merge-patch+json", True), ("text/plain", False),
    ("application/octet-stream", False),
])
def test_is_json(content_type: str, ok: bool) -> None:
    assert is_json(content_type) is ok


@pytest.mark.parametrize("value,tag", [('"12"', "12"), ("12", "12"), ("*", "*"),
                                       (' "L3" ', "L3")])
def test_parse_etag(value: str, tag: str) -> None:
    assert parse_etag(value) == tag


def test_a_weak_etag_never_matches_if_match_but_is_valid_syntax() -> None:
    # RFC 9110 section 13.1.1: If-Match compares strongly, so W/"12" matches nothing.
    with pytest.raises(PreconditionFailed, match="weak ETag"):
        parse_etag('W/"12"')
    assert parse_etag('W/"12"', strong=False) == "12"


@pytest.mark.parametrize("value", ['"1", "2"', '""', '"a"b"', ""])
def test_parse_etag_rejects(value: str) -> None:
    with pytest.raises(InputError, match="If-Match"):
        parse_etag(value)


@pytest.mark.parametrize("change,message", [
    ({"app": "nohost"}, "HOST:PORT"), ({"listen": "127.0.0.1:99999"}, "port"),
    ({"etcd": "ftp://127.0.0.1:2379"}, "scheme"), ({"session_ttl": 0}, "--session-ttl"),
    ({"sync_delay": -1}, "delay"), ({"max_bytes": 2_000_000}, "size"),
    ({"member": "m" * 5000}, "invalid member name"), ({"cluster": "a/b"}, "cluster name"),
    ({"site": "DC 1"}, "site name"), ({"member": ""}, "member name"),
])
def test_config_rejects_bad_values(change: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"cluster": "c", "member": "a", "app": "127.0.0.1:8080",
                               "etcd": "http://127.0.0.1:2379"}
    with pytest.raises(ValueError, match=message):
        StatesyncConfig(**{**base, **change})  # type: ignore[arg-type]


def event(kind: str, session: str, revision: int, value: bytes = b"") -> rpc.Event:
    kv = rpc.KeyValue(key=(PREFIX + session).encode(), value=value, mod_revision=revision)
    return rpc.Event(type=rpc.Event.PUT if kind == "PUT" else rpc.Event.DELETE, kv=kv)


def cache() -> SessionCache:
    return SessionCache(None, PREFIX)  # type: ignore[arg-type]  # never touches etcd here


def test_events_apply_in_order_and_never_twice() -> None:
    c = cache()
    c._apply(event("PUT", "s", 5, record("a", b"1").encode()))
    c._apply(event("PUT", "s", 5, record("a", b"1").encode()))  # a resumed watch repeats
    c._apply(event("PUT", "s", 4, record("x", b"old").encode()))  # older: ignored
    entry = c.get("s")
    assert entry is not None and (entry.revision, entry.record.data) == (5, b"1")
    c._apply(event("DELETE", "s", 6))
    assert c.get("s") is None and c.applied == 6
    c._apply(event("PUT", "s", 5, record("a", b"1").encode()))  # stale replay after delete
    assert c.get("s") is None  # the cache never goes back


def test_many_keys_in_one_revision_all_apply() -> None:
    """A batched transaction writes many sessions at one revision."""
    c = cache()
    for name in ("a", "b", "c"):
        c._apply(event("PUT", name, 9, record(name).encode()))
    assert sorted(c.ids()) == ["a", "b", "c"] and c.applied == 9


def test_write_through_defers_to_a_watch_that_went_further() -> None:
    c = cache()
    c.write_through("s", 10, record("a", b"mine"))
    assert c.get("s") is not None and c.get("s").revision == 10  # type: ignore[union-attr]
    c._apply(event("PUT", "s", 10, record("a", b"mine").encode()))
    c._apply(event("DELETE", "s", 11))
    c.write_through("s", 10, record("a", b"mine"))  # a late acknowledgement
    assert c.get("s") is None
    c.write_through("t", 12, record("b", b"x"))
    c.write_through("t", 12, None)  # not newer than what is there: ignored
    assert c.get("t") is not None


def test_bad_records_are_counted_not_applied() -> None:
    c = cache()
    c._apply(event("PUT", "s", 3, b"garbage"))
    assert c.get("s") is None and c.bad_records == 1 and c.applied == 3


def test_owned_by_counts_owners() -> None:
    c = cache()
    c._apply(event("PUT", "x", 1, record("a").encode()))
    c._apply(event("PUT", "y", 2, record("b").encode()))
    c._apply(event("PUT", "z", 3, record("a").encode()))
    assert (c.owned_by("a"), c.owned_by("b"), len(c)) == (2, 1, 3)


def test_other_members_stream_records_are_not_kept() -> None:
    """A stream's record is written again with every message; only the member taking the
    stream over reads it (from etcd). Another member's are not decoded or held; this
    member's own write stays until a newer one (another member's, or the expiry)."""
    from meshxl.streams.record import RECORD_PREFIX

    assert RECORD_PREFIX == STREAM_RECORDS
    c = cache()
    stream = STREAM_RECORDS + "tok"
    c._apply(event("PUT", stream, 5, record("b", b"{}").encode()))
    c._apply(event("PUT", stream + "2", 6, b"not even a record"))
    assert c.get(stream) is None and c.bad_records == 0 and c.applied == 6
    c.write_through(stream, 7, record("a", b"mine"))  # this member's own write
    c._apply(event("PUT", stream, 7, record("a", b"mine").encode()))  # its event
    assert c.get(stream) is not None
    c._apply(event("PUT", stream, 8, record("c", b"taken over").encode()))
    assert c.get(stream) is None and c.applied == 8
    c.write_through(stream, 9, record("a", b"again"))
    c._apply(event("DELETE", stream, 10))
    assert c.get(stream) is None and c.applied == 10 and len(c) == 0
    c._apply(event("PUT", "~streamlike", 11, record("b").encode()))  # a session: kept
    assert c.get("~streamlike") is not None


@pytest.mark.parametrize("prefix,end", [(b"/a/", b"/a0"), (b"a\xff", b"b"), (b"\xff", b"\0")])
def test_prefix_end(prefix: bytes, end: bytes) -> None:
    assert _prefix_end(prefix) == end


def test_a_cache_without_a_watch_prunes_sessions_past_their_lease() -> None:
    c = cache()
    for n, updated in (("old", 100.0), ("edge", 200.0), ("fresh", 300.0)):
        c.write_through(n, int(updated), SessionRecord(
            owner="a", content_type="application/json", created=updated, updated=updated,
            data=b"{}"))
    assert c.prune_expired(200.0) == 1
    assert sorted(c.ids()) == ["edge", "fresh"]
    assert c.prune_expired(0.0) == 0


# -- per-session locks ----------------------------------------------------------------------


async def test_session_locks_are_fifo_and_survive_cancelled_waiters() -> None:
    locks = SessionLocks()
    order: list[str] = []
    await locks.acquire("s")  # held, nothing allocated for it
    assert len(locks) == 1

    async def writer(name: str) -> None:
        await locks.acquire("s")
        order.append(name)
        await asyncio.sleep(0)
        locks.release("s")

    first = asyncio.create_task(writer("first"))
    cancelled = asyncio.create_task(writer("cancelled"))
    last = asyncio.create_task(writer("last"))
    await asyncio.sleep(0)
    cancelled.cancel()  # waiting: it leaves the queue
    await asyncio.sleep(0)
    locks.release("s")
    await asyncio.gather(first, last, cancelled, return_exceptions=True)
    assert order == ["first", "last"] and len(locks) == 0

    # Cancelled just as the lock was handed to it: it passes the lock on.
    await locks.acquire("s")
    handed = asyncio.create_task(writer("handed"))
    after = asyncio.create_task(writer("after"))
    await asyncio.sleep(0)
    locks.release("s")  # handed to `handed`...
    handed.cancel()  # ...which is cancelled before it runs
    await asyncio.gather(handed, after, return_exceptions=True)
    assert order[-1] == "after" and "handed" not in order and len(locks) == 0


async def test_several_sessions_take_their_places_at_once_and_keep_arrival_order() -> None:
    """A write of several sessions (a bulk save) that waits for one of them already has
    its place in the others' lines: a later single write of one of those comes after
    it, as a connection's pipelined writes must (http/connection.py, concurrent routes)."""
    locks = SessionLocks()
    order: list[str] = []
    await locks.acquire("a")  # someone else holds "a"

    async def bulk() -> None:
        async with locks.hold(["c", "a"]):
            order.append("bulk a+c")

    async def single() -> None:
        await locks.acquire("c")
        order.append("single c")
        locks.release("c")

    first = asyncio.create_task(bulk())
    await asyncio.sleep(0)  # the bulk write waits for "a", placed in line for "c"
    second = asyncio.create_task(single())
    await asyncio.sleep(0)
    assert order == []  # "c" is free, yet the single write waits behind the bulk one
    locks.release("a")
    await asyncio.gather(first, second)
    assert order == ["bulk a+c", "single c"] and len(locks) == 0

    # Cancelled while waiting: every place it took is given back.
    await locks.acquire("a")
    waiting = asyncio.create_task(bulk())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    locks.release("a")
    assert len(locks) == 0


# -- batches etcd takes ------------------------------------------------------------------


def _op(size: int, width: int, fence: int = -1) -> Any:
    from meshxl.statesync.batches import Op
    return Op(b"", size, lambda *_: None, None, width=width, fence=fence)


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(1, 400_000), st.integers(0, 127),
                              st.sampled_from([-1, 7, 7, 7, 8])), min_size=1, max_size=400),
       max_ops=st.integers(1, 128), max_bytes=st.integers(1, 1_400_000))
def test_batches_keep_order_and_stay_within_what_etcd_takes(
        ops: list[tuple[int, int, int]], max_ops: int, max_bytes: int) -> None:
    """Every op leaves once, in order; a batch holds at most max_ops ops and max_bytes
    (but for a lone op), its ops plus its widest nested transaction at most 128 (etcd
    refuses the whole batch otherwise), only ops planned under one shard map version
    (its fence compare is the batch's), and it stops only where the next op would break
    one of those bounds."""
    from collections import deque

    from meshxl.statesync.store import MAX_TXN_OPS, take_batch
    queue = deque(_op(size, width, fence) for size, width, fence in ops)
    order = list(queue)
    taken: list[Any] = []
    while queue:
        batch = take_batch(queue, max_ops, max_bytes)
        taken += batch
        size, widest = sum(o.size for o in batch), max(o.width for o in batch)
        assert len(batch) + widest <= MAX_TXN_OPS
        assert len(batch) == 1 or (len(batch) <= max_ops and size <= max_bytes)
        assert len({o.fence for o in batch}) == 1
        if queue:
            nxt = queue[0]
            assert (len(batch) == max_ops or size + nxt.size > max_bytes
                    or len(batch) + 1 + max(widest, nxt.width) > MAX_TXN_OPS
                    or nxt.fence != batch[0].fence)
    assert [id(o) for o in taken] == [id(o) for o in order]


def test_single_writes_fill_a_batch_to_127_and_a_wide_transaction_leaves_room_for_one() -> None:
    from collections import deque

    from meshxl.statesync.store import take_batch
    singles = deque(_op(10, 1) for _ in range(300))
    assert [len(take_batch(singles, 128, 10**6)) for _ in range(3)] == [127, 127, 46]
    mixed = deque([_op(10, 1), _op(10, 127), _op(10, 1), _op(10, 0)])
    assert [len(take_batch(mixed, 128, 10**6)) for _ in range(3)] == [1, 1, 2]


def test_a_full_batch_leaves_without_waiting_for_the_one_in_flight() -> None:
    from meshxl.statesync.store import FULL_EXTRA, may_send
    assert not may_send(0, 0, 1, 64)
    assert may_send(1, 0, 1, 64)                  # nothing out: the first write leaves
    assert not may_send(63, 1, 1, 64)             # group commit: it waits for the answer
    assert may_send(64, 1, 1, 64)                 # a full batch does not
    assert may_send(500, FULL_EXTRA, 1, 64)
    assert not may_send(500, 1 + FULL_EXTRA, 1, 64)  # bounded all the same
    assert may_send(5, 1, 2, 64) and not may_send(5, 2, 2, 64)


def test_the_default_batch_holds_as_many_writes_as_etcd_takes() -> None:
    """The sidecar's default batch (CLI and config) is the most single writes etcd
    accepts in one transaction: its 128 operations per level, less the batch's own."""
    from collections import deque

    from meshxl.cli.serve import serve_statesync
    from meshxl.statesync.app import StatesyncConfig
    from meshxl.statesync.store import MAX_TXN_OPS, MAX_TXN_WRITES, SessionStore, take_batch
    option = next(p for p in serve_statesync.params if p.name == "batch_max_ops")
    assert option.default == MAX_TXN_WRITES == MAX_TXN_OPS - 1
    assert StatesyncConfig.__dataclass_fields__["batch_max_ops"].default == MAX_TXN_WRITES
    store = SessionStore(None, ttl=60.0)  # type: ignore[arg-type]
    assert store.writer._max_ops == MAX_TXN_WRITES
    singles = deque(_op(10, 1) for _ in range(200))
    assert len(take_batch(singles, MAX_TXN_WRITES, 10**6)) == MAX_TXN_WRITES


def test_a_batch_stalls_once_when_old_enough_and_no_more_than_the_bound() -> None:
    """stall_due: a batch unanswered for STALLED_AFTER stalls, once; answered ones at
    the head are dropped; a young one says when to look again; past MAX_STALLED an old
    one is passed over for good (it is not stalled later when room frees up)."""
    from collections import deque

    from meshxl.statesync.batches import MAX_STALLED, STALLED_AFTER, Flight, stall_due
    answered, old, young = Flight(0.0), Flight(1.0), Flight(1.2)
    answered.holding = False
    flights = deque([answered, old, young])
    due, later = stall_due(flights, 1.0 + STALLED_AFTER, 0)
    assert due == [old] and later == 1.2 + STALLED_AFTER
    assert list(flights) == [old, young]           # the answered head dropped
    old.stalled = True
    due, later = stall_due(flights, 10.0, 1)
    assert due == [young] and later is None       # the stalled one is not stalled again
    full = deque([Flight(0.0), Flight(0.1)])
    due, _ = stall_due(full, 5.0, MAX_STALLED - 1)
    assert due == [full[0]]                       # one more fits, the second does not
    assert stall_due(full, 6.0, 0) == ([], None)  # passed over once: never stalled later
