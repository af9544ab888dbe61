"""The drill's data check (``meshxl.operator.consistency``) judging what a sidecar
answered against etcd at the revision it answered from, without processes: etcd's
history and the sidecar's answers are what each test says.

The real thing (a drill over a WAN with traffic on both sites) is
``tests/integration/test_dualsite.py``; with sessions sharded over real etcd clusters,
``tests/integration/test_drill_shards.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from meshxl.client.errors import NotFound, SidecarError
from meshxl.client.plans import Session
from meshxl.etcd.shards import PREPARE, Shard, ShardMap
from meshxl.operator import consistency
from meshxl.operator.consistency import Sharded, Sidecar, compare_sessions, data_check_refusals
from meshxl.operator.drill import markdown
from meshxl.statesync.record import SessionRecord


def stored(state: bytes, owner: str = "w1") -> bytes:
    return SessionRecord(owner=owner, content_type="application/json", created=1.0,
                         updated=2.0, data=state).encode()


def answer(session: str, revision: int, state: Any) -> Session:
    return Session(id=session, state=state, etag=f'"{revision}"', owner="w1",
                   content_type="application/json", source="cache")


# etcd's history of three sessions: id -> [(revision, record)], oldest first.
HISTORY = {
    "a": [(10, stored(b'{"n": 1}')), (30, stored(b'{"n": 2}'))],
    "b": [(12, stored(b'{"n": 5}'))],
    "c": [(14, stored(b'{"n": 7}'))],
}
APPLIED = 20  # what the sidecar says it has applied before it is read


def _as_of(revision: int, history: dict[str, list[tuple[int, bytes]]] | None = None
           ) -> dict[str, tuple[int, bytes]]:
    """Each session of ``history`` (default: HISTORY) as etcd had it at ``revision``."""
    out = {}
    for session, versions in (HISTORY if history is None else history).items():
        older = [v for v in versions if revision == 0 or v[0] <= revision]
        if older:
            out[session] = older[-1]
    return out


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    answers: dict[str, Any] = {}

    async def identity(url: str, token: str | None, timeout: float = 5.0) -> Sidecar:
        return Sidecar(url=url, cluster="orders", member="w1", site="west", ready=True,
                       revision=APPLIED)

    _patch(monkeypatch, identity, lambda client, revision: _as_of(revision), answers)
    return answers


def _patch(monkeypatch: pytest.MonkeyPatch, identity: Any,
           as_of: Callable[[Any, int], dict[str, tuple[int, bytes]]],
           answers: dict[str, Any]) -> None:
    """The check's reads replaced: the sidecar's status by ``identity``, etcd by
    ``as_of(client, revision)``, the sidecar's bulk reads by ``answers``."""

    async def committed(client: Any, keys: Any, cluster: str,
                        revision: int = 0) -> dict[str, tuple[int, bytes]]:
        return as_of(client, revision)

    async def at(client: Any, keys: Any, cluster: str, session: str,
                 revision: int) -> tuple[int, bytes] | None:
        return as_of(client, revision).get(session)

    async def read(api: Any, ids: list[str]) -> dict[str, Any]:
        return {i: answers[i] for i in ids}

    monkeypatch.setattr(consistency, "sidecar_identity", identity)
    monkeypatch.setattr(consistency, "committed", committed)
    monkeypatch.setattr(consistency, "_at", at)
    monkeypatch.setattr(consistency, "_read", read)


async def check(baseline: dict[str, int] | None = None) -> dict[str, Any]:
    sidecar = Sidecar(url="http://192.0.2.1:7070", cluster="orders", member="w1")
    return await compare_sessions(None, None, sidecar, None,  # type: ignore[arg-type]
                                  baseline if baseline is not None else {"a": 10, "b": 12})


async def test_answers_at_or_after_the_applied_revision_match(fake: dict[str, Any]) -> None:
    # "a" was written again after the sidecar's revision and it already serves that:
    # compared with etcd at revision 30, not with the snapshot at 20.
    fake.update(a=answer("a", 30, {"n": 2}), b=answer("b", 12, {"n": 5}),
                c=answer("c", 14, {"n": 7}))
    report = await check()
    assert report["ok"], report
    assert (report["sessions"], report["matched"], report["at_revision"]) == (3, 3, APPLIED)
    assert report["written_during"] == 1  # "c" is new since the baseline


