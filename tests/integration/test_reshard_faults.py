"""Resharding the way operators get it wrong, on real etcd clusters and real sidecars.

Each test is a fault an operator or the network brings to ``meshxl shards set``:

* one etcd cluster under two shard names, and a shard renamed (its cluster stays):
  the first is refused before anything is written, the second moves nothing and
  loses nothing (a shard is its etcd cluster, known by the cluster id etcd answers
  with, not by its name or its URLs);
* a shard's URLs changed to other endpoints of the same cluster: an update in place,
  nothing moved; a name that now reaches another cluster: refused up front;
* a shard that does not answer, or a malformed URL: refused up front, nothing
  written; a map that cannot be used stored by hand: sidecars keep the last one
  they could (and say so), a new sidecar comes up on it without sessions, and both
  serve once a usable map is stored;
* going back to the previous list, from the stage ``prepare`` (nothing moved: the old
  map again, also while the new shard does not answer) and from the stage ``move`` (a
  reverse reshard, blocked with a precise reason while a shard sessions may have moved
  into does not answer, and resumed);
* a sidecar cut off from the main etcd only (a partition in network namespaces)
  while the map changes: its writes are refused (503) at the shard by the map
  version fence, never acknowledged in the old shard, and it serves again on the new
  map once the partition heals.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from typing import Any

import aetcd
import pytest

from meshxl import etcd as etcd_package
from meshxl.etcd.shards import parse_shard_map
from meshxl.local.netns import Network, unavailable
from meshxl.local.ports import free_port
from meshxl.local.wait import wait_until
from meshxl.operator.shards import set_map
from tests.harness import EtcdServer
from tests.harness.cli import meshxl, meshxl_json
from tests.harness.clock import scaled
from tests.harness.etcd import start_etcd
from tests.harness.shards import (
    KEYS,
    ids_in,
    keys_in,
    read_stored_map,
    session_keys,
    start_etcd_at,
    start_two_port_etcd,
    value_of,
)
from tests.harness.sidecar import SidecarProcess

pytestmark = pytest.mark.integration

CLUSTER = "shop"


async def _set(etcd_url: str, *shards: str, expect: int = 0, **options: str) -> Any:
    args = ["shards", "set"]
    for shard in shards:
        args += ["--shard", shard]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", value]
    return await meshxl_json(*args, "--etcd", etcd_url, expect=expect, timeout=60)


async def _refused(etcd_url: str, *shards: str, **options: str) -> str:
    """``meshxl shards set`` with ``shards``, which must exit 1 with one line on stderr:
    that line."""
    args = ["shards", "set"]
    for shard in shards:
        args += ["--shard", shard]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", value]
    code, out, err = await meshxl(*args, "--etcd", etcd_url, timeout=60)
    assert code == 1, f"exit {code}:\n{out}\n{err}"
    lines = [line for line in err.splitlines() if line.startswith("meshxl:")]
    assert len(lines) == 1, err
    return lines[0]


async def _show(etcd_url: str) -> dict[str, Any]:
    return dict(await meshxl_json("shards", "show", "--etcd", etcd_url))


async def _serves(sidecar: SidecarProcess, version: int) -> bool:
    shards = (await sidecar.status())["shards"]
    return bool(shards and shards["version"] == version)


async def _all_read(sidecar: SidecarProcess, acked: dict[str, int]) -> None:
    for session, n in acked.items():
        reply = await sidecar.get(session)
        assert reply.status == 200 and reply.json() == {"n": n}, (session, n, reply)


async def _written(sidecar: SidecarProcess, sessions: list[str]) -> dict[str, int]:
    acked = {}
    for i, session in enumerate(sessions):
        reply = await sidecar.put(session, {"n": i})
        assert reply.status in (200, 201), reply
        acked[session] = i
    return acked


async def test_one_cluster_under_two_names_is_refused_and_a_rename_loses_nothing(
        harness: Any, etcd: EtcdServer, start_sidecar: Any) -> None:
    a = await start_etcd(harness, "shard-a")
    await _set(etcd.url, f"s1={a.url}")
    m1: SidecarProcess = await start_sidecar(cluster=CLUSTER, member="m1", etcd=etcd.url,
                                             app_port=free_port())
    acked = await _written(m1, [f"u{i}" for i in range(40)])
    stored = await read_stored_map(etcd.url)

    # The same cluster twice, by the same URL or another spelling of it: refused before
    # anything is written, naming both shards.
    for second in (a.url, a.url.removeprefix("http://")):
        line = await _refused(etcd.url, f"s1={a.url}", f"s2={second}")
        assert "one etcd cluster" in line and "s1" in line and "s2" in line, line
        assert await read_stored_map(etcd.url) == stored
    await _all_read(m1, acked)

    # A rename: the cluster stays, every session stays where it is.
    done = await _set(etcd.url, f"s9={a.url}")
    assert done["plan"]["moved"] == 0, done
    assert [s["name"] for s in done["map"]["shards"]] == ["s9"], done
    assert "previous" not in done["map"], done
    await wait_until(lambda: _serves(m1, done["map"]["version"]), timeout=15,
                     what="m1 to take the renamed map")
    await _all_read(m1, acked)
    assert await keys_in(a.url, CLUSTER) == set(acked)


async def test_new_urls_of_one_cluster_move_nothing_and_another_cluster_is_refused(
        harness: Any, etcd: EtcdServer, start_sidecar: Any) -> None:
    process, first, second = await start_two_port_etcd(harness, "shard-a")
    b = await start_etcd(harness, "shard-b")
    await _set(etcd.url, f"s1={first}", f"s2={b.url}")
    m1: SidecarProcess = await start_sidecar(cluster=CLUSTER, member="m1", etcd=etcd.url,
                                             app_port=free_port())
    acked = await _written(m1, [f"u{i}" for i in range(20)])
    before = {"a": await keys_in(first, CLUSTER), "b": await keys_in(b.url, CLUSTER)}

    for url, version in ((second, 2), (first, 3)):  # there and back: both in place
        done = await _set(etcd.url, f"s1={url}", f"s2={b.url}")
        assert done["map"]["version"] == version and done["plan"]["moved"] == 0, done
        assert "previous" not in done["map"], done
        assert done["map"]["shards"][0]["etcd"] == url, done
        shown = await _show(etcd.url)
        assert shown["version"] == version and "previous" not in shown, shown
        await wait_until(lambda v=version: _serves(m1, v), timeout=15,
                         what=f"m1 to take map version {version}")
        await _all_read(m1, acked)
    assert {"a": await keys_in(first, CLUSTER), "b": await keys_in(b.url, CLUSTER)} == before

    # A name that now reaches another cluster: refused up front, nothing written.
    c = await start_etcd(harness, "shard-c")
    stored = await read_stored_map(etcd.url)
    line = await _refused(etcd.url, f"s1={c.url}", f"s2={b.url}")
    assert "s1" in line and "another etcd cluster" in line, line
    assert await read_stored_map(etcd.url) == stored
    # A sidecar starting now comes up on the stored map as usual.
    m2: SidecarProcess = await start_sidecar(cluster=CLUSTER, member="m2", etcd=etcd.url,
                                             app_port=free_port())
    await _all_read(m2, acked)
    assert process.running


async def test_what_cannot_be_used_is_refused_up_front_and_survived_when_stored(
        harness: Any, etcd: EtcdServer, etcd_client: aetcd.Client,
        start_sidecar: Any) -> None:
    a = await start_etcd(harness, "shard-a")
    await _set(etcd.url, f"s1={a.url}")
    m1: SidecarProcess = await start_sidecar(cluster=CLUSTER, member="m1", etcd=etcd.url,
                                             app_port=free_port())
    acked = await _written(m1, [f"u{i}" for i in range(10)])
    stored = await read_stored_map(etcd.url)

    # An etcd that does not answer (a typo'd port): refused within a bounded time,
    # naming the shard; nothing written.
    started = time.monotonic()
    line = await _refused(etcd.url, f"s1={a.url}", f"s2=http://127.0.0.1:{free_port()}",
                          probe_timeout="2")
    assert "s2" in line and "does not answer" in line, line
    assert time.monotonic() - started < scaled(20)
    # Malformed URLs: refused as input, before any etcd is asked.
    for bad in ("http://127.0.0.1:99999", "http://127.0.0.1:2379x", "ftp://127.0.0.1:2379",
                "http://:2379", "http://127.0.0.1:2379/path"):
        line = await _refused(etcd.url, f"s1={a.url}", f"s2={bad}")
        assert "s2" in line, (bad, line)
    assert await read_stored_map(etcd.url) == stored
    await _all_read(m1, acked)

    # A map stored by hand that cannot be used: m1 keeps the last one it could use,
    # stays alive and says so; a sidecar starting now comes up without sessions.
    bad_map = {"version": 7, "shards": [{"name": "s1", "etcd": a.url},
                                        {"name": "s2", "etcd": "http://127.0.0.1:2379x"}]}
    await etcd_client.put(KEYS.shards.encode(), json.dumps(bad_map).encode())

    async def says_so() -> bool:
        shards = (await m1.status())["shards"]
        return bool(shards.get("map_error"))

    await wait_until(says_so, timeout=15, what="m1 to report the unusable map")
    assert (await m1.request("GET", "/healthz")).status == 200
    status = await m1.status()
    assert status["shards"]["version"] == 1 and any("shard map" in w
                                                    for w in status["warnings"]), status
    metrics = (await m1.request("GET", "/metrics")).body.decode()
    assert "meshxl_statesync_shard_map_unusable 1.0" in metrics, metrics[-2000:]
    await _all_read(m1, acked)

    m2: SidecarProcess = await start_sidecar(cluster=CLUSTER, member="m2", etcd=etcd.url,
                                             app_port=free_port(), wait_ready=False)
    await m2.wait_listening()

    async def started_without_sessions() -> bool:
        ready = await m2.readyz()
        return ready.status == 503 and b"shard map" in ready.body

    await wait_until(started_without_sessions, timeout=20, what="m2 to start on the map",
                     process=m2.process)
    assert (await m2.request("GET", "/healthz")).status == 200
    reply = await m2.get("u0")
    assert reply.status == 503 and b"shard map" in reply.body, reply

    # A usable map again (here by hand too): both serve it.
    good = {"version": 8, "shards": [{"name": "s1", "etcd": a.url}]}
    await etcd_client.put(KEYS.shards.encode(), json.dumps(good).encode())
    await m2.wait_ready(timeout=20)
    await wait_until(lambda: _serves(m1, 8), timeout=15, what="m1 to take map version 8")
    await _all_read(m2, acked)
    assert not (await m1.status())["shards"].get("map_error")
    assert m1.running and m2.running


async def test_going_back_from_the_stage_prepare(harness: Any, etcd: EtcdServer,
                                                 etcd_client: aetcd.Client,
                                                 start_sidecar: Any) -> None:
    a, b = await start_etcd(harness, "shard-a"), await start_etcd(harness, "shard-b")
    await _set(etcd.url, f"s1={a.url}")
    m1: SidecarProcess = await start_sidecar(cluster=CLUSTER, member="m1", etcd=etcd.url,
                                             app_port=free_port())
    acked = await _written(m1, [f"u{i}" for i in range(20)])
    # A registered sidecar that never takes a map: the reshard stops at prepare.
    lease = await etcd_client.lease(60)
    await etcd_client.put(KEYS.member(CLUSTER, "ghost").encode(), b"{}", lease=lease.id)
    line = await _refused(etcd.url, f"s1={a.url}", f"s2={b.url}", ack_timeout="1")
    assert "ghost" in line, line
    shown = await _show(etcd.url)
    assert shown["stage"] == "prepare" and [s["name"] for s in shown["previous"]] == ["s1"]

    # Back to the list before, with the new shard's etcd not answering (paused): nothing
    # moved into it, so it does not stand in the way; it is the old map again.
    pid = b.process.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        done = await _set(etcd.url, f"s1={a.url}", probe_timeout="2")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert "previous" not in done["map"] and done["plan"]["moved"] == 0, done
    assert done["map"]["version"] > shown["version"], done
    await wait_until(lambda: _serves(m1, done["map"]["version"]), timeout=15,
                     what="m1 to take the old list again")
    await _all_read(m1, acked)
    assert await keys_in(a.url, CLUSTER) == set(acked)
    assert await keys_in(b.url, CLUSTER) == set()
    for session in acked:
        assert (await m1.put(session, {"n": 100})).status == 200


async def test_going_back_from_the_stage_move(harness: Any, etcd: EtcdServer,
                                              etcd_client: aetcd.Client,
                                              start_sidecar: Any) -> None:
    """The command stops right after the stage ``move`` is stored (an operator's
    process killed); sidecars move what they touch. Going back is a reverse reshard:
    blocked, saying by what, while the new shard sessions moved into is paused;
    finished once it answers, every session back in its old shard with its state."""
    a, b = await start_etcd(harness, "shard-a"), await start_etcd(harness, "shard-b")
    await _set(etcd.url, f"s1={a.url}")
    m1: SidecarProcess = await start_sidecar(cluster=CLUSTER, member="m1", etcd=etcd.url,
                                             app_port=free_port())
    two = parse_shard_map({"version": 0, "shards": [{"name": "s1", "etcd": a.url},
                                                    {"name": "s2", "etcd": b.url}]})
    moving = ids_in(two, "s2", 10)
    staying = ids_in(two, "s1", 10)
    acked = await _written(m1, moving + staying)

    class Stopped(BaseException):  # the process killed: nothing runs after it
        pass

    def stop_at_move(line: str) -> None:
        if "sessions move" in line:
            raise Stopped(line)

    @contextlib.asynccontextmanager
    async def connect(urls: str) -> Any:
        async with etcd_package.client(urls) as client:
            yield client

    with pytest.raises(Stopped):
        await set_map(etcd_client, KEYS, two, connect, ack_timeout=20, progress=stop_at_move)
    shown = await _show(etcd.url)
    assert shown["stage"] == "move", shown
    await wait_until(lambda: _serves(m1, shown["version"]), timeout=15,
                     what="m1 to take the stage move")
    for session in moving[:5]:  # moved on access, then written in s2
        acked[session] += 100
        assert (await m1.put(session, {"n": acked[session]})).status == 200
    assert set(moving[:5]) <= await keys_in(b.url, CLUSTER)

    pid = b.process.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        line = await _refused(etcd.url, f"s1={a.url}")
        assert "s2" in line and "moved" in line, line
        for session in staying:
            assert (await m1.get(session)).status == 200
    finally:
        os.kill(pid, signal.SIGCONT)
    done = await _set(etcd.url, f"s1={a.url}")
    assert "previous" not in done["map"] and [s["name"] for s in done["map"]["shards"]] \
        == ["s1"], done
    await wait_until(lambda: _serves(m1, done["map"]["version"]), timeout=15,
                     what="m1 to take the old list again")
    await _all_read(m1, acked)
    assert await keys_in(a.url, CLUSTER) == set(acked)
    assert await keys_in(b.url, CLUSTER) == set()


async def test_a_sidecar_cut_off_from_the_main_etcd_is_fenced(
        harness: Any, start_sidecar: Any) -> None:
    """The main etcd in one network namespace, a sidecar in another, the session shards
    at the test's own address: the sidecar is cut off from the main etcd only, until
    its registration lapses, while a shard is added. Its writes are refused (503) at
    the shard, none acknowledged in the old shard; healed, it takes the map and
    writes where the map says, and every session is in exactly one shard."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"a partition needs network namespaces: {reason}")
    net = await Network(harness, 2).create()
    main = await start_etcd_at(harness, "main", net.ip(1), wrap=lambda argv: net.wrap(1, argv))
    one = await start_etcd_at(harness, "shard-1", net.driver_ip)
    two = await start_etcd_at(harness, "shard-2", net.driver_ip)
    await _set(main.url, f"s1={one.url}")
    m1: SidecarProcess = await start_sidecar(cluster=CLUSTER, member="m1", etcd=main.url,
                                             app_port=free_port())
    cut: SidecarProcess = await start_sidecar(
        cluster=CLUSTER, member="cut", etcd=main.url, app_port=free_port(), host=net.ip(0),
        wrap=lambda argv: net.wrap(0, argv), token="cut-off-sidecar-token", lease_ttl=2.0)
    acked = await _written(cut, [f"u{i}" for i in range(10)])

    await net.block(0, [1])

    async def lapsed() -> bool:
        async with main.client() as client:
            return await client.get(KEYS.member(CLUSTER, "cut").encode()) is None

    await wait_until(lapsed, timeout=20, what="the cut-off sidecar's registration to lapse")
    done = await _set(main.url, f"s1={one.url}", f"s2={two.url}")
    final = parse_shard_map(done["map"])
    assert not final.moving

    answers = []
    for i, session in enumerate([*acked, *(f"new{i}" for i in range(10))]):
        answers.append((session, (await cut.put(session, {"n": 1000 + i})).status))
    assert not [a for a in answers if a[1] in (200, 201)], answers
    assert {status for _, status in answers} == {503}, answers

    await net.heal(0)
    await wait_until(lambda: _serves(cut, final.version), timeout=30,
                     what="the healed sidecar to take the map")
    for session in list(acked)[:5]:
        acked[session] += 50
        reply = await cut.put(session, {"n": acked[session]})
        assert reply.status == 200, reply
    await _all_read(m1, acked)
    stored = {"s1": await session_keys(one.url, CLUSTER),
              "s2": await session_keys(two.url, CLUSTER)}
    for session, n in acked.items():
        holders = [name for name, keys in stored.items() if session in keys]
        assert holders == [final.of(session).name], (session, holders)
        assert value_of(stored[holders[0]][session]) == {"n": n}
    assert not any(s.startswith("new") for keys in stored.values() for s in keys), stored



