"""Judgements across control-plane replicas (meshxl.xds.judging): two real ``meshxl
serve xds`` processes on one real etcd, each fed by its own access log stream (gRPC
clients speaking Envoy's protocol) in which another member is slow, judge at the same
instants. The minority bound holds over both: one member of a tier of three degraded,
one of a tier of two, never more."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import aetcd
import pytest

from meshxl.etcd.keys import Keys
from meshxl.local.ports import free_ports
from meshxl.local.wait import wait_until
from meshxl.operator.actions import apply_model
from tests.harness.als import AlsFeed, subscribe
from tests.harness.controlplane import ControlPlaneProcess

pytestmark = pytest.mark.integration

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