@pytest.mark.parametrize(("served", "kind"), [
    (answer("b", 12, {"n": 6}), "different"),      # other bytes at the same revision
    (answer("b", 11, {"n": 5}), "stale"),          # older than etcd had at its revision
    (NotFound("no such session"), "missing"),
    (SidecarError("502 from the sidecar"), "unreadable"),
])
async def test_what_a_surviving_member_would_serve_wrong_fails(
        fake: dict[str, Any], served: Any, kind: str) -> None:
    fake.update(a=answer("a", 10, {"n": 1}), b=served, c=answer("c", 14, {"n": 7}))
    report = await check()
    assert not report["ok"] and report["problems"] == {kind: 1}, report
    assert report["named"][kind][0].startswith("b")


async def test_a_session_served_older_than_the_sidecar_claims_is_stale(
        fake: dict[str, Any]) -> None:
    HISTORY["b"].append((18, stored(b'{"n": 6}')))
    try:
        fake.update(a=answer("a", 10, {"n": 1}), b=answer("b", 12, {"n": 5}),
                    c=answer("c", 14, {"n": 7}))
        report = await check()
    finally:
        HISTORY["b"].pop()
    assert report["problems"] == {"stale": 1}, report


async def test_a_session_deleted_everywhere_is_not_a_problem(fake: dict[str, Any]) -> None:
    fake.update(a=answer("a", 10, {"n": 1}), b=answer("b", 12, {"n": 5}),
                c=answer("c", 14, {"n": 7}), gone=NotFound("no such session"))
    report = await check({"a": 10, "b": 12, "gone": 5})
    assert report["ok"] and report["sessions"] == 4 and report["matched"] == 4, report


# -- sessions sharded over two etcd clusters, each counting its own revisions -------------

SHARDS = ShardMap(3, (Shard("s1", "http://192.0.2.11:2379"),
                      Shard("s2", "http://192.0.2.12:2379")))


def ids_in(name: str, count: int) -> list[str]:
    found = [f"u{i}" for i in range(200) if SHARDS.of(f"u{i}").name == name]
    return found[:count]


A, B = ids_in("s1", 2)
C, D = ids_in("s2", 2)
# Each shard's history: s1's revisions run far ahead of s2's, so a session compared at
# another shard's revision, or in another shard, is found stale or missing.
SHARD_HISTORY: dict[str, dict[str, list[tuple[int, bytes]]]] = {
    "s1": {A: [(100, stored(b'{"n": 1}')), (130, stored(b'{"n": 2}'))],
           B: [(110, stored(b'{"n": 5}'))]},
    "s2": {C: [(10, stored(b'{"n": 7}'))],
           D: [(12, stored(b'{"n": 8}')), (25, stored(b'{"n": 9}'))]},
}
SHARD_APPLIED = {"s1": 120, "s2": 20}


def sharded_answer(session: str, shard: str, revision: int, state: Any) -> Session:
    return Session(id=session, state=state, etag=f'"{shard}:{revision}"', owner="w1",
                   content_type="application/json", source="cache")


def _shard_as_of(shard: str, revision: int) -> dict[str, tuple[int, bytes]]:
    return _as_of(revision, SHARD_HISTORY[shard])


@pytest.fixture
def sharded_fake(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The sidecar's answers (by session) and its status (``served``: the map version
    it serves); etcd's clients are the shards' names."""
    answers: dict[str, Any] = {}
    state: dict[str, Any] = {"answers": answers, "served": SHARDS.version}

    async def identity(url: str, token: str | None, timeout: float = 5.0) -> Sidecar:
        return Sidecar(url=url, cluster="orders", member="w1", site="west", ready=True,
                       revision=7, shard_map=state["served"], shards=dict(SHARD_APPLIED))

    _patch(monkeypatch, identity, _shard_as_of, answers)
    return state


def serve_all(fake: dict[str, Any]) -> None:
    """What a correct sidecar serves: each session from its shard, at or after that
    shard's applied revision."""
    fake["answers"].update({A: sharded_answer(A, "s1", 130, {"n": 2}),
                            B: sharded_answer(B, "s1", 110, {"n": 5}),
                            C: sharded_answer(C, "s2", 10, {"n": 7}),
                            D: sharded_answer(D, "s2", 12, {"n": 8})})


async def sharded_check(baseline: dict[str, int] | None = None) -> dict[str, Any]:
    sidecar = Sidecar(url="http://192.0.2.1:7070", cluster="orders", member="w1")
    sharded = Sharded(SHARDS, {"s1": "s1", "s2": "s2"})  # type: ignore[dict-item]
    return await compare_sessions(None, None, sidecar, None,  # type: ignore[arg-type]
                                  baseline if baseline is not None else {A: 100, C: 10},
                                  sharded)


