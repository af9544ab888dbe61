"""A restore never rewinds what clients and sidecars hold: a real etcd snapshot, writes
after it, the cluster restored from it (``etcdctl snapshot restore``, etcd 3.4: no
``--bump-revision``) under a sidecar that keeps running.

Before: the sidecar resumed its watch from a revision the restored cluster had not
reached ("session watch resumed from revision 12" on a cluster at ~6), so the writes in
between never reached its cache; and an ETag handed out after the snapshot could match
a new write that landed on the same revision. Now the sidecar sees the revision go back
and reads everything again, and ``meshxl restore bump`` moves the revision past every
one handed out before, which ``meshxl restore check`` confirms before traffic returns.

The same holds with ``sessions.replication: narrow``, where a sidecar runs no watch:
it used to serve a value of the lost history and let a stale ``If-Match`` overwrite
another writer's value at that same revision (200 where ``all`` answered 412). Every
etcd answer's header now tells it the revision went back (one etcd cluster at a time:
with session shards, each shard on its own), and a restored cluster whose revision was
bumped but whose content is older shows itself by a session whose revision went back.
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
from meshxl.operator.actions import apply_model
from meshxl.statesync.record import SessionRecord
from tests.harness import EtcdServer
from tests.harness.cli import meshxl, meshxl_json
from tests.harness.etcd import start_etcd
from tests.integration.test_etcd_backup import etcdctl

pytestmark = pytest.mark.integration

KEYS = Keys()


def model(replication: str) -> str:
    return f"""\
clusters:
- name: shop
  mode: load-sharing
  membership: registered
  sessions: {{replication: {replication}}}
  members:
  - {{name: a, address: 127.0.0.1, port: 1}}
"""


def record(data: bytes, owner: str = "b") -> bytes:
    return SessionRecord(owner=owner, content_type="application/json", created=1.0,
                         updated=1.0, data=data).encode()


async def restore(etcd: EtcdServer, snapshot: Path) -> None:
    """All of ``etcd`` lost, restored from ``snapshot`` on the same address (same
    member name, peer URL and cluster token: the same cluster id)."""
    await etcd.kill()
    shutil.rmtree(etcd.data_dir)
    peer = f"http://127.0.0.1:{etcd.peer_port}"
    await etcdctl("snapshot", "restore", str(snapshot), f"--name={etcd.name}",
                  f"--data-dir={etcd.data_dir}", f"--initial-cluster={etcd.name}={peer}",
                  f"--initial-advertise-peer-urls={peer}",
                  f"--initial-cluster-token={etcd._token}")
    await etcd.start()


async def land_on(etcd: EtcdServer, key: bytes, value: bytes, revision: int) -> None:
    """Another writer's put of ``key`` landing exactly on ``revision`` (filler writes
    elsewhere first)."""
    async with etcd.client() as client:
        landed = 0
        for _ in range(5):
            now = (await client.put(b"/filler", b"x")).header.revision
            while now < revision - 1:
                now = (await client.put(b"/filler", b"x")).header.revision
            if now >= revision:
                break
            landed = (await client.put(key, value)).header.revision
            if landed == revision:
                break
    assert landed == revision, (landed, revision)


@pytest.mark.parametrize("replication", ["all", "narrow"])
async def test_a_restore_is_seen_and_the_revision_moved_past_old_etags(
        harness: Any, etcd: EtcdServer, etcd_client: Any, start_sidecar: Any,
        tmp_path: Path, replication: str) -> None:
    await apply_model(etcd_client, KEYS, model(replication), "test")
    sidecar = await start_sidecar(cluster="shop", member="a", etcd=etcd.url,
                                  app_port=free_port())
    assert (await sidecar.status())["settings"]["replication"] == replication
    assert (await sidecar.put("s1", {"v": 1})).status == 201
    snapshot = tmp_path / "snapshot.db"
    await etcdctl("snapshot", "save", str(snapshot), endpoints=etcd.url)
    for v in range(2, 8):  # written after the snapshot: lost by the restore
        reply = await sidecar.put("s1", {"v": v})
        assert reply.status == 200
    stale_etag = reply.headers["ETag"]
    stale = int(stale_etag.strip('"'))

    # PAST, as docs/kubernetes.md reads it: the highest etcd revision the sidecar has
    # seen (its own last write's, at least), with or without a watch.
    status = await sidecar.status()
    before = int(status["etcd_revision"])
    assert before >= stale, status

    await restore(etcd, snapshot)

    # The sidecar sees etcd's revision go back, asked nothing by anyone (narrow: no
    # watch; its idle probe's answer is enough): it drops its cache, reads again.
    async def reread() -> Any:
        status = await sidecar.status()
        return status["rewinds"] >= 1 and status["ready"] and status
    await wait_until(reread, timeout=30, what="the sidecar to see the rewind")
    assert "etcd's revision went back" in sidecar.logs()
    got = await sidecar.get("s1")
    assert got.json() == {"v": 1}, got  # what the snapshot holds

    # Another writer's session after the restore reaches this sidecar (watch-fed, or
    # read from etcd on first use and then held).
    async with etcd.client() as client:
        await client.put(KEYS.session("shop", "s9").encode(), record(b'{"from":"b"}'))

    async def cached() -> bool:
        got = await sidecar.get("s9")
        return got.status == 200 and got.source == "cache"
    await wait_until(cached, timeout=10, what="s9 in the sidecar's cache")

    # Before the bump, new writes reach the stale ETag's revision again: another writer's
    # write of s1 lands exactly on it. The sidecar, which saw the history go back, still
    # refuses the stale ETag (it used to compare it, and the write went through: a lost
    # update of state the client never saw).
    await land_on(etcd, KEYS.session("shop", "s1").encode(), record(b'{"v":"b"}'), stale)

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


async def test_a_bumped_restore_with_older_content_is_seen_without_a_watch(
        harness: Any, etcd: EtcdServer, etcd_client: Any, start_sidecar: Any,
        tmp_path: Path) -> None:
    """The restored cluster's revision is already past everything the sidecar saw when
    it first answers it (bumped while the sidecar was paused): no header goes back, but
    a session's revision does, and that is a rewind too."""
    await apply_model(etcd_client, KEYS, model("narrow"), "test")
    sidecar = await start_sidecar(cluster="shop", member="a", etcd=etcd.url,
                                  app_port=free_port())
    assert (await sidecar.put("s1", {"v": 1})).status == 201
    snapshot = tmp_path / "snapshot.db"
    await etcdctl("snapshot", "save", str(snapshot), endpoints=etcd.url)
    for v in range(2, 5):
        reply = await sidecar.put("s1", {"v": v})
        assert reply.status == 200
    stale_etag = reply.headers["ETag"]
    before = int((await sidecar.status())["etcd_revision"])

    sidecar.pause()
    try:
        await restore(etcd, snapshot)
        await meshxl_json("restore", "bump", "--past", str(before), "--etcd", etcd.url)
    finally:
        sidecar.resume()

    # Just resumed, its etcd connection may still be coming back: until then a read is
    # served from the cache marked unverified (as whenever etcd does not answer).
    async def verified() -> Any:
        reply = await sidecar.get("s1")
        return reply.source != "cache-unverified" and reply

    got = await wait_until(verified, timeout=15, what="a read verified against etcd")
    assert got.status == 200 and got.json() == {"v": 1}, got
    status = await sidecar.status()
    assert status["rewinds"] == 1, status
    # The cache holds what etcd has now, not the lost version: the next read is a hit.
    again = await sidecar.get("s1")
    assert again.source == "cache" and again.etag == got.etag, again
    refused = await sidecar.put("s1", {"v": "stale"}, if_match=stale_etag)
    assert refused.status == 412 and "restored" in refused.json()["error"], refused
    assert (await sidecar.get("s1")).json() == {"v": 1}


