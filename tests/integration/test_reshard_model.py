"""Resharding as a random history against real etcd clusters, checked afterwards.

A seeded scheduler runs a sequence of ``shards set`` steps (adds, removes, renames,
new URLs of a shard's cluster, one cluster under two names, a name given another
cluster, a shard that does not answer, the operator's process stopped at a random
stage, going back to the list before, going on) while three sidecars write sessions
with conditional writes (If-Match on the ETag they last read, create-only for a new
one) and read them, and one of the sidecars is cut off from the main etcd now and
then (a partition between network namespaces: it keeps reaching the shards).

Every answer is recorded, and the history must show:

* **no acknowledged write lost, no lost update**: the conditional writes that applied
  (acknowledged, or seen by a read) form one chain per session (no two on the same
  state), and each session ends at the chain's newest acknowledged write or at a
  write that followed it;
* **none acknowledged outside the map**: at the end every session is in exactly the
  shard the map places it in, and no etcd cluster holds a session key elsewhere;
* **no stale read**: a read never returns a state older than the newest write
  acknowledged before the read began (reads marked ``cache-unverified`` excepted:
  they say so);
* **the way back always open**: every step to the list the map came from succeeds,
  unless it is stopped by the test or waits for a sidecar; refused lists write
  nothing.

``MESHXL_RESHARD_MODEL_STEPS`` (default 8) and ``MESHXL_RESHARD_MODEL_SEED`` (default a
fixed seed) set the run; a long run for manual use: ``MESHXL_RESHARD_MODEL_STEPS=60``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import time
from collections import defaultdict
from typing import Any

import aetcd
import pytest

from meshxl import etcd as etcd_package
from meshxl.errors import Conflict, InputError, MeshxlError, Unavailable
from meshxl.etcd.shards import ShardMap, parse_shard_map
from meshxl.local.netns import Network, unavailable
from meshxl.local.ports import free_port
from meshxl.local.wait import wait_until
from meshxl.operator.shards import read_map, set_map
from tests.harness.clock import window
from tests.harness.shards import (
    KEYS,
    read_stored_map,
    session_keys,
    start_etcd_at,
    start_two_port_etcd,
    value_of,
)
from tests.harness.sidecar import SidecarProcess

pytestmark = pytest.mark.integration

CLUSTER = "shop"
STEPS = int(os.environ.get("MESHXL_RESHARD_MODEL_STEPS", "8"))
SEED = int(os.environ.get("MESHXL_RESHARD_MODEL_SEED", "20261125"))
SESSIONS = [f"m{i}" for i in range(12)]
# Each name is bound to one etcd cluster for the whole run (an ETag names a shard, so
# a name reused for another cluster would make two histories' ETags alike).
NAMES = {"s1": 0, "s2": 1, "s3": 2, "s4": 0, "s5": 1, "s6": 2}


class Stopped(BaseException):
    """The operator's process stopped half-way (nothing of it runs after)."""


@dataclasses.dataclass
class Event:
    sidecar: str
    kind: str  # "put" or "get"
    session: str
    start: float
    end: float
    status: int
    value: int | None = None
    """put: the value written; get: the value read (None: 404)."""
    if_match: str | None = None
    """put: the ETag compared (None: create only)."""
    etag: str | None = None
    source: str | None = None


@dataclasses.dataclass
class Bed:
    main_url: str
    urls: list[tuple[str, str]]
    """Each shard cluster's two client URLs."""
    dead: str
    net: Network | None
    history: list[Event] = dataclasses.field(default_factory=list)
    cut: bool = False


def _entry(name: str, bed: Bed, port: int = 0) -> dict[str, str]:
    return {"name": name, "etcd": bed.urls[NAMES[name]][port]}


