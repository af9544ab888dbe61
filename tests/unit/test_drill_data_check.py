"""The drill's data check (``meshxl.operator.consistency``) judging what a sidecar
answered against etcd at the revision it answered from, without processes: etcd's
history and the sidecar's answers are what each test says.

The real thing (a drill over a WAN with traffic on both sites) is
``tests/integration/test_dualsite.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

from meshxl.client.errors import NotFound, SidecarError
from meshxl.client.plans import Session
from meshxl.operator import consistency
from meshxl.operator.consistency import Sidecar, compare_sessions
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


def _as_of(revision: int) -> dict[str, tuple[int, bytes]]:
    out = {}
    for session, versions in HISTORY.items():
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

    async def committed(client: Any, keys: Any, cluster: str,
                        revision: int = 0) -> dict[str, tuple[int, bytes]]:
        return _as_of(revision)

    async def at(client: Any, keys: Any, cluster: str, session: str,
                 revision: int) -> tuple[int, bytes] | None:
        return _as_of(revision).get(session)

    async def read(api: Any, ids: list[str]) -> dict[str, Any]:
        return {i: answers[i] for i in ids}

    monkeypatch.setattr(consistency, "sidecar_identity", identity)
    monkeypatch.setattr(consistency, "committed", committed)
    monkeypatch.setattr(consistency, "_at", at)
    monkeypatch.setattr(consistency, "_read", read)
    return answers


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
