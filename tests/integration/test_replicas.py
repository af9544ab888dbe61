"""A highly available control plane: two replicas on one etcd, kill -9 the one Envoy is
connected to under load. Envoy moves to the other replica and re-syncs without
re-applying anything, clients see no failure, and a change made while a replica is
down reaches Envoy; the restarted replica serves the same versions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from meshxl.local.deployment import CLUSTER, DemoDeployment
from meshxl.local.procs import Owner
from meshxl.local.report import lost_writes
from meshxl.local.traffic import Traffic, read_back
from meshxl.local.wait import wait_until
from meshxl.proxy.admin import EnvoyAdmin
from tests.harness.cli import meshxl_json
from tests.harness.load import under_way

pytestmark = [pytest.mark.integration, pytest.mark.heavy]

# Envoy counters that move only when it re-applies configuration.
FLAP_STATS = ("cluster_manager.cluster_added", "cluster_manager.cluster_modified",
              "cluster_manager.cluster_removed", "listener_manager.listener_added",
              "listener_manager.listener_modified", "listener_manager.listener_removed")


@pytest.fixture(params=["sotw", "delta"])
async def deployment(request: pytest.FixtureRequest, harness: Owner,
                     tmp_path: Path) -> AsyncIterator[DemoDeployment]:
    async with DemoDeployment(tmp_path / "work", replicas=2,
                              delta=request.param == "delta") as d:
        harness.own(d.owner)  # its processes' logs in a failure report
        yield d


async def envoy_stats(d: DemoDeployment) -> dict[str, int]:
    async with EnvoyAdmin(d.admin_url) as admin:
        return await admin.stats()


async def node_replica(d: DemoDeployment) -> Any:
    report = await meshxl_json("status", "--etcd", d.etcd_url, "--etcd-prefix", d.keys.root)
    nodes = report["nodes"]
    return nodes[0]["replica"] if nodes else None


async def test_kill_the_connected_replica_under_load(deployment: DemoDeployment) -> None:
    d = deployment
    etcd = ["--etcd", d.etcd_url, "--etcd-prefix", d.keys.root]
    assert await node_replica(d) == "xds-0"  # the bootstrap's first choice
    before = await envoy_stats(d)
    assert before["control_plane.connected_state"] == 1

    sessions = 20
    traffic = Traffic(f"{d.url}/counter", sessions, time.time() + 7.0,
                      max_requests=sessions * 100)
    load = asyncio.create_task(traffic.run())
    await under_way(lambda: traffic.records, 40)
    await d.kill_replica(0)

    async def moved() -> bool:
        stats = await envoy_stats(d)
        return stats["control_plane.connected_state"] == 1 and await node_replica(d) == "xds-1"

    await wait_until(moved, timeout=15, what="Envoy to reconnect to replica xds-1")

    # A change while xds-0 is down reaches Envoy through xds-1.
    done = await meshxl_json("member", "down", CLUSTER, "c", "--wait", "10", *etcd)
    assert done["converged"], done["mismatches"]
    verified = await meshxl_json("verify", "--envoy-admin", d.admin_url, *etcd)
    assert verified["ok"], verified["mismatches"]

    await load
    assert traffic.failures == 0, [r for r in traffic.records if not r.ok][:5]
    final, readback = await read_back(f"{d.url}/counter", traffic.sessions)
    assert all(r.ok for r in readback)
    assert lost_writes(traffic.records, final) == {}

    # No flap: the reconnect re-sent the versions Envoy had; nothing was re-applied.
    after = await envoy_stats(d)
    assert {s: after[s] for s in FLAP_STATS} == {s: before[s] for s in FLAP_STATS}
    assert after["control_plane.connected_state"] == 1

    # The restarted replica serves the same versions (content hashes).
    await d.start_replica(d.replicas[0])
    versions = [(await replica.status())["versions"] for replica in d.replicas]
    assert versions[0] == versions[1]
    assert (await meshxl_json("verify", "--envoy-admin", d.admin_url, *etcd))["ok"]