async def _writer(name: str, sidecar: SidecarProcess, bed: Bed, rng: random.Random,
                  counter: list[int], stop: asyncio.Event) -> None:
    """Conditional writes and reads of random sessions until ``stop`` (bounded)."""
    etags: dict[str, str] = {}
    deadline = time.monotonic() + 600
    for _ in range(5000):
        if stop.is_set() or time.monotonic() > deadline:
            return
        session = rng.choice(SESSIONS)
        start = time.monotonic()
        try:
            reply = await sidecar.get(session)
        except Exception:  # the sidecar's connection went with a partition
            await asyncio.sleep(0.05)
            continue
        got = Event(name, "get", session, start, time.monotonic(), reply.status,
                    source=reply.source)
        if reply.status == 200:
            got.value, got.etag = reply.json()["v"], (reply.etag or "").strip('"')
            etags[session] = got.etag
        elif reply.status == 404:
            etags.pop(session, None)
        bed.history.append(got)
        if reply.status not in (200, 404):
            await asyncio.sleep(0.02)
            continue
        counter[0] += 1
        value = counter[0]
        tag = etags.get(session)
        headers = {"If-None-Match": "*"} if tag is None else {}
        start = time.monotonic()
        try:
            reply = await sidecar.put(session, {"v": value}, headers=headers,
                                      if_match=f'"{tag}"' if tag is not None else None)
            status, etag = reply.status, (reply.etag or "").strip('"') or None
        except Exception:  # unanswered: it may or may not have applied
            status, etag = 599, None
        bed.history.append(Event(name, "put", session, start, time.monotonic(), status,
                                 value, tag, etag))
        if etag is not None and status in (200, 201):
            etags[session] = etag


def _refusal_expected(kind: str) -> bool:
    return kind in ("twice", "elsewhere", "dead")


def _step(rng: random.Random, stored: ShardMap, bed: Bed) -> tuple[str, list[dict[str, str]]]:
    """The next list to set, and what kind of step it is."""
    if stored.moving:
        kind = rng.choice(["back", "back", "back", "on", "on", "other"]
                          if stored.stage == "prepare" and not stored.spread
                          else ["back", "back", "on"])
        if kind == "back":
            return kind, [{"name": s.name, "etcd": s.etcd} for s in stored.previous]
        if kind == "on":
            return kind, [{"name": s.name, "etcd": s.etcd} for s in stored.shards]
        # "other": a third list while nothing moved yet (from the list it started from)
        stored = ShardMap(stored.version, stored.previous)
    now = [{"name": s.name, "etcd": s.etcd} for s in stored.shards]
    used = {NAMES[s["name"]] for s in now}
    free_clusters = [c for c in range(len(bed.urls)) if c not in used]
    kind = rng.choice(["add"] * 4 + ["remove"] * 2 + ["rename"] * 2
                      + ["urls", "twice", "elsewhere", "dead"])
    if kind == "remove" and len(now) == 1 or kind == "add" and not free_clusters:
        kind = "add" if free_clusters else "remove"
    if kind == "add":
        cluster = rng.choice(free_clusters)
        name = rng.choice([n for n, c in NAMES.items() if c == cluster])
        return kind, [*now, _entry(name, bed, rng.randrange(2))]
    if kind == "remove" and len(now) > 1:
        gone = rng.randrange(len(now))
        return kind, [s for i, s in enumerate(now) if i != gone]
    if kind == "rename":
        i = rng.randrange(len(now))
        old = now[i]["name"]
        other = next(n for n, c in NAMES.items() if c == NAMES[old] and n != old)
        return kind, [*now[:i], {"name": other, "etcd": now[i]["etcd"]}, *now[i + 1:]]
    if kind == "urls":
        i = rng.randrange(len(now))
        urls = bed.urls[NAMES[now[i]["name"]]]
        flipped = urls[1] if now[i]["etcd"] == urls[0] else urls[0]
        return kind, [*now[:i], {"name": now[i]["name"], "etcd": flipped}, *now[i + 1:]]
    if kind == "twice":
        first = now[0]
        twin = next(n for n, c in NAMES.items() if c == NAMES[first["name"]]
                    and n != first["name"])
        return kind, [*now, {"name": twin, "etcd": first["etcd"]}]
    if kind == "elsewhere" and free_clusters:
        i = rng.randrange(len(now))
        return kind, [*now[:i], {"name": now[i]["name"],
                                 "etcd": bed.urls[free_clusters[0]][0]}, *now[i + 1:]]
    if kind == "dead" and free_clusters:
        name = next(n for n, c in NAMES.items() if c == free_clusters[0])
        return kind, [*now, {"name": name, "etcd": bed.dead}]
    return "same", now


