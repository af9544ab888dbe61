"""The drill's data check (``meshxl.operator.consistency``) judging what a sidecar
served against what etcd acknowledged, without processes: etcd's history (every
write, delete and deletion record, with its revision) and the sidecar's answers are
what each test says.

Before: the check compared an answer only with etcd at the revision the sidecar said it
had applied, so a sidecar serving a value older than etcd's latest passed, and a session
deleted behind the API (``etcdctl del``) was "deleted since": clean. Now each answer is
compared with etcd's latest acknowledged version, read before the sidecar is asked
(``stale`` when older), and a session whose acknowledged version etcd no longer has,
with no deletion record and not expired, is ``lost``.

The real thing: ``tests/integration/test_drill_data.py`` (a real sidecar and etcd),
``tests/integration/test_dualsite.py`` (a drill over a WAN with traffic on both sites)
and, with sessions sharded over real etcd clusters,
``tests/integration/test_drill_shards.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import pytest

from meshxl.client.errors import SidecarError, SidecarNotFound
from meshxl.client.plans import Session
from meshxl.etcd.shards import PREPARE, Shard, ShardMap
from meshxl.operator import changes, consistency
from meshxl.operator.changes import HistoryCompacted, Known
from meshxl.operator.consistency import (
    Baseline,
    Sharded,
    Sidecar,
    compare_sessions,
    data_check_refusals,
    lost,
)
from meshxl.operator.drill import markdown
from meshxl.statesync.record import SessionRecord

NOW = 10_000.0  # the check's clock
TTL = 1800.0


def stored(state: bytes, updated: float = NOW - 60) -> bytes:
    return SessionRecord(owner="w1", content_type="application/json", created=1.0,
                         updated=updated, data=state).encode()


def answer(session: str, revision: int, state: Any, shard: str | None = None) -> Session:
    tag = f"{shard}:{revision}" if shard else str(revision)
    return Session(id=session, state=state, etag=f'"{tag}"', owner="w1",
                   content_type="application/json", source="cache")


@dataclass
class Etcd:
    """One etcd cluster's history of one cluster's sessions: (revision, session,
    stored record; None: deleted, through the API when ``api``)."""

    events: list[tuple[int, str, bytes | None, bool]] = field(default_factory=list)
    compacted: bool = False

    def put(self, revision: int, session: str, value: bytes) -> None:
        self.events.append((revision, session, value, False))

    def delete(self, revision: int, session: str, *, api: bool) -> None:
        self.events.append((revision, session, None, api))

    @property
    def revision(self) -> int:
        return max((e[0] for e in self.events), default=1)

    def at(self, revision: int = 0) -> dict[str, tuple[int, bytes]]:
        state: dict[str, tuple[int, bytes]] = {}
        for number, session, value, _ in sorted(self.events, key=lambda e: e[0]):
            if revision and number > revision:
                break
            if value is None:
                state.pop(session, None)
            else:
                state[session] = (number, value)
        return state

    def records(self) -> dict[str, int]:
        """Deletion records: the version each API delete removed."""
        found: dict[str, int] = {}
        last: dict[str, int] = {}
        for number, session, value, api in sorted(self.events, key=lambda e: e[0]):
            if value is not None:
                last[session] = number
            elif api:
                found[session] = last[session]
        return found


class Fake:
    """etcd clusters by client (the client *is* the cluster's name), the sidecar's
    answers and its status."""

    def __init__(self) -> None:
        self.etcd: dict[Any, Etcd] = {}
        self.answers: dict[str, Any] = {}
        self.sidecar = Sidecar(url="http://192.0.2.1:7070", cluster="orders", member="w1",
                               site="west", ready=True, ttl=TTL)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Fake:
    f = Fake()

    async def identity(url: str, token: str | None, timeout: float = 5.0) -> Sidecar:
        return f.sidecar

    async def committed(client: Any, keys: Any, cluster: str,
                        revision: int = 0) -> tuple[int, dict[str, tuple[int, bytes]]]:
        return revision or f.etcd[client].revision, f.etcd[client].at(revision)

    async def written_since(client: Any, keys: Any, cluster: str, after: int,
                            until: int) -> dict[str, Known]:
        etcd = f.etcd[client]
        if etcd.compacted:
            raise HistoryCompacted(f"etcd compacted its history through revision {until}")
        return {s: changes.known(n, v) for n, s, v, _ in sorted(etcd.events)
                if after < n <= until and v is not None}

    async def deletion_records(client: Any, keys: Any, cluster: str) -> dict[str, int]:
        return f.etcd[client].records()

    async def at(client: Any, keys: Any, cluster: str, session: str,
                 revision: int) -> tuple[int, bytes] | None:
        return f.etcd[client].at(revision).get(session)

    async def read(api: Any, ids: list[str]) -> dict[str, Any]:
        return {i: f.answers.get(i, SidecarNotFound("no such session", status=404)) for i in ids}

    monkeypatch.setattr(consistency, "sidecar_identity", identity)
    monkeypatch.setattr(changes, "committed", committed)
    monkeypatch.setattr(changes, "written_since", written_since)
    monkeypatch.setattr(changes, "deletion_records", deletion_records)
    monkeypatch.setattr(consistency, "_at", at)
    monkeypatch.setattr(consistency, "_read", read)
    return f


async def base(f: Fake, sharded: Sharded | None = None) -> Baseline:
    return await consistency.baseline(None if sharded else "main",  # type: ignore[arg-type]
                                      None, "orders", sharded)  # type: ignore[arg-type]


async def check(f: Fake, before: Baseline, sharded: Sharded | None = None) -> dict[str, Any]:
    return await compare_sessions("main", None, f.sidecar, None,  # type: ignore[arg-type]
                                  before, sharded, clock=lambda: NOW)


@pytest.fixture
def drill(fake: Fake) -> Fake:
    """Three sessions before the drill (a, b, c), a written again and d created during
    it; a sidecar serving each at etcd's latest."""
    etcd = fake.etcd["main"] = Etcd()
    etcd.put(10, "a", stored(b'{"n": 1}'))
    etcd.put(12, "b", stored(b'{"n": 5}'))
    etcd.put(14, "c", stored(b'{"n": 7}'))
    fake.answers.update(a=answer("a", 30, {"n": 2}), b=answer("b", 12, {"n": 5}),
                        c=answer("c", 14, {"n": 7}), d=answer("d", 31, {"n": 0}))
    return fake


async def during(f: Fake) -> None:
    f.etcd["main"].put(30, "a", stored(b'{"n": 2}'))
    f.etcd["main"].put(31, "d", stored(b'{"n": 0}'))


async def test_what_etcd_acknowledged_served_as_it_is_matches(drill: Fake) -> None:
    before = await base(drill)
    assert before.revisions == {None: 14} and set(before.sessions) == {"a", "b", "c"}
    await during(drill)
    report = await check(drill, before)
    assert report["ok"], report
    assert (report["sessions"], report["matched"], report["at_revision"]) == (4, 4, 31)
    assert report["written_during"] == 2 and report["history"] == {}


async def test_an_answer_older_than_etcd_s_latest_is_stale(drill: Fake) -> None:
    before = await base(drill)
    await during(drill)
    # The sidecar claims nothing here: what it serves is compared with etcd's latest,
    # revision 30, read before it was asked (it used to pass against a low revision the
    # sidecar said it had applied).
    drill.answers["a"] = answer("a", 10, {"n": 1})
    report = await check(drill, before)
    assert not report["ok"] and report["problems"] == {"stale": 1}, report
    [named] = report["named"]["stale"]
    assert named.startswith("a: sidecar revision 10, etcd had acknowledged 30"), named


async def test_a_session_deleted_behind_the_api_is_lost(drill: Fake) -> None:
    before = await base(drill)
    await during(drill)
    drill.etcd["main"].delete(40, "b", api=False)  # etcdctl del
    drill.etcd["main"].delete(41, "d", api=False)  # written during the drill, then gone
    drill.answers.pop("b")
    drill.answers.pop("d")
    report = await check(drill, before)
    assert report["problems"] == {"lost": 2}, report
    named = dict(n.split(": ", 1) for n in report["named"]["lost"])
    assert named["b"].startswith("revision 12 acknowledged, gone from etcd without a "
                                 "deletion record, 60 s after its last write"), named
    assert named["d"].startswith("revision 31 acknowledged"), named
    assert "1 lost" not in markdown_of(report) and "2 lost" in markdown_of(report)


async def test_a_session_deleted_through_the_api_or_expired_is_not_lost(drill: Fake) -> None:
    before = await base(drill)
    await during(drill)
    drill.etcd["main"].delete(40, "b", api=True)   # its deletion record names 12
    drill.etcd["main"].put(42, "e", stored(b"{}", updated=NOW - TTL - 1))
    drill.etcd["main"].delete(43, "e", api=False)  # its lease ended
    drill.etcd["main"].delete(44, "d", api=True)   # created during the drill, deleted
    for s in ("b", "d"):
        drill.answers.pop(s)
    report = await check(drill, before)
    assert report["ok"] and report["sessions"] == 5 and report["matched"] == 5, report


def test_a_deletion_record_of_an_older_version_excuses_nothing() -> None:
    acknowledged = Known(20, NOW - 5)
    assert lost(acknowledged, None, deleted=20, ttl=TTL, clock=NOW) is None
    assert lost(acknowledged, None, deleted=25, ttl=TTL, clock=NOW) is None
    assert lost(acknowledged, None, deleted=12, ttl=TTL, clock=NOW) is not None
    assert lost(acknowledged, None, deleted=0, ttl=TTL, clock=NOW + TTL) is None  # expired
    assert lost(acknowledged, (25, b""), deleted=0, ttl=TTL, clock=NOW) is None
    went_back = lost(acknowledged, (15, b""), deleted=0, ttl=TTL, clock=NOW)
    assert went_back == "etcd has revision 15, older than revision 20 it acknowledged"
    assert lost(Known(20, None), None, deleted=0, ttl=TTL, clock=NOW + 10 * TTL) is not None


async def test_an_etcd_restored_from_an_older_backup_lost_what_came_after(
        drill: Fake) -> None:
    before = await base(drill)
    drill.etcd["main"].put(20, "b", stored(b'{"n": 6}'))  # acknowledged before the drill
    before = await base(drill)
    drill.etcd["main"].events = [e for e in drill.etcd["main"].events if e[0] < 13]
    drill.answers.update(a=answer("a", 10, {"n": 1}), b=answer("b", 12, {"n": 5}))
    drill.answers.pop("c")
    report = await check(drill, before)
    assert report["problems"] == {"lost": 2}, report
    assert "b: etcd has revision 12, older than revision 20" in report["named"]["lost"][0]
    assert report["history"] == {"main": "etcd's revision went back from 20 at the baseline "
                                         "to 12: restored from a backup?"}


async def test_a_compacted_history_is_said_and_the_baseline_still_checked(
        drill: Fake) -> None:
    before = await base(drill)
    await during(drill)
    drill.etcd["main"].compacted = True
    drill.etcd["main"].delete(45, "d", api=False)
    drill.etcd["main"].delete(46, "c", api=False)
    drill.answers.pop("d")
    drill.answers.pop("c")
    report = await check(drill, before)
    # d, written and lost during the drill, is not seen without the history; c is.
    assert report["problems"] == {"lost": 1} and report["sessions"] == 3, report
    assert "compacted" in report["history"]["main"], report


@pytest.mark.parametrize(("served", "kind"), [
    (answer("b", 12, {"n": 6}), "different"),      # other bytes at the same revision
    (answer("b", 11, {"n": 5}), "stale"),          # older than etcd's
    (answer("b", 99, {"n": 5}), "different"),      # a revision etcd never gave it
    (SidecarNotFound("no such session", status=404), "missing"),
    (SidecarError("502 from the sidecar"), "unreadable"),
])
async def test_what_a_surviving_member_would_serve_wrong_fails(
        drill: Fake, served: Any, kind: str) -> None:
    before = await base(drill)
    await during(drill)
    drill.answers["b"] = served
    report = await check(drill, before)
    assert not report["ok"] and report["problems"] == {kind: 1}, report
    assert report["named"][kind][0].startswith("b")


async def test_a_session_served_after_etcd_deleted_it_through_the_api_is_stale(
        drill: Fake) -> None:
    before = await base(drill)
    await during(drill)
    drill.etcd["main"].delete(40, "c", api=True)
    report = await check(drill, before)
    assert report["problems"] == {"stale": 1}, report
    assert "etcd had acknowledged its deletion" in report["named"]["stale"][0]


# -- sessions sharded over two etcd clusters, each counting its own revisions -------------

SHARDS = ShardMap(3, (Shard("s1", "http://192.0.2.11:2379"),
                      Shard("s2", "http://192.0.2.12:2379")))
SHARDED = Sharded(SHARDS, {"s1": "s1", "s2": "s2"})  # type: ignore[dict-item]


def ids_in(name: str, count: int) -> list[str]:
    found = [f"u{i}" for i in range(200) if SHARDS.of(f"u{i}").name == name]
    return found[:count]


A, B = ids_in("s1", 2)
C, D = ids_in("s2", 2)


@pytest.fixture
def shards(fake: Fake) -> Fake:
    """s1's revisions run far ahead of s2's, so a session compared at another shard's
    revision, or in another shard, is found stale or missing."""
    one, two = fake.etcd["s1"], fake.etcd["s2"] = Etcd(), Etcd()
    one.put(100, A, stored(b'{"n": 1}'))
    one.put(110, B, stored(b'{"n": 5}'))
    two.put(10, C, stored(b'{"n": 7}'))
    two.put(12, D, stored(b'{"n": 8}'))
    fake.sidecar = dataclasses.replace(fake.sidecar, shard_map=SHARDS.version,
                                       shards={"s1": 120, "s2": 20})
    fake.answers.update({A: answer(A, 130, {"n": 2}, "s1"), B: answer(B, 110, {"n": 5}, "s1"),
                         C: answer(C, 10, {"n": 7}, "s2"), D: answer(D, 25, {"n": 9}, "s2")})
    return fake


async def shards_during(f: Fake) -> None:
    f.etcd["s1"].put(130, A, stored(b'{"n": 2}'))
    f.etcd["s2"].put(25, D, stored(b'{"n": 9}'))


async def test_each_session_is_compared_in_its_shard_with_that_shards_history(
        shards: Fake) -> None:
    before = await base(shards, SHARDED)
    assert before.revisions == {"s1": 110, "s2": 12}
    await shards_during(shards)
    report = await check(shards, before, SHARDED)
    assert report["ok"], report
    assert (report["sessions"], report["matched"], report["written_during"]) == (4, 4, 2)
    assert report["at_revision"] is None
    assert report["shards"] == [
        {"shard": "s1", "at_revision": 130, "sessions": 2, "matched": 2, "problems": {}},
        {"shard": "s2", "at_revision": 25, "sessions": 2, "matched": 2, "problems": {}}]


@pytest.mark.parametrize(("served", "kind", "text"), [
    (answer(D, 12, {"n": 8}, "s2"), "stale", "sidecar revision 12, etcd had acknowledged 25"),
    (answer(D, 25, {"n": 0}, "s2"), "different", "other bytes at revision 25"),
    (answer(D, 25, {"n": 9}, "s1"), "different", "served from shard s1"),
    (answer(D, 25, {"n": 9}), "different", "served from no shard"),
    (SidecarNotFound("no such session", status=404), "missing", ""),
])
async def test_a_wrong_answer_is_named_with_its_shard(
        shards: Fake, served: Any, kind: str, text: str) -> None:
    before = await base(shards, SHARDED)
    await shards_during(shards)
    shards.answers[D] = served
    report = await check(shards, before, SHARDED)
    assert not report["ok"] and report["problems"] == {kind: 1}, report
    [named] = report["named"][kind]
    assert named.startswith(f"{D} (shard s2)") and text in named, named
    assert [s["problems"] for s in report["shards"]] == [{}, {kind: 1}]
    assert "shard s2" in markdown_of(report) and f"1 {kind}" in markdown_of(report)


async def test_a_session_lost_in_one_shard_is_named_with_it(shards: Fake) -> None:
    before = await base(shards, SHARDED)
    await shards_during(shards)
    shards.etcd["s1"].delete(140, B, api=False)
    shards.etcd["s2"].delete(30, C, api=True)  # another shard's record excuses no other
    shards.answers.pop(B)
    shards.answers.pop(C)
    report = await check(shards, before, SHARDED)
    assert report["problems"] == {"lost": 1}, report
    assert report["named"]["lost"][0].startswith(f"{B} (shard s1): revision 110")
    assert [s["problems"] for s in report["shards"]] == [{"lost": 1}, {}]


async def test_a_session_stored_outside_its_shard_is_misplaced(shards: Fake) -> None:
    before = await base(shards, SHARDED)
    stray = ids_in("s1", 3)[2]  # s1's, but stored in s2, where no sidecar looks for it
    await shards_during(shards)
    shards.etcd["s2"].put(15, stray, stored(b'{"n": 3}'))
    report = await check(shards, before, SHARDED)
    assert report["problems"] == {"misplaced": 1}, report
    assert report["named"]["misplaced"] == [f"{stray} (shard s2): the map puts it in shard s1"]


async def test_a_sidecar_on_another_shard_map_is_not_compared(shards: Fake) -> None:
    before = await base(shards, SHARDED)
    shards.sidecar = dataclasses.replace(shards.sidecar, shard_map=SHARDS.version + 1)
    report = await check(shards, before, SHARDED)
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
