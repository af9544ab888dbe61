"""Session shards without processes: the shard map's format, the hash (stable, hash
tags, about 1/K moved when a shard is added, only the removed shard's when one goes),
ETags naming their shard, and the router refusing what cannot be compared or committed
in one shard. Real etcd clusters: ``tests/integration/test_shards.py``."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshxl.client.plans import session_path
from meshxl.errors import InputError, PreconditionFailed
from meshxl.etcd.shards import (
    ShardMap,
    hash_tag,
    parse_shard_map,
    shard_etag,
    split_etag,
    winner,
)
from meshxl.statesync.conditions import check_if_match
from meshxl.statesync.record import valid_session_id
from meshxl.statesync.shards import ShardedSessions
from meshxl.statesync.writes import Settings, Write

IDS = [f"session-{i}" for i in range(4000)]
X, Y = "http://10.0.0.1:2379", "http://10.0.0.2:2379"


def names(k: int) -> list[str]:
    return [f"s{i}" for i in range(1, k + 1)]


@pytest.mark.parametrize(("session", "tag"), [
    ("{user42}:cart", "user42"), ("{user42}:prefs", "user42"), ("a{b}c{d}", "b"),
    ("{}:x", "{}:x"), ("plain", "plain"), ("x{y", "x{y"), ("}{z}", "z"),
])
def test_hash_tags_follow_redis(session: str, tag: str) -> None:
    assert hash_tag(session) == tag


def test_sessions_with_one_tag_share_a_shard_whatever_the_shards() -> None:
    for k in (2, 3, 5, 8):
        shards = names(k)
        assert len({winner(shards, f"{{user{i % 7}}}:{part}") for part in ("cart", "prefs")
                    for i in (3,)}) == 1


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_adding_a_shard_moves_about_one_in_k_plus_one(k: int) -> None:
    before, after = names(k), names(k + 1)
    moved = [s for s in IDS if winner(before, s) != winner(after, s)]
    ideal = len(IDS) / (k + 1)
    assert abs(len(moved) - ideal) < 0.15 * ideal + 30
    assert all(winner(after, s) == f"s{k + 1}" for s in moved)  # only to the new one


def test_removing_a_shard_moves_only_its_own_sessions() -> None:
    before, after = names(4), ["s1", "s2", "s4"]
    for s in IDS:
        if winner(before, s) != "s3":
            assert winner(after, s) == winner(before, s)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True), min_size=1,
                max_size=6, unique=True),
       st.text(alphabet="abcXYZ019._~-:{}", min_size=1, max_size=40))
def test_the_choice_depends_on_the_names_not_their_order(shards: list[str],
                                                         session: str) -> None:
    assert winner(shards, session) == winner(list(reversed(shards)), session)
    assert winner(shards, session) in shards


def test_the_map_round_trips_and_names_what_is_wrong() -> None:
    shards = parse_shard_map({"version": 2, "shards": [
        {"name": "east-1", "etcd": " http://10.0.0.1:2379 ,http://10.0.0.2:2379"},
        {"name": "east-2", "etcd": "http://10.0.1.1:2379"}]})
    assert shards.shards[0].etcd == "http://10.0.0.1:2379,http://10.0.0.2:2379"
    assert parse_shard_map(shards.encode()) == shards
    for bad, why in [
        (b"{", "not JSON"), ({"shards": []}, "non-empty"),
        ({"shards": [{"name": "A", "etcd": X}]}, "lowercase"),
        ({"shards": [{"name": "a", "etcd": ""}]}, "etcd URLs"),
        ({"shards": [{"name": "a", "etcd": X}, {"name": "a", "etcd": Y}]}, "unique"),
        ({"version": -1, "shards": [{"name": "a", "etcd": X}]}, "non-negative"),
        ({"shards": [{"name": "a", "etcd": X, "tls": True}]}, "{name, etcd}"),
        ({"shards": [{"name": "a", "etcd": X, "cluster_id": "nothex"}]}, "cluster_id"),
        ({"shards": [{"name": "a", "etcd": X, "cluster_id": "c1"},
                     {"name": "b", "etcd": Y, "cluster_id": "c1"}]}, "one etcd cluster"),
    ]:
        with pytest.raises(InputError, match=why):
            parse_shard_map(bad)  # type: ignore[arg-type]


def test_etags_name_their_shard() -> None:
    assert shard_etag("s1", 42) == "s1:42"
    assert split_etag("s1:42") == ("s1", "42") and split_etag("42") == (None, "42")
    assert check_if_match('"s1:42"') == "s1:42"
    with pytest.raises(InputError):
        check_if_match('"s1:x"')


def test_hash_tags_are_session_ids_and_travel_encoded() -> None:
    assert valid_session_id("{user42}:cart")
    assert session_path("{user42}:cart") == "/v1/sessions/%7Buser42%7D:cart"


class _Engine:
    """A shard's engine that records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[Any] = []
        self.ledger = SimpleNamespace(observed={})
        self.local = SimpleNamespace(ids=list)

    async def write(self, writes: Any, **options: Any) -> Any:
        self.asked.append((list(writes), options))
        return [PreconditionFailed("recorded") for _ in writes]


class _Store:
    def __init__(self) -> None:
        self.fencing: Any = None

    def fence(self, fencing: Any) -> None:
        self.fencing = fencing


