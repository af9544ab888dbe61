"""Judgements across control-plane replicas (meshxl.xds.judging): two real ``meshxl
serve xds`` processes on one real etcd, each fed by its own access log stream (gRPC
clients speaking Envoy's protocol) in which another member is slow, judge at the same
instants. The minority bound holds over both: one member of a tier of three degraded,
one of a tier of two, never more; and a high-availability cluster is probed and failed
over by one replica at a time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import aetcd
import pytest

from meshxl.etcd.keys import Keys
from meshxl.local.ports import free_ports
from meshxl.local.wait import wait_until
from meshxl.operator.actions import apply_model
from tests.harness.als import AlsFeed, Endpoints, subscribe
from tests.harness.controlplane import ControlPlaneProcess

pytestmark = [pytest.mark.integration, pytest.mark.heavy]

KEYS = Keys()
LOOPBACK = "127.0.0.1"
FAST, SLOW = 0.005, 0.1


def model(web: list[int], api: list[int]) -> str:
    def members(ports: list[int], prefix: str) -> str:
        return "".join(f"\n  - {{name: {prefix}{i}, address: {LOOPBACK}, port: {p}}}"
                       for i, p in enumerate(ports))
    clusters = ""
    for name, ports in (("web", web), ("api", api)):
        clusters += f"""
- name: {name}
  mode: load-sharing
  degradation: {{detect: 1s, recover: 30s, min_requests: 10}}
  members:{members(ports, name[0])}"""
    return "clusters:" + clusters + "\n"


async def degraded(client: aetcd.Client, cluster: str) -> dict[str, str]:
    got = await client.get_prefix(KEYS.health_prefix(cluster).encode())
    out = {}
    for kv in got.kvs:
        record = json.loads(kv.value)
        if record["kind"] == "degraded":
            out[kv.key.decode().rsplit("/", 1)[1]] = record["by"]
    return out


async def test_two_replicas_degrade_no_more_than_a_minority(
        harness: Any, etcd: Any, etcd_client: aetcd.Client) -> None:
    web, api = free_ports(3), free_ports(2)  # members nobody calls: only their logs count
    await apply_model(etcd_client, KEYS, model(web, api), "test")
    replicas = [ControlPlaneProcess(harness, name=f"xds-{i}", etcd=etcd.url) for i in range(2)]
    await asyncio.gather(*(r.start() for r in replicas))

    def host(port: int) -> str:
        return f"{LOOPBACK}:{port}"

    # Replica i's Envoy sees web's member i + 1 and api's member i slow, the others fast.
    feeds = [AlsFeed(r.address, f"edge-{i}", {
        **{("web", host(p)): SLOW if j == i + 1 else FAST for j, p in enumerate(web)},
        **{("api", host(p)): SLOW if j == i else FAST for j, p in enumerate(api)},
    }, seconds=12.0) for i, r in enumerate(replicas)]
    async with contextlib.AsyncExitStack() as stack:
        for i, r in enumerate(replicas):  # each Envoy routes to both clusters
            await stack.enter_async_context(subscribe(r.address, f"edge-{i}", ["web", "api"]))
        await judged_at_once(feeds, etcd_client)


async def judged_at_once(feeds: list[AlsFeed], etcd_client: aetcd.Client) -> None:
    started = time.monotonic()
    for f in feeds:
        f.start()
    try:
        most = {"web": 0, "api": 0}

        async def both_judged() -> bool:
            for cluster in most:
                most[cluster] = max(most[cluster], len(await degraded(etcd_client, cluster)))
            return all(most.values())

        await wait_until(both_judged, timeout=10, interval=0.05,
                         what="a member of each tier degraded")
        judged = time.monotonic() - started
        # Both replicas keep judging from their own Envoy for two more seconds.
        until = time.monotonic() + 2.0
        while time.monotonic() < until:
            await both_judged()
            await asyncio.sleep(0.05)
        assert most == {"web": 1, "api": 1}, most
        assert set(await degraded(etcd_client, "web")) <= {"w1", "w2"}
        print(f"\njudged {judged:.1f} s after the slow logs began; at most {most} degraded")
        assert all(f.error is None for f in feeds), [f.error for f in feeds]
    finally:
        for f in feeds:
            await f.stop()


def following(endpoints: Endpoints, cluster: str, started: float,
              slow: str) -> Callable[[], Iterator[tuple[str, str, int, float]]]:
    """An Envoy's requests: 10 a tick over the serving tier by weight, ``slow`` 200 ms
    slower than the others after the first 3.5 s."""
    def plan() -> Iterator[tuple[str, str, int, float]]:
        tier = endpoints.tiers.get(cluster, {})
        weight = sum(tier.values()) or 1
        sick = time.monotonic() - started >= 3.5
        for host, w in tier.items():
            n = max(1, round(10 * w / weight))
            yield cluster, host, n, FAST + (0.2 if sick and host == slow else 0.0)
    return plan


async def test_two_replicas_probe_and_fail_over_one_at_a_time(
        harness: Any, etcd: Any, etcd_client: aetcd.Client) -> None:
    """High availability: both replicas' Envoys see the active slow at the same
    instant; one replica probes and fails over, the other's judgements are not
    written beside it (before, both wrote the probe's record and took it from each
    other every window)."""
    ports = free_ports(3)
    members = "".join(f"\n  - {{name: p{i}, address: {LOOPBACK}, port: {p}}}"
                      for i, p in enumerate(ports))
    await apply_model(etcd_client, KEYS, f"""
clusters:
- name: pay
  mode: high-availability
  degradation: {{detect: 1s, recover: 30s, min_requests: 10}}
  members:{members}
""", "test")
    replicas = [ControlPlaneProcess(harness, name=f"xds-{i}", etcd=etcd.url) for i in range(2)]
    await asyncio.gather(*(r.start() for r in replicas))
    active = f"{LOOPBACK}:{ports[0]}"
    owners: list[tuple[float, dict[str, str]]] = []
    async with contextlib.AsyncExitStack() as stack:
        started = time.monotonic()
        feeds = []
        for i, r in enumerate(replicas):
            endpoints = await stack.enter_async_context(
                subscribe(r.address, f"edge-{i}", ["pay"]))
            feeds.append(AlsFeed(r.address, f"edge-{i}", {}, plan=following(
                endpoints, "pay", started, active), seconds=12.0).start())
        try:
            async def failed_over() -> bool:
                got = await etcd_client.get_prefix(KEYS.health_prefix("pay").encode())
                found = {kv.key.decode().rsplit("/", 1)[1]: json.loads(kv.value)
                         for kv in got.kvs}
                owners.append((time.monotonic() - started,
                               {m: f"{r['kind']} by {r['by']}" for m, r in found.items()}))
                return found.get("p0", {}).get("kind") == "degraded"

            await wait_until(failed_over, timeout=12, interval=0.05,
                             what="the slow active failed over")
            until = time.monotonic() + 1.5
            while time.monotonic() < until:
                await failed_over()
                await asyncio.sleep(0.05)
        finally:
            for f in feeds:
                await f.stop()
    judges = {record.rsplit(" by ", 1)[1] for _, found in owners for record in found.values()}
    changes = [(round(t, 2), f) for i, (t, f) in enumerate(owners)
               if i == 0 or f != owners[i - 1][1]]
    assert len(judges) == 1, changes  # one replica's judgements, from probe to failover
    moved = next(t for t, found in owners if found.get("p0", "").startswith("degraded"))
    print(f"\nfailed over {moved - 3.5:.1f} s after the slowdown, judged by {judges.pop()} "
          "alone")
