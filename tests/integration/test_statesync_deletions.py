"""A session deleted through the API leaves a deletion record in etcd, committed in the
same transaction as the delete: ``{root}/v1/deleted/{cluster}/{session}/{revision}``
naming the version deleted, leased like a session. So a session gone from etcd without
one was not deleted through the API (the drill's data check counts it ``lost`` unless
it may have expired: ``tests/integration/test_drill_data.py``). A refused delete leaves
none, and the records are no sessions to any sidecar's cache.
"""

from __future__ import annotations

import json
from typing import Any

import aetcd
import pytest

from meshxl.etcd.keys import Keys
from meshxl.local.ports import free_port
from meshxl.local.wait import wait_until
from meshxl.statesync.deletions import DeletionRecord

pytestmark = pytest.mark.integration

KEYS = Keys()


async def records(client: aetcd.Client, cluster: str = "shop") -> dict[str, Any]:
    prefix = KEYS.deletions_prefix(cluster).encode()
    found = {}
    for kv in await client.get_prefix(prefix):
        found[kv.key[len(prefix):].decode()] = kv
    return found


async def test_a_delete_through_the_api_leaves_its_record(
        etcd: Any, etcd_client: aetcd.Client, start_sidecar: Any) -> None:
    a = await start_sidecar(cluster="shop", member="a", etcd=etcd.url, app_port=free_port())
    watcher = await start_sidecar(cluster="shop", member="w", etcd=etcd.url,
                                  app_port=free_port())
    assert (await a.put("s1", {"v": 1})).status == 201
    v2 = await a.put("s1", {"v": 2})
    revision = int(v2.etag.strip('"'))

    refused = await a.delete("s1", if_match='"1"')
    assert refused.status == 412, refused
    assert await records(etcd_client) == {}  # nothing deleted, nothing recorded

    assert (await a.delete("s1")).status == 204
    found = await records(etcd_client)
    assert list(found) == [f"s1/{revision}"], found
    kv = found[f"s1/{revision}"]
    record = DeletionRecord.decode(kv.value)
    assert record.member == "a" and record.at > 0, record
    assert kv.lease != 0  # it expires as a session would
    gone = await etcd_client.get(KEYS.session("shop", "s1").encode())
    assert gone is None
    # Deleted in the same revision as the session: one transaction.
    assert kv.mod_revision == kv.create_revision and kv.mod_revision > revision

    # In a transaction: a record per session deleted, none for the others.
    for session in ("t1", "t2"):
        assert (await a.put(session, {"v": 0})).status == 201
    t1 = int((await a.get("t1")).etag.strip('"'))
    done = await a.transaction([{"operation": "delete", "session": "t1"},
                                {"operation": "upsert", "session": "t2", "data": {"v": 1}}])
    assert done.status == 200 and done.json()["committed"], done
    found = await records(etcd_client)
    assert set(found) == {f"s1/{revision}", f"t1/{t1}"}, found
    assert json.loads(found[f"t1/{t1}"].value)["member"] == "a"

    # A session kept only on this member (delayed sync) never reached etcd: nothing to
    # record. And no sidecar takes a record for a session.
    # (The watcher's cache follows etcd's watch: wait for t2's delete to reach it.)
    async def followed() -> bool:
        return (await watcher.status())["cached_sessions"] == 1

    await wait_until(followed, timeout=10, what="the watcher's cache to hold only t2",
                     explain=watcher.status)
    status = await watcher.status()
    assert status["bad_records"] == 0 and status["cached_sessions"] == 1, status