async def _operate(bed: Bed, client: aetcd.Client, rng: random.Random, steps: int,
                   log: list[str]) -> None:
    @contextlib.asynccontextmanager
    async def connect(urls: str) -> Any:
        async with etcd_package.client(urls) as shard_client:
            yield shard_client

    for number in range(steps):
        stored, _ = await read_map(client, KEYS)
        assert stored is not None
        if bed.net is not None and rng.random() < 0.3:
            if bed.cut:
                await bed.net.heal(0)
            else:
                await bed.net.block(0, [1])
            bed.cut = not bed.cut
            log.append(f"{number}: sidecar c {'cut off' if bed.cut else 'healed'}")
        kind, shards = _step(rng, stored, bed)
        stop_at = rng.choice([None, None, "stored", "sessions move"])
        before = await read_stored_map(bed.main_url)

        def progress(line: str, stop_at: str | None = stop_at) -> None:
            if stop_at is not None and stop_at in line:
                raise Stopped(line)

        new = parse_shard_map({"version": 0, "shards": shards})
        started = time.monotonic()
        outcome = "done"
        try:
            await set_map(client, KEYS, new, connect, ack_timeout=4.0, probe_timeout=2.0,
                          progress=progress)
        except Stopped:
            outcome = "stopped"
        except (InputError, Conflict, Unavailable) as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        log.append(f"{number}: {kind} {[s['name'] + '@' + s['etcd'] for s in shards]} "
                   f"from v{stored.version}{' ' + stored.stage if stored.moving else ''}"
                   f" -> {outcome[:300]} ({time.monotonic() - started:.1f} s)")
        if _refusal_expected(kind):
            assert outcome.startswith(("InputError", "Unavailable")), log[-1]
            assert await read_stored_map(bed.main_url) == before, log[-1]
        elif outcome not in ("done", "stopped"):
            # Only a sidecar that has not taken a map may hold a step up (it stays
            # resumable); going back in particular is never refused.
            assert outcome.startswith("Conflict") and "have not taken" in outcome, log[-1]
        await window(rng.uniform(0.1, 0.8), "the fault at a random point of the load")


