"""A restore never rewinds what clients and sidecars hold: a real etcd snapshot, writes
after it, the cluster restored from it (``etcdctl snapshot restore``, etcd 3.4: no
``--bump-revision``) under a sidecar that keeps running.

Before: the sidecar resumed its watch from a revision the restored cluster had not
reached ("session watch resumed from revision 12" on a cluster at ~6), so the writes in
between never reached its cache; and an ETag handed out after the snapshot could match
a new write that landed on the same revision. Now the sidecar sees the revision go back
and reads everything again, and ``meshxl restore bump`` moves the revision past every
one handed out before, which ``meshxl restore check`` confirms before traffic returns.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from meshxl.etcd.keys import Keys
from meshxl.local.ports import free_port
from meshxl.local.wait import wait_until
from meshxl.statesync.record import SessionRecord
from tests.harness import EtcdServer
from tests.harness.cli import meshxl
from tests.integration.test_etcd_backup import etcdctl

pytestmark = pytest.mark.integration


async def test_a_restore_is_seen_and_the_revision_moved_past_old_etags(
        harness: Any, etcd: EtcdServer, start_sidecar: Any, tmp_path: Path) -> None:
    sidecar = await start_sidecar(cluster="shop", member="a", etcd=etcd.url,
                                  app_port=free_port())
    assert (await sidecar.put("s1", {"v": 1})).status == 201
    snapshot = tmp_path / "snapshot.db"
    await etcdctl("snapshot", "save", str(snapshot), endpoints=etcd.url)
    for v in range(2, 8):  # written after the snapshot: lost by the restore
        reply = await sidecar.put("s1", {"v": v})
        assert reply.status == 200
    stale_etag = reply.headers["ETag"]

    # PAST, as docs/kubernetes.md reads it: the sidecar's revision (once its watch has
    # brought its own last write).
    async def caught_up() -> Any:
        revision = int((await sidecar.status())["revision"])
        return revision >= int(stale_etag.strip('"')) and revision
    before = await wait_until(caught_up, timeout=10, what="the sidecar's cache caught up")

    # -- all of etcd lost; restored from the snapshot on the same address ----------------
    await etcd.kill()
    shutil.rmtree(etcd.data_dir)
    peer = f"http://127.0.0.1:{etcd.peer_port}"
    await etcdctl("snapshot", "restore", str(snapshot), f"--name={etcd.name}",
                  f"--data-dir={etcd.data_dir}", f"--initial-cluster={etcd.name}={peer}",
                  f"--initial-advertise-peer-urls={peer}",
                  f"--initial-cluster-token={etcd._token}")
    await etcd.start()

    # The sidecar sees etcd's revision go back: it drops its cache, reads everything.
    async def reread() -> Any:
        status = await sidecar.status()
        return status["rewinds"] >= 1 and status["ready"] and status
    await wait_until(reread, timeout=30, what="the sidecar to see the rewind and re-read")
    assert "etcd's revision went back" in sidecar.logs()
    assert (await sidecar.get("s1")).json() == {"v": 1}  # what the snapshot holds

    # Another writer's session after the restore reaches this sidecar's watch-fed cache
    # (its watch resumed from where the restored cluster is, not from the lost future).
    record = SessionRecord(owner="b", content_type="application/json", created=1.0,
                           updated=1.0, data=b'{"from":"b"}')
    async with etcd.client() as client:
        await client.put(Keys().session("shop", "s9").encode(), record.encode())

    async def cached() -> bool:
        got = await sidecar.get("s9")
        return got.status == 200 and got.source == "cache"
    await wait_until(cached, timeout=10, what="s9 in the sidecar's cache")

    # Before the bump, new writes reach the stale ETag's revision again: another writer's
    # write of s1 lands exactly on it. The sidecar, which saw the history go back, still
    # refuses the stale ETag (it used to compare it, and the write went through: a lost
    # update of state the client never saw).
    stale = int(stale_etag.strip('"'))
    async with etcd.client() as client:
        key = Keys().session("shop", "s1").encode()
        landed = 0
        for _ in range(5):
            now = (await client.put(b"/filler", b"x")).header.revision
            while now < stale - 1:
                now = (await client.put(b"/filler", b"x")).header.revision
            if now >= stale:
                break
            landed = (await client.put(key, SessionRecord(
                owner="b", content_type="application/json", created=1.0, updated=1.0,
                data=b'{"v":"b"}').encode())).header.revision
            if landed == stale:
                break
    assert landed == stale, (landed, stale)

    async def b_seen() -> bool:
        return (await sidecar.get("s1")).json() == {"v": "b"}
    await wait_until(b_seen, timeout=10, what="b's write of s1 in the sidecar's view")
    refused = await sidecar.put("s1", {"v": "stale"}, if_match=stale_etag)
    assert refused.status == 412 and "restored" in refused.json()["error"], refused
    assert (await sidecar.get("s1")).json() == {"v": "b"}

    # -- before traffic returns: check (not safe), bump past every old revision, check ----
    code, out, err = await meshxl("restore", "check", "--past", str(before),
                                  "--etcd", etcd.url)
    assert code == 1 and "meshxl restore bump" in out, (out, err)
    code, out, err = await meshxl("restore", "bump", "--past", str(before),
                                  "--etcd", etcd.url, "--output", "json")
    assert code == 0, err
    bumped = json.loads(out)
    assert bumped["after"] > before
    code, out, err = await meshxl("restore", "check", "--past", str(before),
                                  "--etcd", etcd.url, "--output", "json")
    assert code == 0 and json.loads(out)["safe"], (out, err)

    # A client holding a post-snapshot ETag never overwrites what it did not see.
    await sidecar.wait_ready(timeout=30)
    for _ in range(3):
        refused = await sidecar.put("s1", {"v": "stale"}, if_match=stale_etag)
        assert refused.status == 412, refused
    assert (await sidecar.get("s1")).json() == {"v": "b"}