async def test_each_session_shard_sees_its_own_restore(
        harness: Any, etcd: EtcdServer, etcd_client: Any, start_sidecar: Any,
        tmp_path: Path) -> None:
    """Sessions over two etcd clusters whose revisions run far apart, narrow: one
    shard restored from a snapshot is a rewind of that shard only."""
    from meshxl.etcd.shards import parse_shard_map
    from tests.integration.test_shards import ids_in

    one, two = await start_etcd(harness, "shard-1"), await start_etcd(harness, "shard-2")
    shards = parse_shard_map({"version": 1, "shards": [{"name": "s1", "etcd": one.url},
                                                       {"name": "s2", "etcd": two.url}]})
    await etcd_client.put(KEYS.shards.encode(), shards.encode())
    await apply_model(etcd_client, KEYS, model("narrow"), "test")
    sidecar = await start_sidecar(cluster="shop", member="a", etcd=etcd.url,
                                  app_port=free_port())
    [in_one], [in_two] = ids_in(shards, "s1", 1), ids_in(shards, "s2", 1)
    assert (await sidecar.put(in_one, {"v": 0})).status == 201
    assert (await sidecar.put(in_two, {"v": 0})).status == 201
    async with two.client() as client:  # s2's revisions run far ahead of s1's
        for _ in range(40):
            await client.put(b"/filler", b"x")
    assert (await sidecar.put(in_two, {"v": 1})).status == 200
    snapshot = tmp_path / "s1.db"
    await etcdctl("snapshot", "save", str(snapshot), endpoints=one.url)
    for v in range(1, 5):
        reply = await sidecar.put(in_one, {"v": v})
        assert reply.status == 200
    stale_etag = reply.headers["ETag"]
    assert stale_etag.startswith('"s1:'), stale_etag

    await restore(one, snapshot)

    def rewinds(status: dict[str, Any]) -> dict[str, int]:
        return {s["name"]: s["rewinds"] for s in status["shards"]["shards"]}

    async def seen() -> Any:
        status = await sidecar.status()
        return rewinds(status)["s1"] >= 1 and status
    status = await wait_until(seen, timeout=30, what="shard s1's rewind seen")
    assert rewinds(status) == {"s1": 1, "s2": 0}, status
    assert (await sidecar.get(in_one)).json() == {"v": 0}
    got = await sidecar.get(in_two)  # the other shard's cache stands
    assert got.json() == {"v": 1} and got.source == "cache", got
    _, _, number = stale_etag.strip('"').partition(":")
    await land_on(one, KEYS.session("shop", in_one).encode(), record(b'{"v":"b"}'),
                  int(number))
    refused = await sidecar.put(in_one, {"v": "stale"}, if_match=stale_etag)
    assert refused.status == 412 and "restored" in refused.json()["error"], refused
    assert (await sidecar.get(in_one)).json() == {"v": "b"}
    assert (await sidecar.put(in_two, {"v": 2}, if_match=got.etag)).status == 200
    assert rewinds(await sidecar.status()) == {"s1": 1, "s2": 0}
