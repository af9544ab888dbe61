"""Problems every member reports, through real sidecars, etcd and Envoy.

Every member of a cluster reporting the same problem (its shared database is down)
used to withdraw every member: every request got ``503 no healthy upstream``, pinned
sessions included. ClusterXL keeps the best member "Active Attention" instead, and so
does meshxl (``failover.all_withdrawn: keep-best``): that member's health check passes
in spite of its report, Envoy keeps sending it traffic, and ``meshxl status``, the
metrics and the sidecar's readiness say it is ``active-attention``.

Problems reported with a TTL end unless reported again and outlive a sidecar restart;
problems without one end with the sidecar process (docs/statesync.md).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meshxl import etcd
from meshxl.etcd.keys import Keys
from meshxl.local.deployment import CLUSTER, DemoDeployment, demo_model, envoy_hosts
from meshxl.local.procs import Owner
from meshxl.local.wait import wait_until
from meshxl.operator.actions import apply_model
from meshxl.operator.views import read_mesh, status_report
from tests.harness.cli import meshxl
from tests.harness.clock import scaled, window
from tests.integration.test_ops import scrape
from tests.integration.test_pinned_sessions import Browser, moved

pytestmark = [pytest.mark.integration, pytest.mark.heavy]


@pytest.fixture
async def pinned(harness: Owner, tmp_path: Path) -> AsyncIterator[DemoDeployment]:
    async with DemoDeployment(tmp_path / "work", pin=True) as d:
        harness.own(d.owner)
        yield d


async def member_states(d: DemoDeployment) -> dict[str, str]:
    async with etcd.client(d.etcd_url) as client:
        read = await read_mesh(client, d.keys)
    [cluster] = status_report(read)["clusters"]
    return {m["name"]: m["state"] for m in cluster["members"]}


async def report(d: DemoDeployment, member: str, method: str, body: Any = None) -> int:
    async with aiohttp.ClientSession() as http, http.request(
            method, f"{d.member(member).sidecar_url}/v1/problems/db", json=body) as resp:
        await resp.read()
        return resp.status


async def readyz(d: DemoDeployment, member: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, \
            http.get(f"{d.member(member).sidecar_url}/readyz") as resp:
        return resp.status, await resp.json()


async def test_every_member_with_a_problem_keeps_the_best_one_serving(
        pinned: DemoDeployment) -> None:
    d = pinned
    browser = Browser(f"{d.url}/counter")
    sessions = [f"s{i}" for i in range(24)]
    placed = await browser.visit(sessions, method="POST")
    assert set(placed.values()) == {"a"}, placed  # high availability: a is active

    for m in ("a", "b", "c"):
        assert await report(d, m, "PUT", {"detail": "connection refused"}) == 201

    async def attention() -> bool:
        return await member_states(d) == {"a": "active-attention", "b": "problem",
                                          "c": "problem"}

    await wait_until(attention, timeout=10, what="a active with problems, b and c withdrawn")
    await wait_until(lambda: envoy_only(d, "a"), timeout=10, what="Envoy sends only to a")
    # Every request is served, pinned sessions and new ones alike (it was 503 for all).
    assert not moved(placed, await browser.visit(sessions, method="POST"))
    fresh = await browser.visit([f"new{i}" for i in range(12)], method="POST")
    assert set(fresh.values()) == {"a"}

    # a's health check passes in spite of its problem (else Envoy would withdraw it
    # all the same); the others fail theirs.
    status, body = await readyz(d, "a")
    assert status == 200 and any("active with problems" in w for w in body["warnings"]), body
    status, body = await readyz(d, "b")
    assert status == 503 and "problems reported: db" in body["reasons"], body
    metrics = await scrape(f"{d.replicas[0].admin_url}/metrics")
    assert metrics[f'meshxl_xds_members{{cluster="{CLUSTER}",state="active-attention"}}'] == 1
    code, out, err = await meshxl("status", "--etcd", d.etcd_url, "--etcd-prefix", d.keys.root)
    assert code == 0 and "active-attention (db)" in out, out + err

    # A member recovers: it serves, and a (still reporting) is withdrawn.
    assert await report(d, "b", "DELETE") == 204
    await wait_until(lambda: envoy_only(d, "b"), timeout=10, what="Envoy sends only to b")
    states = await member_states(d)
    assert states["a"] == "problem" and states["b"] in ("ready", "returning"), states
    after = await browser.visit(sessions, method="POST")
    assert set(after.values()) == {"b"}, after

    # The model's warnings judge the registered members (the model lists none): a
    # Maglev table too small for the three of them.
    text = demo_model(d.mode, d.listen_port, [(m.name, m.site) for m in d.members], pin=True)
    async with etcd.client(d.etcd_url) as client:
        await apply_model(client, d.keys, text.replace(
            "algorithm: maglev,", "algorithm: maglev, maglev_table_size: 211,"), "test")
    admin = d.replicas[0].admin_url

    async def warned() -> list[str]:
        async with aiohttp.ClientSession() as http, http.get(f"{admin}/v1/status") as resp:
            return list((await resp.json())["model_warnings"])

    [warning] = await wait_until(warned, timeout=10, what="the model warning")
    assert "211 entries for 3 registered members" in warning, warning
    metrics = await scrape(f"{admin}/metrics")
    assert metrics[f'meshxl_xds_model_warnings{{cluster="{CLUSTER}"}}'] == 1
    code, out, _ = await meshxl("status", "--etcd", d.etcd_url, "--etcd-prefix", d.keys.root,
                                "-o", "json")
    assert code == 0 and any("211 entries" in w for w in json.loads(out)["warnings"]), out


async def envoy_only(d: DemoDeployment, member: str) -> bool:
    hosts = await envoy_hosts(d.admin_url)
    return [h.hostname for h in hosts if h.healthy] == [member]


# -- problems with a TTL, across a restart ------------------------------------------------


async def test_a_problem_with_a_ttl_ends_unless_renewed_and_outlives_a_restart(
        etcd: Any, etcd_client: Any, start_sidecar: Any) -> None:
    from meshxl.local.ports import free_ports

    (app_port,) = free_ports(1)
    sidecar = await start_sidecar(cluster="web", member="m1", etcd=etcd.url, app_port=app_port)
    keys = Keys()
    member_key = keys.member("web", "m1").encode()

    async def problems() -> set[str]:
        return set((await sidecar.request("GET", "/v1/problems")).json()["problems"])

    async def registered() -> list[str]:
        got = await etcd_client.get(member_key)
        return list(json.loads(got.value)["problems"]) if got is not None else []

    # Bad TTLs are a 400 naming the field.
    for ttl in ("soon", 0.2, -1, "2d"):
        bad = await put_problem(sidecar, "db", {"ttl": ttl})
        assert bad.status == 400 and bad.json()["field"] == "ttl", (ttl, bad.json())

    # The TTL scales with the heartbeats' windows: a slow machine's half a TTL between
    # heartbeats must stay half of it.
    ttl = scaled(1.0)
    ok = await put_problem(sidecar, "flaky", {"ttl": f"{ttl:g}s"})
    assert ok.status == 201 and ok.json()["ttl"] == ttl
    assert (await put_problem(sidecar, "db", {"detail": "down", "ttl": 60})).status == 201
    assert (await sidecar.request("PUT", "/v1/problems/disk")).status == 201
    # Heartbeats keep it: two TTLs' worth of renewals at half the TTL.
    for _ in range(4):
        await window(0.5, "half the TTL between heartbeats")
        assert (await put_problem(sidecar, "flaky", {"ttl": f"{ttl:g}s"})).status == 200
        assert "flaky" in await problems()
    # Without them it ends, in the registration too.
    await wait_until(lambda: _without(problems, "flaky"), timeout=5, what="flaky expired")
    await wait_until(lambda: _without(registered, "flaky"), timeout=5,
                     what="flaky gone from the registration")
    assert await registered() == ["db", "disk"]

    # A restart (kill -9): the problem with a TTL is back before the member registers
    # (every registration written after the restart carries it); the other is gone.
    watch = await etcd_client.watch(member_key)
    await sidecar.restart(wait_ready=False)
    await sidecar.wait_listening()
    writes: list[list[str]] = []

    async def collect() -> None:
        async for event in watch:
            if event.kind == "PUT":
                writes.append(json.loads(event.kv.value)["problems"])

    collector = asyncio.create_task(collect())
    try:
        await wait_until(lambda: _has(registered, ["db"]), timeout=10,
                         what="db restored in the new registration")
        await window(0.3, "no other registration write follows")
    finally:
        collector.cancel()
        await watch.cancel()
    assert writes and all(w == ["db"] for w in writes), writes
    assert await problems() == {"db"}
    detail = (await sidecar.request("GET", "/v1/problems")).json()["problems"]["db"]
    assert detail["detail"] == "down" and detail["ttl"] == 60
    # Cleared: its record in etcd goes too (a later restart restores nothing).
    assert (await sidecar.request("DELETE", "/v1/problems/db")).status == 204
    assert not list(await etcd_client.get_prefix(
        keys.problems_prefix("web", "m1").encode()))


async def put_problem(sidecar: Any, name: str, body: dict[str, Any]) -> Any:
    return await sidecar.request("PUT", f"/v1/problems/{name}", data=json.dumps(body),
                                 headers={"Content-Type": "application/json"})


async def _without(read: Any, name: str) -> bool:
    return name not in await read()


async def _has(read: Any, expected: list[str]) -> bool:
    return bool(await read() == expected)
