"""Sessions over two etcd clusters (shards) on real etcd and a real sidecar.

The main etcd holds the model, the registrations and the shard map; sessions live in
two more single-member etcd clusters, each session in the one its id hashes to. What
must hold: every session lands in its shard and nowhere else; ETags name the shard and
an If-Match of another shard (or of none) is refused with 412; a hash tag keeps
sessions together so a transaction over them commits, while one over two shards is
refused whole; a bulk save answers per item; and one shard's etcd lost makes only its
sessions unavailable (503), the member stays ready and the other shard keeps writing.
"""

from __future__ import annotations

import json
import time
from typing import Any

import aetcd
import pytest

from meshxl.etcd.keys import Keys
from meshxl.etcd.shards import Shard, ShardMap, parse_shard_map
from meshxl.local import commands
from meshxl.local.netns import Network, unavailable
from meshxl.local.ports import free_port
from meshxl.local.wait import wait_http, wait_until
from tests.harness import EtcdServer
from tests.harness.cli import meshxl, meshxl_json
from tests.harness.etcd import start_etcd
from tests.harness.sidecar import SidecarProcess

pytestmark = pytest.mark.integration

CLUSTER = "shop"
KEYS = Keys()


def ids_in(shards: ShardMap, name: str, count: int, prefix: str = "s") -> list[str]:
    """``count`` session ids that hash to shard ``name``."""
    found = [f"{prefix}{i}" for i in range(500) if shards.of(f"{prefix}{i}").name == name]
    assert len(found) >= count
    return found[:count]


async def keys_in(url: str) -> set[str]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    prefix = KEYS.sessions_prefix(CLUSTER).encode()
    async with aetcd.Client(host=host, port=int(port)) as client:
        return {kv.key[len(prefix):].decode() for kv in await client.get_prefix(prefix)}


async def test_sessions_in_two_shards(harness: Any, etcd: EtcdServer, etcd_client: aetcd.Client,
                                      start_sidecar: Any) -> None:
    one, two = await start_etcd(harness, "shard-1"), await start_etcd(harness, "shard-2")
    done = await meshxl_json("shards", "set", "--shard", f"s1={one.url}", "--shard",
                             f"s2={two.url}", "--etcd", etcd.url)
    assert done["map"]["version"] == 1 and done["plan"]["moved"] == 0, done
    shards = parse_shard_map(done["map"])
    sidecar: SidecarProcess = await start_sidecar(cluster=CLUSTER, member="m1", etcd=etcd.url,
                                                  app_port=free_port())
    in_one, in_two = ids_in(shards, "s1", 4), ids_in(shards, "s2", 4)

    # Each session in its shard, its ETag naming it; nothing in the main cluster.
    etags = {}
    for session in in_one + in_two:
        reply = await sidecar.put(session, {"n": 1})
        assert reply.status == 201, reply
        etag = (reply.etag or "").strip('"')
        shard, _, revision = etag.partition(":")
        assert shard == shards.of(session).name and revision.isdigit(), reply.etag
        etags[session] = etag
    assert await keys_in(one.url) == set(in_one)
    assert await keys_in(two.url) == set(in_two)
    assert await keys_in(etcd.url) == set()
    got = await sidecar.get(in_two[0])
    assert got.status == 200 and got.etag == f'"{etags[in_two[0]]}"' and got.json() == {"n": 1}

    # If-Match compares in the session's own shard only.
    session = in_one[0]
    _, _, revision = etags[session].partition(":")
    for wrong in (f'"s2:{revision}"', f'"{revision}"'):
        reply = await sidecar.put(session, {"n": 2}, if_match=wrong)
        assert reply.status == 412, (wrong, reply)
    reply = await sidecar.put(session, {"n": 2}, if_match=f'"{etags[session]}"')
    assert reply.status == 200, reply

    # A hash tag keeps sessions together: one shard, so one transaction.
    cart, prefs = "{user42}:cart", "{user42}:prefs"
    assert shards.of(cart) == shards.of(prefs)
    reply = await sidecar.transaction([
        {"operation": "upsert", "session": cart, "data": {"items": 1}},
        {"operation": "upsert", "session": prefs, "data": {"lang": "fr"}}])
    assert reply.status == 200, reply
    assert {cart, prefs} <= await keys_in((one if shards.of(cart).name == "s1" else two).url)
    reply = await sidecar.transaction([
        {"operation": "upsert", "session": in_one[1], "data": {"x": 1}},
        {"operation": "upsert", "session": in_two[1], "data": {"x": 1}}])
    assert reply.status == 400 and "one shard" in reply.json()["error"], reply
    assert (await sidecar.get(in_one[1])).json() == {"n": 1}  # nothing applied

    # A bulk save over both shards: each item answered, each with its shard's ETag.
    reply = await sidecar.bulk_save([{"session": s, "data": {"bulk": True}}
                                     for s in (in_one[2], in_two[2], in_one[3])])
    items = reply.json()["items"]
    assert [i["status"] for i in items] == [200, 200, 200], items
    assert [i["etag"].split(":")[0] for i in items] == ["s1", "s2", "s1"], items
    status = await sidecar.status()
    assert [s["name"] for s in status["shards"]["shards"]] == ["s1", "s2"]

    # A third shard would take about a third of the sessions; with sidecars running
    # and sessions to move, setting it is refused and nothing is written.
    three = await start_etcd(harness, "shard-3")
    wanted = ("--shard", f"s1={one.url}", "--shard", f"s2={two.url}", "--shard",
              f"s3={three.url}", "--etcd", etcd.url)
    planned = (await meshxl_json("shards", "set", *wanted, "--dry-run"))["plan"]
    assert planned["sessions"] == 10 and 0 < planned["moved"] < 10, planned
    assert {m["to"] for m in planned["moves"]} == {"s3"}, planned
    assert planned["sidecars"] == [f"{CLUSTER}/m1"], planned
    code, _, err = await meshxl("shards", "set", *wanted)
    assert code == 1 and "sidecars are registered" in err and "would move" in err, err
    assert (await meshxl_json("shards", "show", "--etcd", etcd.url))["version"] == 1

    # Shard s2's etcd lost: its sessions answer 503; s1's keep writing; still ready.
    await two.kill()
    await wait_until(lambda: _shard_down(sidecar, "s2"), timeout=15,
                     what="the sidecar to see shard s2 down")
    for i in range(5):
        reply = await sidecar.put(in_one[0], {"n": 10 + i})
        assert reply.status == 200, reply
    reply = await sidecar.put(in_two[0], {"n": 99})
    assert reply.status == 503, reply
    assert (await sidecar.readyz()).status == 200
    metrics = (await sidecar.request("GET", "/metrics")).body.decode()
    assert 'meshxl_statesync_shard_up{shard="s2"} 0.0' in metrics
    assert 'meshxl_statesync_shard_up{shard="s1"} 1.0' in metrics

    # Back: s2's sessions are written again, with their state.
    await two.start()
    await wait_until(lambda: _writes(sidecar, in_two[0]), timeout=20,
                     what="shard s2 to take writes again")
    assert (await sidecar.get(in_two[1])).json() == {"n": 1}


