"""Resharding decided without I/O: what ``meshxl shards set`` stores next from any stage
(:func:`meshxl.etcd.shards.next_map`), shards known by their etcd cluster, the stored
map's format (generated maps round-trip; malformed URLs are refused at parse, naming
the shard), the fence's encoding (etcd's byte order is the numeric one), a batch never
mixing map versions, and the router answering 503 without a usable map.
Real etcd: ``tests/integration/test_reshard_faults.py``, ``test_reshard_model.py``."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshxl.errors import Conflict, InputError, Unavailable
from meshxl.etcd.shards import (
    BACK,
    FIRST,
    IN_PLACE,
    MOVE,
    PREPARE,
    RESHARD,
    RESUME,
    RETARGET,
    UNCHANGED,
    Shard,
    ShardMap,
    fence_value,
    next_map,
    parse_fence,
    parse_shard_map,
    winner,
)
from meshxl.statesync.shards import ShardedSessions
from meshxl.statesync.writes import Settings, Write

A = Shard("s1", "http://10.0.0.1:2379", "a1")
B = Shard("s2", "http://10.0.0.2:2379", "b2")
C = Shard("s3", "http://10.0.0.3:2379", "c3")
IDS = [f"u{i}" for i in range(3000)]


def test_a_first_map_is_above_every_fence_it_finds() -> None:
    step = next_map(None, [A, B], floor=41)
    assert (step.kind, step.map.version, step.map.shards, step.store) == (FIRST, 42, (A, B),
                                                                          True)


def test_the_same_list_again_is_unchanged_and_new_urls_are_in_place() -> None:
    current = ShardMap(5, (A, B))
    assert next_map(current, [B, A]).kind == UNCHANGED
    moved = dataclasses.replace(A, etcd="http://10.9.9.9:2379")
    step = next_map(current, [moved, B])
    assert (step.kind, step.map, step.store) == (IN_PLACE, ShardMap(6, (moved, B)), True)
    assert not step.map.moving


def test_a_reshard_starts_at_prepare_and_its_new_urls_reach_both_lists() -> None:
    current = ShardMap(5, (A, B))
    moved = dataclasses.replace(A, etcd="http://10.9.9.9:2379")
    step = next_map(current, [moved, B, C], floor=9)
    assert step.kind == RESHARD and step.map.version == 10
    assert step.map.stage == PREPARE and step.map.previous == (moved, B)
    assert step.map.shards == (moved, B, C)


@pytest.mark.parametrize(("stage", "spread", "kind", "moving", "spreads"), [
    (PREPARE, False, BACK, False, False),  # nothing moved: the old map again
    (MOVE, False, BACK, True, True),  # the reverse reshard, from prepare
    (PREPARE, True, BACK, True, True),  # a reverse turned back: forward again
])
def test_going_back(stage: str, spread: bool, kind: str, moving: bool,
                    spreads: bool) -> None:
    current = ShardMap(7, (A, B, C), (A, B), stage, spread)
    step = next_map(current, [A, B])
    assert (step.kind, step.map.moving, step.map.spread) == (kind, moving, spreads)
    assert step.map.names == ("s1", "s2") and step.map.version == 8
    if moving:
        assert step.map.stage == PREPARE and step.map.previous == (A, B, C)


def test_resuming_stores_nothing_unless_urls_changed() -> None:
    current = ShardMap(7, (A, B, C), (A, B), MOVE)
    step = next_map(current, [C, B, A])
    assert (step.kind, step.map, step.store) == (RESUME, current, False)
    moved = dataclasses.replace(C, etcd="http://10.9.9.9:2379")
    step = next_map(current, [A, B, moved])
    assert step.kind == RESUME and step.store and step.map.stage == MOVE
    assert step.map.shards[2] == moved and step.map.version == 8


def test_another_list_at_prepare_retargets_and_at_move_is_refused() -> None:
    d = Shard("s4", "http://10.0.0.4:2379", "d4")
    step = next_map(ShardMap(7, (A, B, C), (A, B), PREPARE), [A, B, d])
    assert step.kind == RETARGET and step.map.previous == (A, B) and step.map.stage == PREPARE
    for stage, spread in ((MOVE, False), (PREPARE, True)):
        with pytest.raises(Conflict, match="finish it .* or go back"):
            next_map(ShardMap(7, (A, B, C), (A, B), stage, spread), [A, B, d])


def test_a_name_keeps_its_cluster_and_one_cluster_is_one_shard() -> None:
    current = ShardMap(5, (A, B))
    elsewhere = Shard("s1", "http://10.0.0.9:2379", "99")
    with pytest.raises(InputError, match="another etcd cluster .* new name"):
        next_map(current, [elsewhere, B])
    twice = Shard("s3", A.etcd, A.cluster_id)
    with pytest.raises(InputError, match="one etcd cluster"):
        next_map(current, [A, twice])
    # A map stored before cluster ids: the same URLs are the same shard; other URLs
    # of a shard that does not answer cannot be told apart.
    legacy = ShardMap(5, (Shard("s1", A.etcd), B))
    assert next_map(legacy, [A, B]).kind == UNCHANGED
    with pytest.raises(Conflict, match="cannot be told"):
        next_map(legacy, [dataclasses.replace(A, etcd="http://10.0.0.8:2379"), B])


def test_a_renamed_shard_moves_nothing_between_its_names() -> None:
    renamed = Shard("s9", A.etcd, A.cluster_id)
    step = next_map(ShardMap(3, (A,)), [renamed])
    assert step.kind == RESHARD
    assert all(step.map.source_of(s) is None for s in IDS)
    # With others beside it, only what changes cluster moves.
    step = next_map(ShardMap(3, (A, B)), [renamed, B])
    cluster = {"s1": "a1", "s9": "a1", "s2": "b2"}
    changes = {s: cluster[winner(["s1", "s2"], s)] != cluster[winner(["s9", "s2"], s)]
               for s in IDS}
    assert any(changes.values()) and not all(changes.values())
    assert all((step.map.source_of(s) is not None) == changed
               for s, changed in changes.items())


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:99999", "http://127.0.0.1:2379x", "ftp://127.0.0.1:2379",
    "http://:2379", "http://127.0.0.1:2379/path", "http://127.0.0.1", "http://h:1?x=1",
    "http://a:1,https://b:2",
])
def test_a_malformed_url_is_refused_at_parse_naming_the_shard(url: str) -> None:
    with pytest.raises(InputError, match="shard s2: "):
        parse_shard_map({"version": 1, "shards": [A.as_dict(), {"name": "s2",
                                                                  "etcd": url}]})


_names = st.lists(st.from_regex(r"[a-z][a-z0-9-]{0,6}[a-z0-9]", fullmatch=True),
                  min_size=1, max_size=5, unique=True)


@st.composite
def _maps(draw: Any) -> ShardMap:
    def shards(names: list[str], base: int) -> tuple[Shard, ...]:
        return tuple(Shard(n, f"http://10.0.{base}.{i + 1}:{2379 + i}",
                           draw(st.sampled_from(["", f"{base:x}{i:x}f"])))
                     for i, n in enumerate(names))
    now = shards(draw(_names), 1)
    if not draw(st.booleans()):
        return ShardMap(draw(st.integers(0, 10 ** 12)), now)
    before = tuple(s for s in shards(draw(_names), 2) if s.name not in {x.name for x in now})
    if not before:
        return ShardMap(draw(st.integers(0, 10 ** 12)), now)
    stage = draw(st.sampled_from([PREPARE, MOVE]))
    return ShardMap(draw(st.integers(0, 10 ** 12)), now, before, stage,
                    stage == PREPARE and draw(st.booleans()))


@settings(max_examples=300, deadline=None)
@given(_maps())
def test_every_map_round_trips(shard_map: ShardMap) -> None:
    assert parse_shard_map(shard_map.encode()) == shard_map
    assert parse_shard_map(shard_map.as_dict()) == shard_map


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2 ** 64), st.integers(0, 2 ** 64))
def test_fences_compare_as_their_versions(a: int, b: int) -> None:
    assert (fence_value(a) < fence_value(b)) == (a < b)
    assert parse_fence(fence_value(a)) == a


@pytest.mark.parametrize("raw", [None, b"", b"12", b"x" * 20, b"-" + b"1" * 19])
def test_a_missing_or_foreign_fence_counts_as_none(raw: bytes | None) -> None:
    assert parse_fence(raw) == 0


class _Store:
    def fence(self, fencing: Any) -> None:
        self.fencing = fencing


class _Engine:
    def __init__(self) -> None:
        self.asked: list[Any] = []

    async def write(self, writes: Any, **options: Any) -> Any:
        self.asked.append(list(writes))
        return [None for _ in writes]


class _Part:
    def __init__(self, name: str) -> None:
        self.name, self.engine, self.store = name, _Engine(), _Store()

    def refuse_if_down(self) -> None:
        """Up."""


async def test_without_a_usable_map_every_session_answers_503_saying_why() -> None:
    router = ShardedSessions(ShardMap.unusable("the stored shard map cannot be used: x"),
                             [], Settings(), b"/fence")
    with pytest.raises(Unavailable, match="cannot be used"):
        await router.get("u1")
    [outcome] = await router.write([Write(session_id="u1")])
    assert isinstance(outcome, Unavailable)
    with pytest.raises(Unavailable):
        await router.write([Write(session_id="u1")], atomic=True)
    assert not router.usable.is_set() and router.status()["map_error"]


async def test_an_etag_of_a_renamed_shard_is_compared_in_its_cluster() -> None:
    renamed = Shard("s9", A.etcd, A.cluster_id)
    moving = ShardMap(4, (renamed,), (A,), MOVE)
    parts = [_Part("s9"), _Part("s1")]
    router = ShardedSessions(moving, parts, Settings(), b"/fence")  # type: ignore[arg-type]
    [outcome] = await router.write([Write(session_id="u1", if_match='"s1:7"')])
    assert outcome is None and parts[0].engine.asked[0][0].if_match == "7"
    assert parts[0].store.fencing.version() == 4  # type: ignore[attr-defined]


MOVING = ShardMap(6, (A, C), (A, B, C), MOVE)
MOVED = next(s for s in IDS if MOVING.source_of(s) == B and MOVING.of(s) == C)
"""A session moving from s2 to s3 under MOVING."""


def _moving_router(closes_s2: bool) -> tuple[ShardedSessions, dict[str, _Part]]:
    """A router at MOVING whose move of a session is cancelled under the write, as
    closing a shard's client cancels its calls; ``closes_s2``: a newer map closed s2
    first (version 7: s1 and s3)."""
    parts = {name: _Part(name) for name in ("s1", "s2", "s3")}
    for part in parts.values():
        part.client = object()  # type: ignore[attr-defined]
        part.engine.ledger = _Ledger()  # type: ignore[attr-defined]
    router = ShardedSessions(MOVING, list(parts.values()), Settings(),  # type: ignore[arg-type]
                             b"/fence")

    class _Mover:
        async def move(self, *args: Any) -> None:
            if closes_s2:
                router.map = ShardMap(7, (A, C), (), "")
                del router.shards["s2"]
            raise asyncio.CancelledError

    router.mover = _Mover()  # type: ignore[assignment]
    return router, parts


async def test_a_move_cancelled_by_its_shard_closing_is_planned_again_under_the_new_map(
) -> None:
    """A write whose session is moving when a newer map closes its old shard: closing
    the shard's client cancels the move's call under the write, which is then planned
    again under the newer map (nothing of it was sent), never answered with the
    cancellation as if it were stored (a 500, seen in an online reshard under load)."""
    router, parts = _moving_router(closes_s2=True)
    [outcome] = await router.write([Write(session_id=MOVED)])
    assert outcome is None, outcome  # stored in s3 under map 7
    assert [w.session_id for w in parts["s3"].engine.asked[0]] == [MOVED]
    assert not parts["s2"].engine.asked


async def test_a_move_cancelled_under_a_write_while_its_shard_stays_is_a_503() -> None:
    router, parts = _moving_router(closes_s2=False)
    [outcome] = await router.write([Write(session_id=MOVED)])
    assert isinstance(outcome, Unavailable) and "interrupted" in str(outcome), outcome
    assert not any(p.engine.asked for p in parts.values())


class _Ledger:
    def key(self, session_id: str) -> bytes:
        return session_id.encode()