class _Part:
    def __init__(self, name: str) -> None:
        self.name, self.engine, self.store = name, _Engine(), _Store()

    def refuse_if_down(self) -> None:
        """Up: nothing to refuse."""


def _router() -> tuple[ShardedSessions, ShardMap]:
    shards = parse_shard_map({"version": 1, "shards": [
        {"name": "s1", "etcd": X, "cluster_id": "a1"}, {"name": "s2", "etcd": Y,
                                                         "cluster_id": "b2"}]})
    return ShardedSessions(shards, [_Part("s1"), _Part("s2")], Settings(),  # type: ignore[list-item]
                           b"/fence"), shards


async def test_if_match_reaches_the_engine_without_its_shard_or_is_refused() -> None:
    router, shards = _router()
    session = next(s for s in IDS if shards.of(s).name == "s1")
    other = "s2" if shards.of(session).name == "s1" else "s1"
    outcomes = await router.write([
        Write(session_id=session, if_match='"s1:7"'),
        Write(session_id=session, if_match=f'"{other}:7"'),
        Write(session_id=session, if_match='"7"'),
        Write(session_id=session, if_match="*"),
    ])
    asked = router.shards["s1"].engine.asked  # type: ignore[attr-defined]
    assert [w.if_match for w in asked[0][0]] == ["7", "*"]
    assert isinstance(outcomes[1], PreconditionFailed) and "names shard" in str(outcomes[1])
    assert isinstance(outcomes[2], PreconditionFailed) and "names no shard" in str(outcomes[2])


async def test_a_transaction_over_two_shards_is_refused_whole() -> None:
    router, shards = _router()
    one = next(s for s in IDS if shards.of(s).name == "s1")
    two = next(s for s in IDS if shards.of(s).name == "s2")
    with pytest.raises(InputError, match="stays in one shard"):
        await router.write([Write(session_id=one), Write(session_id=two)], atomic=True)
    assert not router.shards["s1"].engine.asked  # type: ignore[attr-defined]
    assert not router.shards["s2"].engine.asked  # type: ignore[attr-defined]


async def test_a_request_whose_shard_the_next_map_closed_is_planned_under_it() -> None:
    """A write planned under a moving map (s2 leaving) that runs only after the stable
    map without s2 closed it goes to the session's new shard under the new map, where a
    503 ("send it again") was answered before."""
    moving = _map(["s1"], previous=["s1", "s2"], version=6)
    session = next(s for s in IDS if moving.source_of(s) is not None)
    one, two = _Part("s1"), _Part("s2")
    router = ShardedSessions(moving, [one, two], Settings(), b"/fence")  # type: ignore[list-item]
    write = asyncio.ensure_future(router.write([Write(session_id=session)]))
    router.apply(_map(["s1"], version=7), [one])  # type: ignore[list-item]
    outcomes = await write
    assert isinstance(outcomes[0], PreconditionFailed), outcomes  # s1's engine answered
    assert [w.session_id for w in one.engine.asked[0][0]] == [session]


def _map(names: list[str], previous: list[str] | None = None, version: int = 1) -> ShardMap:
    def shards(items: list[str]) -> list[dict[str, str]]:
        return [{"name": n, "etcd": f"http://127.0.0.{i + 1}:2379"}
                for i, n in enumerate(sorted(set(names) | set(previous or ())))
                if n in items]
    raw: dict[str, Any] = {"version": version, "shards": shards(names)}
    if previous is not None:
        raw["previous"], raw["stage"] = shards(previous), "move"
    return parse_shard_map(raw)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=30))
def test_a_moving_map_names_the_old_shard_exactly_when_it_changed(session: str) -> None:
    moving = _map(["a", "b", "c"], previous=["a", "b"])
    source = moving.source_of(session)
    before, after = winner(["a", "b"], session), moving.of(session).name
    assert (source.name if source is not None else None) == (before if before != after
                                                              else None)
    assert _map(["a", "b", "c"]).source_of(session) is None
    assert [s.name for s in moving.every] == ["a", "b", "c"]
    assert parse_shard_map(moving.encode()) == moving


def test_a_moving_map_keeps_removed_shards_until_done() -> None:
    moving = _map(["a", "c"], previous=["a", "b", "c"])
    assert moving.moving and [s.name for s in moving.every] == ["a", "c", "b"]
    moved = [f"s{i}" for i in range(300) if moving.source_of(f"s{i}") is not None]
    assert moved and all(winner(["a", "b", "c"], s) == "b" for s in moved)


def test_a_shard_in_both_lists_is_one_shard() -> None:
    with pytest.raises(InputError, match="is listed twice"):
        parse_shard_map({"version": 2, "shards": [{"name": "a", "etcd": "http://x:1"}],
                         "previous": [{"name": "a", "etcd": "http://y:1"}], "stage": "move"})
    with pytest.raises(InputError, match="stage must be prepare or move"):
        parse_shard_map({"version": 2, "shards": [{"name": "a", "etcd": "http://x:1"}],
                         "previous": [{"name": "b", "etcd": "http://y:1"}]})
    with pytest.raises(InputError, match="has no stage"):
        parse_shard_map({"version": 2, "shards": [{"name": "a", "etcd": "http://x:1"}],
                         "stage": "move"})
    with pytest.raises(InputError, match="unknown fields: extra"):
        parse_shard_map({"version": 2, "shards": [{"name": "a", "etcd": "http://x:1"}],
                         "extra": 1})