async def _shard_down(sidecar: SidecarProcess, name: str) -> bool:
    status = await sidecar.status()
    (shard,) = [s for s in status["shards"]["shards"] if s["name"] == name]
    return not shard["reachable"]


async def _writes(sidecar: SidecarProcess, session: str) -> bool:
    return (await sidecar.put(session, {"n": 100})).status == 200


def test_shard_map_round_trip() -> None:
    shards = ShardMap(3, (Shard("a", "http://127.0.0.1:1"), Shard("b", "http://127.0.0.1:2")))
    assert parse_shard_map(shards.encode()) == shards
    assert json.loads(shards.encode())["version"] == 3


async def test_a_partitioned_shard_costs_only_its_sessions(
        harness: Any, etcd: EtcdServer, etcd_client: aetcd.Client,
        start_sidecar: Any) -> None:
    """Shard s2's etcd in a network namespace, cut off by a partition (packets dropped,
    nothing refused) while a sidecar writes to both shards: s1's writes go on, each
    answered; s2's answer 503 within the client's patience, the member stays ready;
    healed, s2 writes again and nothing acknowledged was lost."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"a partition needs network namespaces: {reason}")
    net = await Network(harness, 1).create()
    one = await start_etcd(harness, "shard-1")
    ip = net.ip(0)
    client_url, peer_url = f"http://{ip}:2379", f"http://{ip}:2380"
    process = harness.spawn("shard-2", net.wrap(0, commands.etcd(
        name="shard-2", data_dir=harness.root / "shard-2", client_url=client_url,
        peer_url=peer_url)))
    await wait_http(f"{client_url}/health", process=process, timeout=20)
    shards = parse_shard_map({"version": 1, "shards": [
        {"name": "s1", "etcd": one.url}, {"name": "s2", "etcd": client_url}]})
    await etcd_client.put(KEYS.shards.encode(), shards.encode())
    sidecar: SidecarProcess = await start_sidecar(cluster=CLUSTER, member="m1", etcd=etcd.url,
                                                  app_port=free_port())
    in_one, in_two = ids_in(shards, "s1", 3), ids_in(shards, "s2", 3)
    for session in in_one + in_two:
        assert (await sidecar.put(session, {"n": 1})).status == 201

    await net.isolate(0, driver=True)
    await wait_until(lambda: _shard_down(sidecar, "s2"), timeout=20,
                     what="the sidecar to see shard s2 cut off")
    for round_ in range(3):
        for session in in_one:
            started = time.monotonic()
            reply = await sidecar.put(session, {"n": 2 + round_})
            assert reply.status == 200 and time.monotonic() - started < 2.0, reply
    reply = await sidecar.put(in_two[0], {"n": 99})
    assert reply.status == 503 and b"etcd" in reply.body, reply
    assert (await sidecar.readyz()).status == 200

    await net.heal(0)
    await wait_until(lambda: _writes(sidecar, in_two[0]), timeout=30,
                     what="shard s2 to take writes again")
    for session in in_one:
        assert (await sidecar.get(session)).json() == {"n": 4}
    assert (await sidecar.get(in_two[1])).json() == {"n": 1}