async def test_each_session_is_compared_in_its_shard_at_that_shards_revision(
        sharded_fake: dict[str, Any]) -> None:
    # D was written again in s2 after the sidecar's s2 revision (20): serving 12 is
    # right there, though 12 is far below s1's revision.
    serve_all(sharded_fake)
    report = await sharded_check()
    assert report["ok"], report
    # Written since the baseline, as of the revisions the sidecar had applied: B and D.
    assert (report["sessions"], report["matched"], report["written_during"]) == (4, 4, 2)
    assert report["at_revision"] is None
    assert report["shards"] == [
        {"shard": "s1", "at_revision": 120, "sessions": 2, "matched": 2, "problems": {}},
        {"shard": "s2", "at_revision": 20, "sessions": 2, "matched": 2, "problems": {}}]


@pytest.mark.parametrize(("served", "kind", "text"), [
    (sharded_answer(D, "s2", 9, {"n": 8}), "stale", "sidecar revision 9, etcd 12"),
    (sharded_answer(D, "s2", 12, {"n": 0}), "different", "other bytes at revision 12"),
    (sharded_answer(D, "s1", 12, {"n": 8}), "different", "served from shard s1"),
    (Session(id=D, state={"n": 8}, etag='"12"', owner="w1",
             content_type="application/json", source="cache"),
     "different", "served from no shard"),
    (NotFound("no such session"), "missing", ""),
])
async def test_a_wrong_answer_is_named_with_its_shard(
        sharded_fake: dict[str, Any], served: Any, kind: str, text: str) -> None:
    serve_all(sharded_fake)
    sharded_fake["answers"][D] = served
    report = await sharded_check()
    assert not report["ok"] and report["problems"] == {kind: 1}, report
    [named] = report["named"][kind]
    assert named.startswith(f"{D} (shard s2)") and text in named, named
    assert [s["problems"] for s in report["shards"]] == [{}, {kind: 1}]
    assert "shard s2" in markdown_of(report) and f"1 {kind}" in markdown_of(report)


async def test_a_session_stored_outside_its_shard_is_misplaced(
        sharded_fake: dict[str, Any]) -> None:
    serve_all(sharded_fake)
    stray = ids_in("s1", 3)[2]  # s1's, but stored in s2, where no sidecar looks for it
    SHARD_HISTORY["s2"][stray] = [(15, stored(b'{"n": 3}'))]
    try:
        sharded_fake["answers"][stray] = NotFound("no such session")
        report = await sharded_check()
    finally:
        del SHARD_HISTORY["s2"][stray]
    assert report["problems"] == {"misplaced": 1}, report
    assert report["named"]["misplaced"] == [f"{stray} (shard s2): the map puts it in shard s1"]


async def test_a_sidecar_on_another_shard_map_is_not_compared(
        sharded_fake: dict[str, Any]) -> None:
    serve_all(sharded_fake)
    sharded_fake["served"] = SHARDS.version + 1  # the map changed during the drill
    report = await sharded_check()
    assert not report["ok"] and report["problems"] == {"shard map": 1}, report
    assert "serves shard map version 4" in report["named"]["shard map"][0]


def markdown_of(data: dict[str, Any]) -> str:
    return markdown({"site": "east", "result": "failed", "started": "t", "duration_s": 1.0,
                     "steps": [], "data": [data]})


def test_the_data_check_refuses_a_moving_map_and_sidecars_not_on_the_map() -> None:
    sidecar = Sidecar(url="http://192.0.2.1:7070", member="w1", shard_map=3,
                      shards={"s1": 5, "s2": 6})
    assert data_check_refusals(SHARDS, [sidecar]) == []
    assert data_check_refusals(None, [Sidecar(url="u", member="w2")]) == []
    moving = ShardMap(4, SHARDS.shards + (Shard("s3", "http://192.0.2.13:2379"),),
                      SHARDS.shards, PREPARE)
    [reason] = data_check_refusals(moving, [dataclasses.replace(
        sidecar, shard_map=4, shards={"s1": 5, "s2": 6, "s3": 1})])
    assert "moving" in reason and "\n" not in reason, reason
    cases = {
        "serves sessions unsharded": dataclasses.replace(sidecar, shard_map=None, shards={}),
        "serves shard map version 2": dataclasses.replace(sidecar, shard_map=2),
        "does not serve session shard(s) s2": dataclasses.replace(sidecar, shards={"s1": 5}),
        "cannot reach session shard(s) s2": dataclasses.replace(sidecar, unreachable=["s2"]),
    }
    for text, case in cases.items():
        [reason] = data_check_refusals(SHARDS, [case])
        assert reason.startswith("--check-sidecar http://192.0.2.1:7070 (w1)") \
            and text in reason, reason
    [reason] = data_check_refusals(None, [sidecar])
    assert "no shard map" in reason, reason
