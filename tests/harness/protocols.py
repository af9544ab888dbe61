"""Shared by the protocol tests (gRPC, WebSocket, TCP through the real Envoy): one local
deployment per test module, session traffic of one kind around an action (a kill -9,
a member down), and the checks every failover must pass."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from meshxl import etcd
from meshxl.local.deployment import CLUSTER, DemoDeployment, envoy_hosts
from meshxl.local.report import lost_writes
from meshxl.local.streams import StreamTraffic, read_back_kind
from meshxl.local.wait import wait_until
from meshxl.operator.actions import set_member_admin, set_site_admin
from meshxl.proxy.admin import EnvoyAdmin
from tests.harness.clock import scaled, window
from tests.harness.load import under_way

FAILOVER = "{failback_delay: 2s}"
"""A member brought back gets its place back 2 s after it is well (10 s by default):
each test's clean-up (:func:`restart`) waits for it (:func:`settled`)."""


@asynccontextmanager
async def deployment(work: Path, protocol: str, *, mode: str = "high-availability",
                     members: Sequence[tuple[str, str]] | None = None,
                     drain_window: float | None = None,
                     fields: dict[str, str] | None = None,
                     hash_cookie: str | None = None,
                     failover: str = FAILOVER) -> AsyncIterator[DemoDeployment]:
    d = DemoDeployment(work, protocol=protocol, mode=mode, members=members,
                       drain_window=drain_window, lease_ttl=2.0, fields=fields,
                       hash_cookie=hash_cookie, failover=failover)
    try:
        async with asyncio.timeout(scaled(90)):
            await d.start()
    except BaseException:
        report = d.owner.report()
        await d.close()
        raise AssertionError(f"the {protocol} deployment did not start:\n{report}") from None
    _started_tiers[id(d)] = await tiers(d)
    try:
        yield d
    finally:
        _started_tiers.pop(id(d), None)
        await d.close()


_started_tiers: dict[int, dict[str, int]] = {}
"""Each deployment's members' priorities in Envoy once it started (:func:`settled`)."""


async def tiers(d: DemoDeployment) -> dict[str, int]:
    """Each member's priority in Envoy (0 takes new sessions first)."""
    return {h.hostname: h.priority for h in await envoy_hosts(d.admin_url)}


async def settled(d: DemoDeployment, timeout: float = 60) -> None:
    """Until every member is healthy in Envoy at the priority it had when the deployment
    started: a member that came back has its place back (its failback delay ended) and
    the planned move that gives it back is over, so the next test starts from the same
    deployment, not from one whose active role is about to move."""
    await d.wait_all_healthy(scaled(30))
    started = _started_tiers.get(id(d))
    if started is None:
        return

    async def back() -> bool:
        return await tiers(d) == started

    await wait_until(back, timeout=scaled(timeout),
                     what="every member back at its priority of the start",
                     explain=lambda: tiers(d))
async def traffic_around(d: DemoDeployment, kind: str, sessions: int, *, before: float,
                         after: float, action: Callable[[StreamTraffic], Awaitable[Any]],
                         interval: float = 0.1,
                         done: Callable[[StreamTraffic], bool] | None = None,
                         prefix: str = "s") -> tuple[StreamTraffic, Any, float]:
    """Traffic of ``kind``, once every session is answered for ``before`` more seconds,
    then ``action(traffic)`` (its result and time returned), then until
    ``done(traffic)`` (at most ``after`` seconds)."""
    traffic = StreamTraffic(kind, d.target, sessions, time.time() + before + after + 30,
                            max_requests=sessions * 2000, interval=interval,
                            prefix=prefix)
    load = asyncio.create_task(traffic.run())
    try:
        await under_way(lambda: traffic.records, sessions, what=f"the {kind} traffic")
        await window(before, "traffic before the action, for the checks to compare with")
        at = time.time()
        result = await action(traffic)
        if done is not None:
            await wait_until(lambda: done(traffic), timeout=after, interval=0.05,
                             what=f"the {kind} clients to settle after the action")
        else:
            await window(after, "traffic after the action, for the checks to judge")
    finally:
        traffic.until = time.time()
        async with asyncio.timeout(scaled(30)):
            await load
    return traffic, result, at


async def no_loss(d: DemoDeployment, kind: str, traffic: StreamTraffic) -> None:
    """Every acknowledged increment survives: no seq went back during the run, and
    each session reads back at least its last acknowledged value."""
    final, readback = await read_back_kind(kind, d.target, traffic.sessions)
    assert not [r for r in readback if not r.ok], readback
    assert lost_writes(traffic.records, final) == {}
    for session in traffic.sessions:
        seqs = [r.seq for r in sorted(traffic.records, key=lambda r: r.sent)
                if r.session == session and r.ok and r.seq is not None]
        assert all(b > a for a, b in zip(seqs, seqs[1:], strict=False)), (session, seqs)


async def member_down(d: DemoDeployment, member: str, down: bool = True) -> None:
    """``meshxl member down`` (``down=False``: up, then wait until Envoy has the listener
    back at no drain generation and has closed what it drained)."""
    async with etcd.client(d.etcd_url) as client:
        await set_member_admin(client, d.keys, CLUSTER, member, down, "protocol test")
    if not down:
        await wait_listener_settled(d)
        await settled(d)


async def site_offline(d: DemoDeployment, site: str, offline: bool = True) -> None:
    async with etcd.client(d.etcd_url) as client:
        await set_site_admin(client, d.keys, site, offline, "protocol test")
    if not offline:
        await wait_listener_settled(d)
        await settled(d)


async def restart(d: DemoDeployment, member: str) -> None:
    """Bring a killed member back and wait until it has its place back (:func:`settled`)."""
    await d.reap_member(member)
    await d.start_member(d.member(member))
    await settled(d)


async def drained_generation(d: DemoDeployment) -> str:
    """The drain generation of the demo listener as Envoy runs it ("" for none)."""
    async with EnvoyAdmin(d.admin_url) as admin:
        dump = await admin.config_dump("dynamic_listeners")
    for item in dump.get("configs", []):
        active = item.get("active_state", {}).get("listener", {})
        if active.get("address", {}).get("socket_address", {}).get("port_value") == \
                d.listen_port:
            metadata = active["filter_chains"][0].get("metadata", {})
            return str(metadata.get("filter_metadata", {}).get("meshxl", {})
                       .get("meshxl.drain", ""))
    raise AssertionError(f"no listener on port {d.listen_port} in Envoy")


async def wait_listener_settled(d: DemoDeployment, generation: str = "") -> None:
    """Until Envoy runs the listener with ``generation`` and has finished draining the
    connections of the one before (a member coming back up recycles them too)."""
    async def settled() -> bool:
        if await drained_generation(d) != generation:
            return False
        async with EnvoyAdmin(d.admin_url) as admin:
            return (await admin.stat("listener_manager.total_filter_chains_draining")
                    or 0) == 0

    await wait_until(settled, timeout=20, interval=0.05,
                     what=f"Envoy's listener at drain generation {generation!r}, drained")
