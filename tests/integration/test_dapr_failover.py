"""Both Dapr SDKs through Envoy while the active member dies (kill -9), with 0
acknowledged saves lost: the JavaScript SDK over HTTP and the Python SDK over gRPC, each
against a high-availability cluster whose members' application port *is* their
sidecar's Dapr port (a Dapr application that only keeps state: the SDK is the client),
on real etcd, a real control plane and a real Envoy. After the kill, every save the
SDK was told succeeded reads back through Envoy from the new owner. Plus the fence: a
former owner's save, after another member wrote the key, fails with Dapr's ETag
mismatch."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshxl.etcd.keys import Keys
from meshxl.local.ports import free_port, free_ports
from meshxl.local.procs import Owner
from meshxl.local.wait import wait_until
from meshxl.operator.actions import apply_model
from tests.harness import EtcdServer
from tests.harness.sidecar import SidecarProcess

pytestmark = pytest.mark.integration

JS = Path(__file__).parent / "dapr_js"
HOST = "127.0.0.1"
STORE = "statestore"


def ha_cluster(name: str, port: int, protocol: str) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name, "mode": "high-availability", "membership": "registered",
        "stickiness": {"algorithm": "maglev", "header": "x-session-id"},
        "sites": [{"name": "dc1"}], "listener": {"address": HOST, "port": port}}
    if protocol == "grpc":
        cluster["protocol"] = "grpc"  # Envoy checks grpc.health.v1, served beside Dapr's
    else:
        cluster["health_check"] = {"path": "/v1.0/metadata"}
    return cluster


async def dapr_members(start_sidecar: Any, etcd: EtcdServer, cluster: str,
                       protocol: str) -> list[tuple[SidecarProcess, int, int]]:
    """Members a (the active: first by name) and b, each registering its Dapr port
    (HTTP or gRPC) as its application's address."""
    members = []
    for name in ("a", "b"):
        http_port, grpc_port = free_ports(2)
        app = http_port if protocol == "http" else grpc_port
        sidecar = await start_sidecar(cluster=cluster, member=name, etcd=etcd.url,
                                      app_port=app, site="dc1", lease_ttl=2.0, dapr="on",
                                      dapr_http_port=http_port, dapr_grpc_port=grpc_port)
        members.append((sidecar, http_port, grpc_port))
    return members


async def envoy_with(etcd: EtcdServer, etcd_client: Any, start_control_plane: Any,
                     start_envoy: Any, clusters: list[dict[str, Any]]) -> Any:
    await apply_model(etcd_client, Keys(), yaml.safe_dump({"clusters": clusters}), "test")
    plane = await start_control_plane(etcd=etcd.url)
    envoy = await start_envoy("edge", plane.port)
    await envoy.wait_ready()
    for cluster in clusters:
        await envoy.wait_hosts(cluster["name"], lambda hs: len(hs) == 2 and all(
            h.healthy for h in hs), timeout=30, what=f"{cluster['name']}: both members healthy")
    return envoy


