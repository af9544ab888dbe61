"""A load-correlated slowdown does not move the active role (meshxl.xds.health): a real
``meshxl serve xds`` on a real etcd, and a gRPC client that stands in for an Envoy in
front of a high-availability cluster: it follows the endpoints it is sent (the active's
tier; a probed standby's share) and logs, for each member, requests as slow as the load
it carries. Two identical members, five times the load within 2 s: before, the probe
compared the loaded active with the standby's small share and moved the role."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import aetcd
import pytest

from meshxl.etcd.keys import Keys
from meshxl.local.ports import free_ports
from meshxl.operator.actions import apply_model
from tests.harness.als import AlsFeed, Endpoints, subscribe
from tests.harness.controlplane import ControlPlaneProcess

pytestmark = [pytest.mark.integration, pytest.mark.heavy]

KEYS = Keys()
LOOPBACK = "127.0.0.1"
TICK = 0.1  # seconds between two messages
BASE, PEAK = 6, 30  # requests per tick before and after the ramp
BASELINE, RAMP, HOLD = 3.5, 2.0, 4.5  # seconds


def latency(per_tick: int) -> float:
    """Identical members: 5 ms, and 2 ms more per request of theirs in a tick."""
    return 0.005 + 0.002 * per_tick


def load(elapsed: float) -> int:
    if elapsed < BASELINE:
        return BASE
    return min(PEAK, BASE + round((elapsed - BASELINE) / RAMP * (PEAK - BASE)))


class Client:
    """Requests split over the serving tier by weight, as Envoy's load balancer does."""

    def __init__(self, endpoints: Endpoints) -> None:
        self.endpoints = endpoints
        self.started = time.monotonic()
        self.served: dict[str, int] = {}

    def plan(self) -> Iterator[tuple[str, str, int, float]]:
        total = load(time.monotonic() - self.started)
        tier = self.endpoints.tiers.get("pay", {})
        weight = sum(tier.values()) or 1
        for host, w in tier.items():
            n = round(total * w / weight)
            if n:
                self.served[host] = self.served.get(host, 0) + n
                yield "pay", host, n, latency(n)


async def records(client: aetcd.Client) -> dict[str, dict[str, Any]]:
    got = await client.get_prefix(KEYS.health_prefix("pay").encode())
    return {kv.key.decode().rsplit("/", 1)[1]: json.loads(kv.value) for kv in got.kvs}


async def test_identical_members_slowed_by_load_keep_their_roles(
        harness: Any, etcd: Any, etcd_client: aetcd.Client) -> None:
    a, b = free_ports(2)
    await apply_model(etcd_client, KEYS, f"""
clusters:
- name: pay
  mode: high-availability
  degradation: {{detect: 1s, recover: 4s, min_requests: 10}}
  members:
  - {{name: a, address: {LOOPBACK}, port: {a}}}
  - {{name: b, address: {LOOPBACK}, port: {b}}}
""", "test")
    plane = await ControlPlaneProcess(harness, name="xds-0", etcd=etcd.url).start()
    async with subscribe(plane.address, "edge-1", ["pay"]) as endpoints:
        assert set(endpoints.tiers["pay"]) == {f"{LOOPBACK}:{a}"}  # a is active
        client = Client(endpoints)
        feed = AlsFeed(plane.address, "edge-1", {}, interval=TICK, plan=client.plan,
                       seconds=BASELINE + RAMP + HOLD + 1).start()
        judged: list[tuple[float, dict[str, Any]]] = []
        try:
            end = client.started + BASELINE + RAMP + HOLD
            while time.monotonic() < end:
                found = await records(etcd_client)
                if found:
                    judged.append((time.monotonic() - client.started, found))
                await asyncio.sleep(0.1)
        finally:
            await feed.stop()
    moved = [(round(t, 1), {m: r["kind"] for m, r in f.items()}) for t, f in judged
             if any(r["kind"] == "degraded" for r in f.values())]
    assert moved == [], f"the active role moved: {moved[:3]}"
    assert set(client.served) == {f"{LOOPBACK}:{a}"} or client.served.get(
        f"{LOOPBACK}:{b}", 0) < sum(client.served.values()) * 0.1, client.served
    assert feed.error is None, feed.error
    print(f"\n{sum(client.served.values())} requests logged over "
          f"{BASELINE + RAMP + HOLD:g} s, load x{PEAK // BASE}: the role stayed on a "
          f"({len(judged)} polls saw a judgement: {[f for _, f in judged][:1]})")
