"""The drill's data check with sessions sharded over real etcd clusters.

The main etcd holds the shard map; sessions live in two more single-member etcd
clusters, whose revision counters run apart (each cluster counts its own). A real
sidecar serves them. The drill's data steps (``--check-sidecar``) record every
session's revision in its own shard before the drill and compare each one read back
through the sidecar with its shard's etcd at the revision the sidecar had applied *of
that shard*: what must hold is that a healthy sharded deployment passes, and that a
record in a shard that the sidecar cannot serve (bytes that are no session record) or
a session stored in a shard the map does not put it in fails the check, naming the
session and its shard. A moving map (an online reshard) makes the drill refuse the
data check, saying why.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aetcd
import pytest

from meshxl import etcd as etcd_lib
from meshxl.etcd.keys import Keys
from meshxl.etcd.shards import parse_shard_map
from meshxl.local.ports import free_port
from meshxl.local.wait import wait_until
from meshxl.operator.drill import DrillConfig, DrillRefused, _Drill, markdown
from meshxl.statesync.record import SessionRecord
from tests.harness import EtcdServer
from tests.harness.etcd import start_etcd
from tests.harness.sidecar import SidecarProcess
from tests.integration.test_shards import ids_in

pytestmark = pytest.mark.integration

CLUSTER = "orders"
KEYS = Keys()


async def _applied(sidecar: SidecarProcess, shard: str) -> int:
    status = await sidecar.status()
    (entry,) = [s for s in status["shards"]["shards"] if s["name"] == shard]
    return int(entry["revision"])


async def _put_raw(server: EtcdServer, session: str, value: bytes) -> int:
    """Write ``value`` at ``session``'s key in ``server`` directly, behind the
    sidecar's back: the revision it got."""
    async with server.client() as client:
        await client.put(KEYS.session(CLUSTER, session).encode(), value)
        got = await client.get(KEYS.session(CLUSTER, session).encode())
        assert got is not None
        return int(got.mod_revision)


def _record(state: bytes) -> bytes:
    now = time.time()
    return SessionRecord(owner="w1", content_type="application/json", created=now,
                         updated=now, data=state).encode()


async def test_the_data_check_reads_each_session_in_its_own_shard(
        harness: Any, etcd: EtcdServer, etcd_client: aetcd.Client, start_sidecar: Any,
        tmp_path: Path) -> None:
    one, two = await start_etcd(harness, "shard-1"), await start_etcd(harness, "shard-2")
    shards = parse_shard_map({"version": 1, "shards": [{"name": "s1", "etcd": one.url},
                                                       {"name": "s2", "etcd": two.url}]})
    await etcd_client.put(KEYS.shards.encode(), shards.encode())
    sidecar: SidecarProcess = await start_sidecar(cluster=CLUSTER, member="w1",
                                                  etcd=etcd.url, app_port=free_port(),
                                                  site="east")
    in_one, in_two = ids_in(shards, "s1", 4), ids_in(shards, "s2", 5)
    for session in in_one + in_two[:4]:
        assert (await sidecar.put(session, {"n": 0})).status == 201
    for n in range(1, 12):  # s1's revisions run ahead of s2's
        assert (await sidecar.put(in_one[0], {"n": n})).status == 200

    drill = _Drill(etcd_client, KEYS, DrillConfig(site="west", output_dir=tmp_path,
                                                  check_sidecars=[sidecar.url]),
                   say=print, connect=etcd_lib.client)
    try:
        await drill.data_baseline()
        assert set(drill.baseline[CLUSTER].sessions) == set(in_one + in_two[:4])
        assert drill.steps[-1]["detail"] == f"{CLUSTER}: 8 sessions (s1 4, s2 4)"

        # During the drill: one session new in s2, one rewritten in s1. "Written during"
        # counts what the sidecar had applied when read: wait for its watches.
        for session, created in ((in_two[4], True), (in_one[1], False)):
            reply = await sidecar.put(session, {"n": 1})
            assert reply.status == (201 if created else 200), reply
            shard, _, revision = (reply.etag or "").strip('"').partition(":")
            await wait_until(lambda shard=shard, r=int(revision): _caught_up(sidecar, shard, r),
                             timeout=10, what=f"the sidecar to apply its write in {shard}")
        [result] = await drill.data_check()
        assert result["ok"], result
        assert (result["sessions"], result["matched"], result["written_during"]) == (9, 9, 2)
        per_shard = {s["shard"]: s for s in result["shards"]}
        assert (per_shard["s1"]["sessions"], per_shard["s2"]["sessions"]) == (4, 5)
        # Each compared at its own shard's revision, which are far apart.
        assert per_shard["s1"]["at_revision"] >= per_shard["s2"]["at_revision"] + 10, per_shard

        # Bytes that are no session record, written in s2's etcd behind the sidecar's
        # back: it cannot serve that session, and the check names it with its shard.
        victim = in_two[1]
        revision = await _put_raw(two, victim, b"\x00not a session record")
        await wait_until(lambda: _caught_up(sidecar, "s2", revision), timeout=10,
                         what="the sidecar to apply the corrupt record")
        [result] = await drill.data_check()
        assert not result["ok"] and result["problems"] == {"unreadable": 1}, result
        [named] = result["named"]["unreadable"]
        assert named.startswith(f"{victim} (shard s2): "), named
        assert {s["shard"]: s["problems"] for s in result["shards"]} == \
            {"s1": {}, "s2": {"unreadable": 1}}
        assert drill.steps[-1]["step"] == "data check" and not drill.steps[-1]["ok"]
        report = markdown({"site": "west", "result": "failed", "started": "t",
                           "duration_s": 0.0, "steps": drill.steps, "data": [result]})
        assert "shard s2 (etcd revision" in report and "1 unreadable" in report, report
        assert (await sidecar.put(victim, {"n": 2})).status == 200  # repaired

        # A session of s1 stored in s2: etcd holds it where no sidecar looks for it.
        stray = ids_in(shards, "s1", 5)[4]
        revision = await _put_raw(two, stray, _record(b'{"n": 7}'))
        await wait_until(lambda: _caught_up(sidecar, "s2", revision), timeout=10,
                         what="the sidecar to apply the stray record")
        [result] = await drill.data_check()
        assert result["problems"] == {"misplaced": 1}, result
        assert result["named"]["misplaced"] == [
            f"{stray} (shard s2): the map puts it in shard s1"]
    finally:
        await drill.resources.aclose()

    # An online reshard under way (the map moving): the data check is refused.
    moving = {"version": 2, "shards": [{"name": "s1", "etcd": one.url}],
              "previous": [{"name": "s1", "etcd": one.url}, {"name": "s2", "etcd": two.url}],
              "stage": "prepare"}
    await etcd_client.put(KEYS.shards.encode(), parse_shard_map(moving).encode())
    refused = _Drill(etcd_client, KEYS, DrillConfig(site="west", output_dir=tmp_path,
                                                    check_sidecars=[sidecar.url]),
                     say=print, connect=etcd_lib.client)
    with pytest.raises(DrillRefused) as caught:
        await refused.data_baseline()
    assert any("moving" in r and "reshard" in r for r in caught.value.reasons), caught.value
    assert refused.sharded is None  # nothing opened


async def _caught_up(sidecar: SidecarProcess, shard: str, revision: int) -> bool:
    return await _applied(sidecar, shard) >= revision
