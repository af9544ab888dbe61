"""Sessions over two etcd clusters (shards) on real etcd and a real sidecar.

The main etcd holds the model, the registrations and the shard map; sessions live in
two more single-member etcd clusters, each session in the one its id hashes to. What
must hold: every session lands in its shard and nowhere else; ETags name the shard and
an If-Match of another shard (or of none) is refused with 412; a hash tag keeps
sessions together so a transaction over them commits, while one over two shards is
refused whole; a bulk save answers per item; one shard's etcd lost makes only its
sessions unavailable (503), the member stays ready and the other shard keeps writing;
and a shard added or removed under load (an online reshard) moves only the sessions
whose shard changed, loses no acknowledged write, never serves a stale one, and keeps
a member that lost a session fenced across the move.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
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
from tests.harness.cli import meshxl_json
from tests.harness.clock import scaled, window
from tests.harness.etcd import start_etcd
from tests.harness.sidecar import SidecarProcess

pytestmark = [pytest.mark.integration, pytest.mark.heavy]

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

    # A third shard would take about a third of the sessions: the dry run counts them,
    # writes nothing.
    three = await start_etcd(harness, "shard-3")
    wanted = ("--shard", f"s1={one.url}", "--shard", f"s2={two.url}", "--shard",
              f"s3={three.url}", "--etcd", etcd.url)
    planned = (await meshxl_json("shards", "set", *wanted, "--dry-run"))["plan"]
    assert planned["sessions"] == 10 and 0 < planned["moved"] < 10, planned
    assert {m["to"] for m in planned["moves"]} == {"s3"}, planned
    assert planned["sidecars"] == [f"{CLUSTER}/m1"], planned
    assert (await meshxl_json("shards", "show", "--etcd", etcd.url))["version"] == 1
    assert await keys_in(three.url) == set()

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
    assert await _read_back(sidecar, in_two[1]) == {"n": 1}


async def _shard_down(sidecar: SidecarProcess, name: str) -> bool:
    status = await sidecar.status()
    (shard,) = [s for s in status["shards"]["shards"] if s["name"] == name]
    return not shard["reachable"]


async def _writes(sidecar: SidecarProcess, session: str) -> bool:
    return (await sidecar.put(session, {"n": 100})).status == 200


async def _read_back(sidecar: SidecarProcess, session: str) -> Any:
    """The session's state once a read of it is answered: a shard just back may still be
    reconnecting on a busy machine (503, "unreachable") after a first write got through."""
    async def answered() -> Any:
        reply = await sidecar.get(session)
        return reply.json() if reply.status == 200 else None

    return await wait_until(answered, timeout=scaled(20),
                            what=f"session {session} read back from its shard")


def test_shard_map_round_trip() -> None:
    shards = ShardMap(3, (Shard("a", "http://127.0.0.1:1"), Shard("b", "http://127.0.0.1:2")))
    assert parse_shard_map(shards.encode()) == shards
    assert json.loads(shards.encode())["version"] == 3


async def _written_over_two_shards(
        etcd: EtcdServer, etcd_client: aetcd.Client, start_sidecar: Any, s1: str, s2: str,
        count: int) -> tuple[SidecarProcess, list[str], list[str]]:
    """A map of shards s1 and s2 at those URLs, a sidecar on it, and ``count`` sessions
    of each shard written ({"n": 1}): the sidecar and the sessions of s1 and of s2."""
    shards = parse_shard_map({"version": 1, "shards": [
        {"name": "s1", "etcd": s1}, {"name": "s2", "etcd": s2}]})
    await etcd_client.put(KEYS.shards.encode(), shards.encode())
    sidecar: SidecarProcess = await start_sidecar(cluster=CLUSTER, member="m1", etcd=etcd.url,
                                                  app_port=free_port())
    in_one, in_two = ids_in(shards, "s1", count), ids_in(shards, "s2", count)
    for session in in_one + in_two:
        assert (await sidecar.put(session, {"n": 1})).status == 201
    return sidecar, in_one, in_two


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
    sidecar, in_one, in_two = await _written_over_two_shards(
        etcd, etcd_client, start_sidecar, one.url, client_url, 3)

    await net.isolate(0, driver=True)
    await wait_until(lambda: _shard_down(sidecar, "s2"), timeout=20,
                     what="the sidecar to see shard s2 cut off")
    for round_ in range(3):
        for session in in_one:
            started = time.monotonic()
            reply = await sidecar.put(session, {"n": 2 + round_})
            assert reply.status == 200 and time.monotonic() - started < scaled(4.0), reply
    reply = await sidecar.put(in_two[0], {"n": 99})
    # The reason: etcd did not answer it, or (the shard's watch down past the grace)
    # the shard is refused at once, named.
    assert reply.status == 503 and (b"etcd" in reply.body
                                    or b"session shard s2 unreachable" in reply.body), reply
    assert (await sidecar.readyz()).status == 200

    await net.heal(0)
    await wait_until(lambda: _writes(sidecar, in_two[0]), timeout=30,
                     what="shard s2 to take writes again")
    for session in in_one:
        assert (await sidecar.get(session)).json() == {"n": 4}
    assert await _read_back(sidecar, in_two[1]) == {"n": 1}


async def test_a_silent_shard_is_seen_and_costs_only_its_sessions(
        harness: Any, etcd: EtcdServer, etcd_client: aetcd.Client,
        start_sidecar: Any) -> None:
    """Shard s2's etcd paused (SIGSTOP: its connections stay open and nothing answers,
    as with a hung process or disk). No stream ends, so only asking etcd shows it: the
    sidecar sees s2 unreachable within a few seconds, answers s2's writes 503 at once
    instead of holding each for its deadline, and s1's writes go on; resumed, s2 is
    reachable and written again with its state."""
    one, two = await start_etcd(harness, "shard-1"), await start_etcd(harness, "shard-2")
    sidecar, in_one, in_two = await _written_over_two_shards(
        etcd, etcd_client, start_sidecar, one.url, two.url, 2)
    pid = two.process.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        paused = time.monotonic()
        await wait_until(lambda: _shard_down(sidecar, "s2"), timeout=15,
                         what="the sidecar to see the paused shard s2")
        seen = time.monotonic() - paused
        assert seen < scaled(8.0), f"a silent shard seen after {seen:.1f} s"
        await window(1.2, "past DOWN_GRACE: refused at once from now on")
        started = time.monotonic()
        reply = await sidecar.put(in_two[0], {"n": 99})
        assert reply.status == 503 and b"shard s2" in reply.body, reply
        assert time.monotonic() - started < scaled(3.0), "a write to a silent shard was held"
        for i, session in enumerate(in_one):
            reply = await sidecar.put(session, {"n": 10 + i})
            assert reply.status == 200, reply
        assert (await sidecar.readyz()).status == 200
    finally:
        os.kill(pid, signal.SIGCONT)
    await wait_until(lambda: _writes(sidecar, in_two[0]), timeout=20,
                     what="shard s2 to take writes again")
    assert not await _shard_down(sidecar, "s2")
    assert await _read_back(sidecar, in_two[1]) == {"n": 1}


async def test_online_reshard_under_load(harness: Any, etcd: EtcdServer,
                                         start_sidecar: Any) -> None:
    """Two shards, then a third added and one removed while a member writes every
    session without pause and another member reads them: every write answered 200
    (but those of the moving sessions for the second or two the sidecars take the map
    in, and those planned under a map version in the moment it is replaced: 503, which
    the client sends again), every read at least as new as the last write acknowledged
    before it, every session in exactly the shard the map names afterwards with its last state, and
    the member that lost a session before the move is still fenced (409) after it."""
    one, two, three = [await start_etcd(harness, f"shard-{i}") for i in (1, 2, 3)]
    await meshxl_json("shards", "set", "--shard", f"s1={one.url}", "--shard",
                      f"s2={two.url}", "--etcd", etcd.url)
    m1: SidecarProcess = await start_sidecar(cluster=CLUSTER, member="m1", etcd=etcd.url,
                                             app_port=free_port())
    m2: SidecarProcess = await start_sidecar(cluster=CLUSTER, member="m2", etcd=etcd.url,
                                             app_port=free_port())
    sessions = [f"u{i}" for i in range(40)]
    three_map = parse_shard_map({"version": 1, "shards": [
        {"name": n, "etcd": u} for n, u in (("s1", one.url), ("s2", two.url),
                                            ("s3", three.url))]})
    fenced = next(s for s in (f"f{i}" for i in range(100)) if three_map.of(s).name == "s3")
    acked: dict[str, int] = {}
    for session in [*sessions, fenced]:
        assert (await m1.put(session, {"n": 0})).status == 201
        acked[session] = 0
    failures: list[Any] = []
    stale: list[Any] = []
    paused: list[float] = []
    fence_503: list[float] = []

    async def write_all(stop: asyncio.Event) -> int:
        n, base = 0, max(acked.values())  # each write's value above all before it
        deadline = time.monotonic() + 90
        while not stop.is_set() and time.monotonic() < deadline and n < 20_000:
            session = sessions[n % len(sessions)]
            n += 1
            reply = await m1.put(session, {"n": base + n})
            if reply.status == 200:
                acked[session] = base + n
            elif reply.status == 503 and b"moves from shard" in reply.body:
                paused.append(time.monotonic())  # the prepare stage: writes wait
            elif reply.status == 503 and b"is fenced at map version" in reply.body:
                fence_503.append(time.monotonic())  # planned under the map just replaced
            else:
                failures.append((session, reply.status, reply.body[:200]))
        return n

    async def read_all(stop: asyncio.Event) -> int:
        n = 0
        deadline = time.monotonic() + 90
        while not stop.is_set() and time.monotonic() < deadline and n < 20_000:
            session = sessions[n % len(sessions)]
            n += 1
            floor = acked[session]
            reply = await m2.get(session)
            if reply.status == 503 and b"is fenced at map version" in reply.body:
                fence_503.append(time.monotonic())
            elif reply.status != 200:
                failures.append((session, "read", reply.status, reply.body[:200]))
            elif reply.json()["n"] < floor:
                stale.append((session, reply.json()["n"], floor))
        return n

    async def under_load(*args: str) -> tuple[Any, int, int]:
        stop = asyncio.Event()
        writer, reader = (asyncio.ensure_future(write_all(stop)),
                          asyncio.ensure_future(read_all(stop)))
        await window(0.5, "the load before the change")
        try:
            done = await meshxl_json("shards", "set", *args, "--etcd", etcd.url, timeout=60)
            await window(0.5, "the load after the change")
        finally:
            stop.set()
        return done, await writer, await reader

    # Add s3: about a third of the sessions move, under load.
    done, writes, reads = await under_load("--shard", f"s1={one.url}", "--shard",
                                           f"s2={two.url}", "--shard", f"s3={three.url}")
    assert done["map"]["version"] == 4 and "previous" not in done["map"], done
    assert 0 < done["plan"]["moved"] < len(acked), done
    assert {m["to"] for m in done["plan"]["moves"]} == {"s3"}, done
    assert writes > 50 and reads > 50, (writes, reads)
    assert not failures and not stale, (failures[:5], stale[:5])
    # Writes of the sessions that move waited (503) only while the sidecars took the
    # map: a second or two, not the whole move.
    assert not paused or paused[-1] - paused[0] < scaled(10.0), (len(paused),
                                                                 paused[-1] - paused[0])
    # A write planned under a map just replaced is refused at the shard (503, the client
    # sends it again) only in the moment the sidecar takes the new map: at most one
    # short burst per map version stored (prepare, move, the stable map).
    assert _brief(fence_503), fence_503
    await _where_the_map_says(three_map, acked, {"s1": one.url, "s2": two.url,
                                                  "s3": three.url})
    for session, n in acked.items():
        assert (await m2.get(session)).json() == {"n": n}, session
    for sidecar in (m1, m2):
        await wait_until(lambda sidecar=sidecar: _serves(sidecar, 4), timeout=10,
                         what="the sidecars to take the final map")
        status = await sidecar.status()
        assert [s["name"] for s in status["shards"]["shards"]] == ["s1", "s2", "s3"]

    # Ownership went with the session: m2 takes the fenced session over in its new
    # shard, and m1, which owned it in the old one, is refused (409), not a takeover.
    assert (await m2.put(fenced, {"by": "m2"})).status == 200
    reply = await m1.put(fenced, {"by": "m1"})
    assert reply.status == 409, reply
    del acked[fenced]

    # Remove s2: only its sessions move, and the sidecars close it.
    fence_503.clear()
    done, writes, reads = await under_load("--shard", f"s1={one.url}", "--shard",
                                           f"s3={three.url}")
    assert done["map"]["version"] == 7, done
    assert {m["from"] for m in done["plan"]["moves"]} == {"s2"}, done
    assert not failures and not stale, (failures[:5], stale[:5])
    assert _brief(fence_503), fence_503
    after = parse_shard_map(done["map"])
    await _where_the_map_says(after, acked, {"s1": one.url, "s3": three.url})
    assert await keys_in(two.url) == set()
    for session, n in acked.items():
        assert (await m1.get(session)).json() == {"n": n}, session
    await wait_until(lambda: _names(m1, ["s1", "s3"]), timeout=10,
                     what="m1 to close shard s2")


def _brief(times: list[float]) -> bool:
    """At most one burst per map version a reshard stores, each short (a moment, not a
    stage: bounds a busy machine stretches, scaled)."""
    bursts = _bursts(times, gap=scaled(1.0))
    return len(bursts) <= 3 and all(b[-1] - b[0] < scaled(3.0) for b in bursts)


def _bursts(times: list[float], gap: float = 0.5) -> list[list[float]]:
    """``times`` grouped where they follow each other within ``gap`` seconds."""
    groups: list[list[float]] = []
    for t in sorted(times):
        if groups and t - groups[-1][-1] <= gap:
            groups[-1].append(t)
        else:
            groups.append([t])
    return groups


async def _where_the_map_says(shards: ShardMap, acked: dict[str, int],
                              urls: dict[str, str]) -> None:
    found = {name: await keys_in(url) for name, url in urls.items()}
    for session in acked:
        holders = [name for name, keys in found.items() if session in keys]
        assert holders == [shards.of(session).name], (session, holders)


async def _names(sidecar: SidecarProcess, names: list[str]) -> bool:
    return [s["name"] for s in (await sidecar.status())["shards"]["shards"]] == names


async def _serves(sidecar: SidecarProcess, version: int) -> bool:
    return bool((await sidecar.status())["shards"]["version"] == version)