def _check(history: list[Event], final: dict[str, int | None], log: list[str]) -> None:
    """The history's properties (the module docstring)."""
    by_session: dict[str, list[Event]] = defaultdict(list)
    for event in history:
        by_session[event.session].append(event)
    value_of_etag: dict[str, int] = {}
    for event in history:
        if event.etag is not None and event.status in (200, 201) and event.value is not None:
            assert value_of_etag.setdefault(event.etag, event.value) == event.value, (
                "one ETag, two states", event)
    problems = []
    for session, events in by_session.items():
        puts = [e for e in events if e.kind == "put"]
        pred: dict[int, int | None] = {}
        for put in puts:
            assert put.value is not None
            pred[put.value] = (None if put.if_match is None
                               else value_of_etag.get(put.if_match, -1))
        end = final.get(session)
        applied = {e.value for e in puts if e.status in (200, 201)}
        applied |= {e.value for e in events if e.kind == "get" and e.status == 200}
        applied.add(end)
        applied.discard(None)
        depth: dict[int | None, int] = {None: 0}

        def position(value: int | None, pred: dict[int, int | None] = pred,
                     depth: dict[int | None, int] = depth) -> int:
            """How many applied writes lead to ``value`` (-1: not from this history)."""
            chain: list[int] = []
            at = value
            while at not in depth:
                if at not in pred or at in chain:
                    for v in chain:
                        depth[v] = -1
                    depth[at] = -1
                    return -1
                chain.append(at)
                at = pred[at]
            base = depth[at]
            for v in reversed(chain):
                base = -1 if base < 0 else base + 1
                depth[v] = base
            return depth[value]

        successors: dict[int | None, list[int]] = defaultdict(list)
        for value in applied:
            assert value is not None
            if value not in pred:
                problems.append(f"{session}: state {value} read, never written")
                continue
            successors[pred[value]].append(value)
        for parent, children in successors.items():
            if len(children) > 1:
                problems.append(f"{session}: writes {children} all applied on state {parent}"
                                " (a lost update)")
        acked = [e for e in puts if e.status in (200, 201)]
        newest = max((position(e.value) for e in acked), default=0)
        if position(end) < newest:
            problems.append(f"{session}: ends at {end} (position {position(end)}), an older "
                            f"state than acknowledged (position {newest})")
        for read in (e for e in events if e.kind == "get" and e.status in (200, 404)):
            if read.source == "cache-unverified":
                continue
            floor = max((position(e.value) for e in acked if e.end < read.start), default=0)
            if position(read.value) < floor:
                problems.append(f"{session}: {read.sidecar} read {read.value} at "
                                f"{read.start:.3f}, older than acknowledged before it "
                                f"(position {position(read.value)} < {floor})")
    assert not problems, "\n".join(problems[:20] + ["-- steps:", *log])


async def test_random_reshards_under_conditional_writes_and_a_partition(
        harness: Any, start_sidecar: Any) -> None:
    rng = random.Random(SEED)
    reason = unavailable()
    net = await Network(harness, 2).create() if reason is None else None
    host = net.driver_ip if net is not None else "127.0.0.1"
    if net is not None:
        main = await start_etcd_at(harness, "main", net.ip(1),
                                   wrap=lambda argv: net.wrap(1, argv))
    else:
        main = await start_etcd_at(harness, "main", host)
    clusters = [await start_two_port_etcd(harness, f"shard-{i}", host) for i in range(3)]
    bed = Bed(main.url, [(first, second) for _, first, second in clusters],
              f"http://{host}:{free_port()}", net)
    async with main.client() as client:
        await _start(bed, client)
        sidecars = {
            "a": await start_sidecar(cluster=CLUSTER, member="a", etcd=main.url,
                                     app_port=free_port(), lease_ttl=2.0, log_level="info"),
            "b": await start_sidecar(cluster=CLUSTER, member="b", etcd=main.url,
                                     app_port=free_port(), lease_ttl=2.0, log_level="info"),
        }
        if net is not None:
            sidecars["c"] = await start_sidecar(
                cluster=CLUSTER, member="c", etcd=main.url, app_port=free_port(),
                host=net.ip(0), wrap=lambda argv: net.wrap(0, argv),
                token="model-test-sidecar-token", lease_ttl=2.0, log_level="info")
        stop = asyncio.Event()
        counter = [0]
        writers = [asyncio.ensure_future(_writer(name, sidecar, bed,
                                                 random.Random(f"{SEED}-{name}"), counter,
                                                 stop))
                   for name, sidecar in sidecars.items()]
        log: list[str] = [f"seed {SEED}, {STEPS} steps, partition: {reason or 'yes'}"]
        try:
            await _operate(bed, client, rng, STEPS, log)
            if bed.cut and net is not None:
                await net.heal(0)
                bed.cut = False
            final_map = await _finish(bed, client, log)
        finally:
            stop.set()
            await asyncio.gather(*writers, return_exceptions=True)
        for sidecar in sidecars.values():
            await wait_until(lambda s=sidecar: _serves(s, final_map.version), timeout=30,
                             what=f"{sidecar.name} to take the final map")
        final = await _where_sessions_are(bed, final_map, log)
        acked = sum(1 for e in bed.history if e.kind == "put" and e.status in (200, 201))
        print("\n".join([*log, f"{acked} writes acknowledged of "
                          f"{sum(1 for e in bed.history if e.kind == 'put')}"]))
        assert acked > 20, (acked, log)
        _check(bed.history, final, log)