async def test_a_narrow_sidecar_is_not_advertised_without_a_usable_map(
        harness: Any, etcd: EtcdServer, etcd_client: aetcd.Client,
        start_sidecar: Any) -> None:
    """A sidecar holding only what it uses (``replication: narrow``) is ready at once
    as a rule; starting on a stored map it cannot use, its registration says not ready
    (Envoy sends it nothing) until a usable map is stored."""
    from meshxl.operator.actions import apply_model

    a = await start_etcd(harness, "shard-a")
    await apply_model(etcd_client, KEYS, f"""\
clusters:
- name: {CLUSTER}
  mode: load-sharing
  membership: registered
  sessions: {{replication: narrow}}
  members:
  - {{name: m1, address: 127.0.0.1, port: 1}}
""", "test")
    await etcd_client.put(KEYS.shards.encode(), json.dumps(
        {"version": 3, "shards": [{"name": "s1", "etcd": "http://127.0.0.1:2379x"}]}).encode())
    m1: SidecarProcess = await start_sidecar(cluster=CLUSTER, member="m1", etcd=etcd.url,
                                             app_port=free_port(), wait_ready=False)

    async def registered_ready() -> bool | None:
        got = await etcd_client.get(KEYS.member(CLUSTER, "m1").encode())
        return None if got is None else bool(json.loads(got.value)["ready"])

    await wait_until(lambda: _is(registered_ready(), False), timeout=20,
                     what="m1 registered, not ready", process=m1.process)
    assert (await m1.status())["settings"]["replication"] == "narrow"
    assert (await m1.put("u1", {"n": 1})).status == 503

    await etcd_client.put(KEYS.shards.encode(), json.dumps(
        {"version": 4, "shards": [{"name": "s1", "etcd": a.url}]}).encode())
    await wait_until(lambda: _is(registered_ready(), True), timeout=20,
                     what="m1 registered ready on the usable map", process=m1.process)
    assert (await m1.put("u1", {"n": 1})).status == 201


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)