async def test_js_sdk_over_http_loses_no_acknowledged_save_in_a_kill_9(
        etcd: EtcdServer, etcd_client: Any, start_sidecar: Any, start_control_plane: Any,
        start_envoy: Any, harness: Owner, tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None or not (JS / "node_modules" / "@dapr" / "dapr").is_dir():
        pytest.fail("Dapr's JavaScript SDK is not installed: run `make setup`")
    listener = free_port()
    members = await dapr_members(start_sidecar, etcd, "dapr-http", "http")
    await envoy_with(etcd, etcd_client, start_control_plane, start_envoy,
                     [ha_cluster("dapr-http", listener, "http")])
    progress, killed = tmp_path / "progress", tmp_path / "killed"
    driver = harness.process("dapr-js-failover", [node, str(JS / "failover.mjs")], cwd=JS,
                             env={**os.environ, "DAPR_HOST": HOST,
                                  "DAPR_HTTP_PORT": str(listener), "PROGRESS": str(progress),
                                  "KILLED": str(killed), "SAVES": "400",
                                  "SAVES_AFTER_KILL": "80"})
    driver.start()

    def acked() -> int:
        text = progress.read_text() if progress.exists() else ""
        return int(text) if text.strip() else 0

    await wait_until(lambda: acked() >= 80, timeout=60, what="80 saves acknowledged",
                     process=driver)
    await members[0][0].kill9()  # the active member: its sidecar is its Dapr API
    killed.write_text("1")
    assert await driver.wait_exit(timeout=120) == 0, driver.log_path.read_text()[-3000:]
    [line] = [ln for ln in driver.log_path.read_text().splitlines() if ln.startswith("RESULT ")]
    result = json.loads(line[len("RESULT "):])
    assert result["killedAt"] is not None and result["acked"] >= result["killedAt"] + 80
    assert result["missing"] == []  # every acknowledged save, read through the new owner


async def test_python_sdk_over_grpc_loses_no_acknowledged_save_in_a_kill_9(
        etcd: EtcdServer, etcd_client: Any, start_sidecar: Any, start_control_plane: Any,
        start_envoy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    dapr_clients = pytest.importorskip("dapr.clients")
    grpc_listener, http_listener = free_ports(2)
    await dapr_members(start_sidecar, etcd, "dapr-http", "http")
    members = await dapr_members(start_sidecar, etcd, "dapr-grpc", "grpc")
    await envoy_with(etcd, etcd_client, start_control_plane, start_envoy,
                     [ha_cluster("dapr-http", http_listener, "http"),
                      ha_cluster("dapr-grpc", grpc_listener, "grpc")])
    # The SDK waits for its sidecar's HTTP health first (here: through Envoy too).
    monkeypatch.setenv("DAPR_HTTP_PORT", str(http_listener))
    monkeypatch.setenv("DAPR_HEALTH_TIMEOUT", "30")
    client = await asyncio.to_thread(dapr_clients.DaprClient, f"{HOST}:{grpc_listener}")
    acked: list[int] = []
    failed: list[int] = []
    stop = threading.Event()
    killed_at: list[int] = []

    def save_loop() -> None:
        for i in range(600):
            if stop.is_set():
                return
            try:
                client.save_state(STORE, f"fo-{i}", json.dumps({"seq": i}))
            except Exception:  # noqa: BLE001 - not acknowledged: it may or may not stand
                failed.append(i)
            else:
                acked.append(i)
            if killed_at and len(acked) >= killed_at[0] + 80:
                return

    saving = asyncio.create_task(asyncio.to_thread(save_loop))
    try:
        await wait_until(lambda: len(acked) >= 80, timeout=60, what="80 saves acknowledged")
        await members[0][0].kill9()
        killed_at.append(len(acked))
        async with asyncio.timeout(120):
            await asyncio.shield(saving)
    finally:
        stop.set()
        await saving
    assert len(acked) >= killed_at[0] + 80, (len(acked), len(failed))
    missing = []
    for start in range(0, len(acked), 50):
        keys = [f"fo-{i}" for i in acked[start:start + 50]]
        got = await asyncio.to_thread(client.get_bulk_state, STORE, keys)
        for i, item in zip(acked[start:start + 50], got.items, strict=True):
            if not item.data or json.loads(item.data) != {"seq": i}:
                missing.append((i, item.data))
    await asyncio.to_thread(client.close)
    assert missing == []


async def test_a_fenced_former_owners_save_is_an_etag_mismatch(
        etcd: EtcdServer, start_sidecar: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Member a writes a key, member b takes it over (writes it); a's next save without
    an ETag is fenced: the SDK sees Dapr's ETag mismatch (ABORTED), and nothing of it
    lands. A read first (the state b wrote) lets a write again: the key moving back."""
    dapr_clients = pytest.importorskip("dapr.clients")
    grpc = pytest.importorskip("grpc")
    members = await dapr_members(start_sidecar, etcd, "fenced", "grpc")
    monkeypatch.setenv("DAPR_HTTP_PORT", str(members[0][1]))
    a, b = [await asyncio.to_thread(dapr_clients.DaprClient, f"{HOST}:{m[2]}")
            for m in members]
    try:
        await asyncio.to_thread(a.save_state, STORE, "cart", b"from a")
        await asyncio.to_thread(b.save_state, STORE, "cart", b"from b")
        with pytest.raises(grpc.RpcError) as fenced:
            await asyncio.to_thread(a.save_state, STORE, "cart", b"a again")
        assert fenced.value.code() == grpc.StatusCode.ABORTED
        assert "etag mismatch" in fenced.value.details()
        assert (await asyncio.to_thread(b.get_state, STORE, "cart")).data == b"from b"
        assert (await asyncio.to_thread(a.get_state, STORE, "cart")).data == b"from b"
        await asyncio.to_thread(a.save_state, STORE, "cart", b"a, after reading")
        assert (await asyncio.to_thread(b.get_state, STORE, "cart")).data == \
            b"a, after reading"
    finally:
        for client in (a, b):
            await asyncio.to_thread(client.close)
