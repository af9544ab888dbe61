"""Session writes through statesync beside Redis (``bench/peers.py``).

Systems, each written by the same writers (``writers`` at once, each overwriting its own
16 sessions in turn with a ~1 KiB JSON value that carries an increasing counter):

* ``statesync``: a sidecar's session API (``meshxl.client.AsyncClient`` PUT), acknowledged
  once etcd has committed the write (fsync'd on a quorum);
* ``redis-async``: Redis 7 primary with one replica (``replicaof``), ``SET`` acknowledged
  by the primary alone, replication behind it; AOF on with ``appendfsync everysec``
  (Redis's recommended durability);
* ``redis-wait1``: the same ``SET`` followed by ``WAIT 1 1000`` on the same connection
  (one round trip, pipelined): acknowledged only when the replica has it.

1. On loopback (one etcd member, the replica on the same machine): writes/s and latency,
   ``rounds`` rounds in alternating order; ratios to Redis beside them.
2. Over the dual-site bed's WAN (``meshxl.local.sites.DualSite``, a user-space delay
   proxy on every cross-site path; etcd 2 + 2 + 1 with a witness; Redis's primary in
   east, its replica in west): write latency, then the primary's site lost at once
   (east blackholed, Redis's primary killed) while the writers run; Redis's replica is
   promoted (``REPLICAOF NO ONE``) and every session read back in west. Counted:
   acknowledged writes whose value west does not have (``lost_writes``) and sessions
   west could not read at all (``unreadable_sessions``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from benchlib import Verdict, summary_ms

from meshxl.local import commands
from meshxl.local.ports import free_ports
from meshxl.local.procs import Owner
from meshxl.local.servers import HOST, start_etcd
from meshxl.local.wait import wait_http, wait_until

SYSTEMS = ("statesync", "redis-async", "redis-wait1")
SESSIONS_PER_WRITER = 16
VALUE_PAD = "x" * 1000
WAIT_TIMEOUT_MS = 1000
WAN_RTT_MS = 20.0

Write = Callable[[str, int], Awaitable[bool]]
"""Write counter ``n`` to a session; True when the system acknowledged it durable."""


def _value(n: int) -> str:
    return json.dumps({"n": n, "pad": VALUE_PAD})


def redis_argv(port: int, data: Path, host: str = HOST,
               replica_of: tuple[str, int] | None = None) -> list[str]:
    argv = ["redis-server", "--bind", host, "--port", str(port), "--dir", str(data),
            "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
            "--protected-mode", "no", "--daemonize", "no", "--logfile", ""]
    if replica_of is not None:
        argv += ["--replicaof", replica_of[0], str(replica_of[1])]
    return argv


async def _redis_writer(host: str, port: int, wait: bool) -> tuple[Write, Any]:
    import redis.asyncio as aioredis

    # One connection per writer: WAIT counts the writes of its own connection.
    client = aioredis.Redis(host=host, port=port, single_connection_client=True,
                            socket_timeout=5, socket_connect_timeout=5)

    async def write(session: str, n: int) -> bool:
        if not wait:
            return bool(await client.set(session, _value(n)))
        async with client.pipeline(transaction=False) as pipe:
            pipe.set(session, _value(n))
            pipe.wait(1, WAIT_TIMEOUT_MS)
            _, replicas = await pipe.execute()
        return int(replicas) >= 1

    return write, client


async def _statesync_writer(url: str, token: str | None) -> tuple[Write, Any]:
    from meshxl.client import AsyncClient

    client = AsyncClient(url, token=token)

    async def write(session: str, n: int) -> bool:
        await client.put(session, {"n": n, "pad": VALUE_PAD})
        return True

    return write, client


async def _close(client: Any) -> None:
    closer = getattr(client, "aclose", None) or client.close
    result = closer()
    if asyncio.iscoroutine(result):
        await result


class Writers:
    """``count`` writers, each overwriting its own sessions with an increasing counter."""

    def __init__(self, count: int, prefix: str) -> None:
        self.sessions = [[f"{prefix}-{w}-{i}" for i in range(SESSIONS_PER_WRITER)]
                         for w in range(count)]
        self.acked: dict[str, list[int]] = {}
        """Per session, every counter value acknowledged."""
        self.latencies: list[float] = []
        self.failed = 0
        self.stop_at = float("inf")

    async def run(self, writers: list[Write], seconds: float) -> float:
        """Write for ``seconds`` (or until :attr:`stop_at`); returns writes/s."""
        end = time.time() + seconds
        n = [0]

        async def one(write: Write, sessions: list[str]) -> None:
            i = 0
            while time.time() < min(end, self.stop_at):
                n[0] += 1
                counter = n[0]
                session = sessions[i % len(sessions)]
                started = time.perf_counter()
                try:
                    ok = await write(session, counter)
                except Exception:  # noqa: BLE001 - a failed write is counted
                    ok = False
                if ok and time.time() <= self.stop_at:
                    self.latencies.append((time.perf_counter() - started) * 1000)
                    self.acked.setdefault(session, []).append(counter)
                elif not ok:
                    self.failed += 1
                i += 1

        started = time.time()
        tasks = [asyncio.create_task(one(w, s)) for w, s in zip(writers, self.sessions,
                                                                 strict=True)]
        try:
            while not all(t.done() for t in tasks):
                if time.time() >= self.stop_at:
                    break  # the site is gone: whatever is in flight is not acknowledged
                await asyncio.sleep(0.005)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return len(self.latencies) / max(time.time() - started, 1e-9)


def lost_after(acked: dict[str, list[int]], read: dict[str, int | None],
               ) -> dict[str, int]:
    """What the surviving site has of the acknowledged writes. A session holds the
    counter of its last write; one read back at ``v`` lost every acknowledged write
    above ``v`` (0: the session is not there at all). A session that could not be read
    (``None``: an error, not an absence) proves nothing either way: it is counted
    apart, its writes neither lost nor kept."""
    lost = sessions_behind = unreadable = 0
    for session, counters in acked.items():
        value = read.get(session)
        if value is None:
            unreadable += 1
            continue
        missing = sum(1 for n in counters if n > value)
        lost += missing
        sessions_behind += missing > 0
    return {"lost_writes": lost, "sessions_behind": sessions_behind,
            "unreadable_sessions": unreadable}


# -- 1. loopback ---------------------------------------------------------------------------


async def loopback(owner: Owner, writers: int, seconds: float, rounds: int) -> dict[str, Any]:
    etcd_url, _ = await start_etcd(owner)
    app_port, sidecar_port, primary, replica = free_ports(4)
    sidecar = owner.spawn("sidecar", commands.statesync(
        cluster="peers", member="m1", app=f"{HOST}:{app_port}",
        listen=f"{HOST}:{sidecar_port}", etcd=etcd_url, log_level="warning"))
    await wait_http(f"http://{HOST}:{sidecar_port}/readyz", process=sidecar, timeout=30)
    for name, port, of in (("redis-primary", primary, None),
                           ("redis-replica", replica, (HOST, primary))):
        data = owner.root / name
        data.mkdir()
        owner.spawn(name, redis_argv(port, data, replica_of=of))
    await _wait_replicated(HOST, primary)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SYSTEMS}
    for r in range(rounds):
        order = SYSTEMS if r % 2 == 0 else tuple(reversed(SYSTEMS))
        for system in order:
            clients = [await _make(system, f"http://{HOST}:{sidecar_port}", None, HOST, primary)
                       for _ in range(writers)]
            w = Writers(writers, f"{system}-{r}")
            try:
                rate = await w.run([c[0] for c in clients], seconds)
            finally:
                for _, client in clients:
                    await _close(client)
            runs[system].append({"writes_per_s": round(rate, 1), "failed": w.failed,
                                 "latency_ms": summary_ms(w.latencies)})
    out: dict[str, Any] = {"writers": writers, "seconds": seconds, "rounds": rounds,
                           "systems": {}}
    for system, rs in runs.items():
        rates = sorted(x["writes_per_s"] for x in rs)
        out["systems"][system] = {
            "writes_per_s_median": rates[len(rates) // 2],
            "p50_ms_median": sorted(x["latency_ms"].get("p50", 0) for x in rs)[len(rs) // 2],
            "p99_ms_median": sorted(x["latency_ms"].get("p99", 0) for x in rs)[len(rs) // 2],
            "runs": rs}
    s = out["systems"]
    for peer in ("redis-async", "redis-wait1"):
        out[f"rate_ratio_to_{peer}"] = _ratio(s["statesync"]["writes_per_s_median"],
                                              s[peer]["writes_per_s_median"])
        out[f"p50_ratio_to_{peer}"] = _ratio(s["statesync"]["p50_ms_median"],
                                             s[peer]["p50_ms_median"])
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


async def _make(system: str, sidecar_url: str, token: str | None, redis_host: str,
                redis_port: int) -> tuple[Write, Any]:
    if system == "statesync":
        return await _statesync_writer(sidecar_url, token)
    return await _redis_writer(redis_host, redis_port, wait=system == "redis-wait1")


async def _wait_replicated(host: str, primary: int) -> None:
    import redis.asyncio as aioredis

    async def linked() -> bool:
        client = aioredis.Redis(host=host, port=primary, socket_timeout=2,
                                socket_connect_timeout=2)
        try:
            info = await client.info("replication")
            return int(info.get("connected_slaves", 0)) >= 1 and all(
                v.get("state") == "online" for k, v in info.items()
                if k.startswith("slave") and isinstance(v, dict))
        except Exception:  # noqa: BLE001 - not up yet
            return False
        finally:
            await client.aclose()

    await wait_until(linked, timeout=30, interval=0.2, what="the Redis replica in sync")


# -- 2. a primary's site lost over the WAN ---------------------------------------------------


async def wan_loss(owner: Owner, writers: int, seconds: float) -> dict[str, Any]:
    """Latency and the loss of east, per system, each on a fresh bed."""
    from meshxl.local.sites import DualSite

    out: dict[str, Any] = {"rtt_ms": WAN_RTT_MS, "writers": writers, "systems": {}}
    for system in SYSTEMS:
        sub = Owner(owner.root / f"wan-{system}", label=f"peers-wan-{system}")
        async with DualSite(sub, rtt_ms=WAN_RTT_MS) as bed:
            link = await bed.link_rtt()  # the link itself, before the loss cuts it
            if system == "statesync":
                await bed.move_leader("east")  # the writers' site leads, as dualsite.py
                result = await _loss_statesync(bed, writers, seconds)
            else:
                result = await _loss_redis(bed, writers, seconds, system == "redis-wait1")
            result["link_ms"] = link
        out["systems"][system] = result
    return out


async def _loss(writers_: list[tuple[Write, Any]], w: Writers, seconds: float,
                lose: Callable[[], Awaitable[float]]) -> float:
    """Write for ``seconds``, lose the site, stop: returns the loss time."""
    run = asyncio.create_task(w.run([c[0] for c in writers_], seconds + 30))
    await asyncio.sleep(seconds)
    at = await lose()
    w.stop_at = at
    await run
    for _, client in writers_:
        await _close(client)
    return at


async def _loss_redis(bed: Any, writers: int, seconds: float, wait: bool) -> dict[str, Any]:
    import redis.asyncio as aioredis

    east, west = bed.ip("east"), bed.ip("west")
    port = 6379
    procs = {}
    for site, of in (("east", None), ("west", (east, port))):
        data = bed.owner.root / f"redis-{site}"
        data.mkdir()
        procs[site] = bed.spawn(site, f"redis-{site}", redis_argv(
            port, data, host=bed.ip(site), replica_of=of))
    await _wait_replicated(east, port)
    clients = [await _redis_writer(east, port, wait) for _ in range(writers)]
    w = Writers(writers, "wan")

    async def lose() -> float:
        import signal

        at = await bed.blackhole("east")
        procs["east"].signal(signal.SIGKILL)
        return at

    at = await _loss(clients, w, seconds, lose)
    replica = aioredis.Redis(host=west, port=port, socket_timeout=5)
    try:
        await replica.execute_command("REPLICAOF", "NO", "ONE")
        read: dict[str, int | None] = {}
        for session in w.acked:
            try:
                raw = await replica.get(session)
            except Exception:  # noqa: BLE001 - counted as unreadable
                read[session] = None
                continue
            read[session] = json.loads(raw)["n"] if raw is not None else 0
    finally:
        await replica.aclose()
    return {"acknowledged_writes": len(w.latencies), "sessions": len(w.acked),
            **lost_after(w.acked, read), "failed_writes": w.failed,
            "latency_ms": summary_ms(w.latencies), "lost_at_unix": at}


async def _loss_statesync(bed: Any, writers: int, seconds: float) -> dict[str, Any]:
    from meshxl.client import AsyncClient, NotFound

    near = next(m for m in bed.site_members if m.site == "east")
    far = next(m for m in bed.site_members if m.site == "west")
    clients = [await _statesync_writer(bed.sidecar_url(near), bed.token)
               for _ in range(writers)]
    w = Writers(writers, "wan")
    at = await _loss(clients, w, seconds, lambda: bed.blackhole("east"))
    read: dict[str, int | None] = {}
    async with AsyncClient(bed.sidecar_url(far), token=bed.token) as reader:
        deadline = time.time() + 60
        for session in w.acked:
            read[session] = None
            while time.time() < deadline:
                try:
                    read[session] = int((await reader.get(session)).state["n"])
                    break
                except NotFound:
                    read[session] = 0  # not there: every acknowledged write lost
                    break
                except Exception:  # noqa: BLE001 - west's etcd still electing
                    await asyncio.sleep(0.2)
    return {"acknowledged_writes": len(w.latencies), "sessions": len(w.acked),
            **lost_after(w.acked, read), "failed_writes": w.failed,
            "latency_ms": summary_ms(w.latencies), "lost_at_unix": at}


# -- the whole part ------------------------------------------------------------------------


async def run(work: Path, writers: int, seconds: float, *, wan: bool,
              quick: bool) -> dict[str, Any]:
    owner = Owner(work, label="peers-stores", grace=3.0)
    out: dict[str, Any] = {}
    try:
        out["loopback"] = await loopback(owner, writers, seconds, 1 if quick else 3)
    finally:
        await owner.aclose()
    if wan:
        from meshxl.local.sites import unavailable

        reason = unavailable()
        if reason is None:
            wan_owner = Owner(work / "wan", label="peers-wan", grace=3.0)
            try:
                out["wan"] = await wan_loss(wan_owner, min(writers, 8), seconds)
            finally:
                await wan_owner.aclose()
        else:
            out["wan_skipped"] = reason
    return out


def verdicts(stores: dict[str, Any]) -> list[Verdict]:
    out: list[Verdict] = []
    wan = stores.get("wan")
    if wan:
        s = wan["systems"]
        mine = s["statesync"]
        out.append(Verdict(
            "primary site lost over the WAN: acknowledged writes lost (statesync)",
            mine["lost_writes"] + mine["unreadable_sessions"], 0, "writes",
            reference=f"Redis async lost {s['redis-async']['lost_writes']} of "
                      f"{s['redis-async']['acknowledged_writes']} acknowledged writes, WAIT 1 "
                      f"{s['redis-wait1']['lost_writes']}; RTT {wan['rtt_ms']:g} ms; write p50 "
                      f"{mine['latency_ms'].get('p50')} ms vs WAIT 1's "
                      f"{s['redis-wait1']['latency_ms'].get('p50')} ms"))
    return out


def print_rows(stores: dict[str, Any]) -> None:
    lo = stores.get("loopback")
    if lo:
        print(f"\n== session writes on loopback ({lo['writers']} writers, {lo['rounds']} "
              "rounds, medians)")
        for system, s in lo["systems"].items():
            print(f"  {system:<12} {s['writes_per_s_median']:>10,.0f} writes/s  p50 "
                  f"{s['p50_ms_median']:>6} ms  p99 {s['p99_ms_median']:>6} ms")
    wan = stores.get("wan")
    if wan:
        print(f"\n== the primary's site lost over a {wan['rtt_ms']:g} ms WAN")
        for system, s in wan["systems"].items():
            print(f"  {system:<12} acknowledged {s['acknowledged_writes']:>6}  lost "
                  f"{s['lost_writes']:>5} ({s['sessions_behind']} of {s['sessions']} "
                  f"sessions behind)  unreadable {s['unreadable_sessions']:>3}  write p50 "
                  f"{s['latency_ms'].get('p50')} ms")
    elif "wan_skipped" in stores:
        print(f"\n(WAN loss skipped: {stores['wan_skipped']})")
