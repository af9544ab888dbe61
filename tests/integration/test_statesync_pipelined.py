"""PUTs pipelined on one connection are taken up together (``SessionRoutes.put_group``,
``Sessions.write(..., early=True)``): each answered exactly as it would be alone, in
order, whatever its neighbours do; a session's writes stay in the order sent; a write
whose session is busy waits alone, holding back no other answer; nothing is left locked.

The sidecar runs in this process on a real socket and a real etcd, so its sessions'
locks can be held and inspected; a plain socket sends the requests in one write.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from meshxl.errors import InputError, PreconditionFailed, TooLarge
from meshxl.etcd.keys import Keys
from meshxl.statesync import app
from meshxl.statesync.record import SessionRecord
from meshxl.statesync.sessions import Sessions
from meshxl.statesync.writes import Stored, Write
from tests.harness import EtcdServer, inproc
from tests.harness.clock import window
from tests.harness.inproc import RawHttp

pytestmark = pytest.mark.integration

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Sidecar:
    def __init__(self, port: int, side: app.Sidecar):
        self.port, self.side = port, side

    async def pipelined(self, *requests: inproc.Request
                        ) -> list[tuple[int, dict[str, str], bytes]]:
        """The requests in one write on a new connection; their answers, in order."""
        http = await RawHttp.open(self.port)
        try:
            return await http.pipelined(requests)
        finally:
            http.close()


@pytest.fixture
async def sidecar(etcd: EtcdServer) -> AsyncIterator[Sidecar]:
    async with inproc.sidecar(etcd.url) as (port, side):
        yield Sidecar(port, side)


def put(session: str, state: Any, **headers: str) -> tuple[str, str, bytes, dict[str, str]]:
    body = state if isinstance(state, bytes) else json.dumps(state).encode()
    return "PUT", f"/v1/sessions/{session}", body, {k.replace("_", "-"): v
                                                      for k, v in headers.items()}


async def stored(etcd: EtcdServer, session: str) -> SessionRecord | None:
    from meshxl import etcd as metcd
    async with metcd.client(etcd.url) as client:
        got = await client.get(Keys("/meshxl").session("orders", session).encode())
    return SessionRecord.decode(got.value) if got is not None else None


async def test_pipelined_puts_answer_as_each_would_alone(sidecar: Sidecar,
                                                         etcd: EtcdServer) -> None:
    first = await sidecar.pipelined(put("b", {"v": 0}))
    assert first[0][0] == 201
    b_etag = first[0][1]["etag"]
    got = await sidecar.pipelined(
        put("a", {"v": 1}),                                    # created
        put("b", {"v": 1}, If_Match=b_etag),                   # replaced, its ETag matches
        put("bad!id", {"v": 1}),                               # 400
        put("c", b'{"not json'),                               # 400
        put("a", {"v": 2}),                                    # a again: after the first
        put("d", {"v": 1}, If_None_Match="*"),                 # created
        put("b", {"v": 2}, If_Match='"1"'),                    # 412: not that revision
        ("GET", "/v1/sessions/a", b"", {}),                    # waits for both writes of a
        put("e", {"v": 1}, If_Match="*"),                      # 412: does not exist
        put("f", {"v": 1}, traceparent=TRACEPARENT),           # its own trace context
        put("g", {"v": 1}, If_None_Match='"7"'),               # 400: only "*"
        put("h", {"v": 1}, If_Match='"3"', If_None_Match="*"),  # 400: not both
        put("b", {"v": 3}, If_None_Match="*"),                 # 412: exists
    )
    statuses = [status for status, _, _ in got]
    assert statuses == [201, 200, 400, 400, 200, 201, 412, 200, 412, 201, 400, 400, 412]
    a1, a2 = json.loads(got[0][2]), json.loads(got[4][2])
    assert a1["created"] and not a2["created"] and int(a2["etag"]) > int(a1["etag"])
    assert json.loads(got[7][2]) == {"v": 2} and got[7][1]["etag"] == f'"{a2["etag"]}"'
    assert "invalid session id" in json.loads(got[2][2])["error"]
    assert json.loads(got[3][2])["field"] == "body"
    assert "If-Match" in json.loads(got[11][2])["error"]
    for status, headers, _body in got:
        if status in (200, 201):
            assert headers["etag"].strip('"').isdigit() and headers["x-meshxl-owner"] == "a"
    assert json.loads((await stored(etcd, "b")).data) == {"v": 1}  # type: ignore[union-attr]
    assert await stored(etcd, "c") is None and await stored(etcd, "e") is None
    f = await stored(etcd, "f")
    a = await stored(etcd, "a")
    assert f is not None and f.traceparent == TRACEPARENT
    assert a is not None and a.traceparent is None and json.loads(a.data) == {"v": 2}
    assert len(sidecar.side.sessions.locks) == 0


async def _put(sessions: Sessions, session_id: str, data: bytes) -> Stored:
    [outcome] = await sessions.write([Write(session_id=session_id, data=data)])
    assert isinstance(outcome, Stored), outcome
    return outcome


async def test_a_busy_session_waits_alone_and_keeps_its_place(sidecar: Sidecar) -> None:
    """A write whose session another write holds waits for it, in line, in a task of its
    own; the others of its group go on and have their outcomes meanwhile. A write of
    that session made after the group still comes after the group's."""
    sessions = sidecar.side.sessions
    assert sessions.locks.try_acquire("busy")  # another write of it, under way
    writes = [Write(session_id=s, data=json.dumps({"by": "group", "s": s}).encode())
              for s in ("x", "busy", "y")]
    async with asyncio.timeout(10):
        outcomes = await sessions.write(writes, early=True)
    assert isinstance(outcomes[0], Stored) and isinstance(outcomes[2], Stored)
    waiting = outcomes[1]
    assert isinstance(waiting, asyncio.Task)
    later = asyncio.get_running_loop().create_task(_put(sessions, "busy", b'{"by": "later"}'))
    await window(0.05, "a while for what must not happen")
    assert not waiting.done() and not later.done()
    sessions.locks.release("busy")
    async with asyncio.timeout(10):
        first = await waiting
        last = await later
    assert isinstance(first, Stored) and int(last.etag) > int(first.etag)
    got = await sessions.get("busy")
    assert json.loads(got.record.data) == {"by": "later"}
    assert len(sessions.locks) == 0