async def _start(bed: Bed, client: aetcd.Client) -> None:
    """The first map: two of the three clusters."""
    first = parse_shard_map({"version": 0, "shards": [_entry("s1", bed), _entry("s2", bed)]})

    @contextlib.asynccontextmanager
    async def connect(urls: str) -> Any:
        async with etcd_package.client(urls) as shard_client:
            yield shard_client

    await set_map(client, KEYS, first, connect)


async def _finish(bed: Bed, client: aetcd.Client, log: list[str]) -> ShardMap:
    """Every partition healed: the reshard under way (if any) is finished."""
    @contextlib.asynccontextmanager
    async def connect(urls: str) -> Any:
        async with etcd_package.client(urls) as shard_client:
            yield shard_client

    for _ in range(5):
        stored, _ = await read_map(client, KEYS)
        assert stored is not None
        if not stored.moving:
            return stored
        try:
            await set_map(client, KEYS, ShardMap(0, stored.shards), connect, ack_timeout=10)
        except MeshxlError as exc:
            log.append(f"finish: {exc}")
    raise AssertionError("the reshard could not be finished:\n" + "\n".join(log))


async def _serves(sidecar: SidecarProcess, version: int) -> bool:
    try:
        shards = (await sidecar.status())["shards"]
    except Exception:
        return False
    return bool(shards and shards["version"] == version and not shards["map_error"])


async def _where_sessions_are(bed: Bed, final_map: ShardMap,
                              log: list[str]) -> dict[str, int | None]:
    """Each session's final state, from the one cluster that holds it, which must be
    the one the map places it in; no cluster holds it anywhere else."""
    held: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for index, (url, _) in enumerate(bed.urls):
        for session, raw in (await session_keys(url, CLUSTER)).items():
            held[session].append((f"cluster{index}", value_of(raw)["v"]))
    for session in await session_keys(bed.main_url, CLUSTER):
        held[session].append(("main", -1))
    cluster_of = {s.name: f"cluster{NAMES[s.name]}" for s in final_map.shards}
    final: dict[str, int | None] = {}
    for session in SESSIONS:
        places = held.get(session, [])
        if places:
            assert [p for p, _ in places] == [cluster_of[final_map.of(session).name]], (
                session, places, "\n".join(log))
            final[session] = places[0][1]
        else:
            final[session] = None
    assert set(held) <= set(SESSIONS), held
    return final


def test_the_history_checker_finds_what_it_looks_for() -> None:
    """The checker above, on histories made up to break each property."""
    def put(value: int, if_match: str | None, start: float, status: int = 200,
            etag: str | None = None) -> Event:
        return Event("a", "put", "m0", start, start + 0.1, status, value, if_match, etag)

    def get(value: int | None, start: float, source: str = "etcd") -> Event:
        return Event("b", "get", "m0", start, start + 0.1, 200 if value else 404, value,
                     etag=None, source=source)

    good = [put(1, None, 0, 201, "s1:1"), put(2, "s1:1", 1, 200, "s1:2"), get(2, 2)]
    _check(good, {"m0": 2}, [])
    # An unacknowledged write that applied after the last acknowledged one: fine.
    _check([*good, put(3, "s1:2", 3, 503)], {"m0": 3}, [])
    broken = {
        "lost update": ([*good, put(3, "s1:1", 3, 200, "s2:1")], {"m0": 3}),
        "older state": (good, {"m0": 1}),
        "older than acknowledged": ([*good, get(1, 5)], {"m0": 2}),
        "read, never written": ([*good, get(7, 5)], {"m0": 2}),
    }
    for why, (history, final) in broken.items():
        with pytest.raises(AssertionError, match=why):
            _check(history, final, [])
    _check([*good, get(1, 5, source="cache-unverified")], {"m0": 2}, [])
