"""The session layer on a real etcd, built here without the sidecar (no housekeeping, no
HTTP), so what it does between two of the sidecar's periodic tasks is not left to timing.

Delayed sync: a session younger than ``sync_delay`` stays on its member; the first write
after that replicates it, as the periodic flush would, and leaves nothing behind on the
member that a read or a later flush could take for newer. Session leases: a lease etcd
no longer has costs a write nothing but a new lease.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from meshxl import etcd as metcd
from meshxl.errors import PreconditionFailed
from meshxl.etcd.keys import Keys
from meshxl.local.wait import wait_until
from meshxl.statesync.cache import SessionCache
from meshxl.statesync.metrics import StatesyncMetrics
from meshxl.statesync.record import SessionRecord
from meshxl.statesync.sessions import Sessions
from meshxl.statesync.store import SessionStore
from meshxl.statesync.writes import Settings, Stored, Write
from tests.harness import EtcdServer

pytestmark = pytest.mark.integration

DELAY = 0.3
KEYS = Keys("/meshxl")


@pytest.fixture
async def sessions(etcd: EtcdServer) -> AsyncIterator[Sessions]:
    client = metcd.client(etcd.url)
    await client.connect()
    store = SessionStore(client, ttl=60.0)
    cache = SessionCache(client, KEYS.sessions_prefix("orders"))
    try:
        yield Sessions(store, cache, KEYS, "orders", "a", Settings(sync_delay=DELAY),
                       StatesyncMetrics())
    finally:
        await store.close()
        await client.close()


async def put(sessions: Sessions, session_id: str, data: bytes, **conditions: Any) -> Stored:
    [outcome] = await sessions.write([Write(session_id=session_id, data=data, **conditions)])
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


async def _in_etcd(etcd: EtcdServer, session: str) -> SessionRecord | None:
    async with etcd.client() as client:
        got = await client.get(KEYS.session("orders", session).encode())
    return SessionRecord.decode(got.value) if got is not None else None


async def _due(stored: Stored) -> None:
    await wait_until(lambda: time.time() - stored.record.created >= DELAY, timeout=5,
                     what="the local session due for replication")


async def test_a_write_after_sync_delay_replicates_the_session_and_nothing_stays_behind(
        sessions: Sessions, etcd: EtcdServer) -> None:
    first = await put(sessions, "s", b'{"v":1}')
    assert first.source == "local" and first.new_session and first.etag == "L1"
    await _due(first)
    second = await put(sessions, "s", b'{"v":2}')
    # Now in etcd, as the session that was kept locally: 200, created when it was created.
    assert second.source == "etcd" and second.etag.isdigit()
    assert not second.new_session and second.record.created == first.record.created
    assert sessions.local_sessions == 0
    got = await sessions.get("s")
    assert got.source != "local" and json.loads(got.record.data) == {"v": 2}
    # The next flush finds nothing to replicate: it never writes the older state back.
    assert await sessions.flush_due() == 0
    stored = await _in_etcd(etcd, "s")
    assert stored is not None and json.loads(stored.data) == {"v": 2}
    assert stored.created == first.record.created


async def test_conditions_on_a_due_session_are_those_of_its_local_version(
        sessions: Sessions, etcd: EtcdServer) -> None:
    first = await put(sessions, "c", b'{"v":1}')
    await _due(first)
    # It exists (here): a creation fails, an If-Match of another version too.
    with pytest.raises(PreconditionFailed):
        await put(sessions, "c", b'{"v":2}', create_only=True)
    with pytest.raises(PreconditionFailed):
        await put(sessions, "c", b'{"v":2}', if_match='"L7"')
    assert await _in_etcd(etcd, "c") is None and sessions.local_sessions == 1
    # Its own version's ETag matches, and the write replicates it.
    replicated = await put(sessions, "c", b'{"v":3}', if_match=f'"{first.etag}"')
    assert replicated.source == "etcd" and not replicated.new_session
    stored = await _in_etcd(etcd, "c")
    assert stored is not None and json.loads(stored.data) == {"v": 3}


async def test_a_session_lease_etcd_lost_is_granted_anew_for_every_kind_of_write(
        etcd: EtcdServer, caplog: pytest.LogCaptureFixture) -> None:
    """etcd lost the lease of the current TTL bucket (revoked, as after a long pause):
    a single write, a bulk write and a transaction each get it refused, a new lease is
    granted, and the write is stored. A lease belongs to a bucket (``ttl / 10``, 6 s
    here): a round that crosses into the next one never meets the lost lease, so it is
    run again (beside CPU hogs one did)."""
    client = metcd.client(etcd.url)
    await client.connect()
    store = SessionStore(client, ttl=60.0)
    cache = SessionCache(client, KEYS.sessions_prefix("orders"))
    sessions = Sessions(store, cache, KEYS, "orders", "a", Settings(), StatesyncMetrics())

    def bucket() -> int:
        return int(time.time() // store.leases.bucket)

    async def lost_and_written(kind: str, n: int) -> bool:
        """One round; whether it ran within one bucket (else it proves nothing)."""
        began, gone = bucket(), caplog.text.count("a session lease is gone")
        await put(sessions, f"before-{kind}-{n}", b"{}")
        lost = store.lease_now()
        if lost is None:
            return False  # the put's bucket is over already
        await client.revoke_lease(lost)  # etcd lost it, as after a long pause
        if kind == "single":
            written = [await put(sessions, f"after-single-{n}", b"{}")]
        elif kind == "bulk":
            written = await sessions.write(  # type: ignore[assignment]
                [Write(session_id=f"after-bulk-{n}-{i}", data=b"{}") for i in range(3)])
        else:
            done = await sessions.write([Write(session_id=f"after-transaction-{n}",
                                               data=b"{}")], atomic=True)
            assert done.committed
            written = [s for s in done.stored if s is not None]
        assert all(isinstance(w, Stored) for w in written), written
        for stored in written:
            assert await _in_etcd(etcd, stored.session_id) is not None
        now = store.lease_now()
        if bucket() != began:
            return False
        # etcd refused the lost lease, and a new one was granted.
        assert caplog.text.count("a session lease is gone") == gone + 1
        assert now not in (None, lost)
        return True

    try:
        for kind in ("single", "bulk", "transaction"):
            for n in range(3):
                if await lost_and_written(kind, n):
                    break
            else:
                pytest.fail(f"{kind}: every round crossed a lease bucket")
    finally:
        await store.close()
        await client.close()