async def test_a_cancelled_group_leaves_no_session_locked(sidecar: Sidecar) -> None:
    sessions = sidecar.side.sessions
    assert sessions.locks.try_acquire("held")
    writes = [Write(session_id=s, data=b"{}") for s in ("held", "p", "q")]
    group = asyncio.get_running_loop().create_task(sessions.write(writes, early=True))
    await asyncio.sleep(0)  # its places taken, its writes not yet answered
    group.cancel()
    with pytest.raises(asyncio.CancelledError):
        await group
    sessions.locks.release("held")
    assert len(sessions.locks) == 0
    stored_ = await _put(sessions, "held", b"{}")  # nothing in its way
    assert isinstance(stored_, Stored)


async def test_refusals_in_a_group_are_the_ones_put_gives(sidecar: Sidecar) -> None:
    sessions = sidecar.side.sessions
    created = await _put(sessions, "r", b"{}")
    outcomes = await sessions.write([
        Write(session_id="r", data=b"{}", create_only=True),
        Write(session_id="s", data=b"{}", if_match=f'"{int(created.etag) + 1000}"'),
        Write(session_id="t", data=b"x" * (sessions.settings.max_bytes + 1)),
        Write(session_id="bad!id", data=b"{}"),
        Write(session_id="v", data=b"{}", if_match='"7"', create_only=True),
    ], early=True)
    assert isinstance(outcomes[0], PreconditionFailed)
    assert isinstance(outcomes[1], PreconditionFailed)
    assert type(outcomes[2]) is TooLarge
    assert type(outcomes[3]) is InputError and type(outcomes[4]) is InputError
    assert len(sessions.locks) == 0
