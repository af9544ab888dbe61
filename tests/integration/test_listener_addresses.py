"""Listener addresses on one port, with a real Envoy: listeners that cannot meet (two
loopback addresses, IPv4 and IPv6 loopback) pass ``meshxl validate``, are accepted by
Envoy, and each address's clients reach its own cluster, whatever the protocols; the
reported overlap (a TCP listener on ``0.0.0.0:P`` beside an HTTP one on
``127.0.0.1:P``, which Envoy accepts and splits the loopback clients between) is
refused by ``meshxl validate`` in one line naming both listeners and the port."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from meshxl.local.ports import free_port
from tests.harness import Backend
from tests.harness.cli import meshxl

pytestmark = pytest.mark.integration

REQUESTS = 8


def cluster(name: str, backend: Backend, address: str, port: int,
            protocol: str = "http") -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name, "protocol": protocol,
        "members": [{"name": "m", "address": "127.0.0.1", "port": backend.port}],
        "health_check": {"enabled": False},
        "listener": {"address": address, "port": port}}
    if protocol == "tcp":
        spec["stickiness"] = {"source_ip": True}
    return spec


async def served_by(url: str) -> set[str]:
    """The backends that answered REQUESTS requests, each on a new connection."""
    seen = set()
    for _ in range(REQUESTS):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http, \
                http.get(url, headers={"Connection": "close"}) as answer:
            assert answer.status == 200, await answer.text()
            seen.add(answer.headers["x-meshxl-member"])
    return seen


async def test_disjoint_listeners_on_one_port_each_reach_their_own_cluster(
        tmp_path: Path, start_control_plane: Any, start_envoy: Any,
        start_backends: Any) -> None:
    tcp, web, six = await start_backends(["tcp", "web", "six"])
    port = free_port()
    model = {"clusters": [cluster("plain", tcp, "127.0.0.2", port, protocol="tcp"),
                          cluster("web", web, "127.0.0.1", port),
                          cluster("six", six, "::1", port)]}
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(model, sort_keys=False))
    code, out, err = await meshxl("validate", str(path))
    assert code == 0, out + err

    plane = await start_control_plane(config_path=path)
    envoy = await start_envoy("edge", plane.port)
    await envoy.wait_ready()

    async def listening() -> bool:
        return len(await envoy.listeners()) == 3

    await envoy.wait_until(listening, timeout=15.0, what="Envoy's three listeners")
    assert await served_by(f"http://127.0.0.2:{port}/") == {tcp.name}
    assert await served_by(f"http://127.0.0.1:{port}/") == {web.name}
    assert await served_by(f"http://[::1]:{port}/") == {six.name}
    status = plane.ads.node_status()["edge"]
    assert status["nacks"] == 0


async def test_the_reported_overlap_is_refused_naming_both_listeners(
        tmp_path: Path, start_backends: Any) -> None:
    tcp, web = await start_backends(["tcp", "web"])
    port = free_port()
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump({"clusters": [
        cluster("plain", tcp, "0.0.0.0", port, protocol="tcp"),
        cluster("web", web, "127.0.0.1", port)]}, sort_keys=False))
    async with asyncio.timeout(30):
        code, out, err = await meshxl("validate", str(path))
    assert code == 1, out + err
    lines = [line for line in err.splitlines() if "overlaps" in line]
    assert len(lines) == 1, err
    for word in (f"127.0.0.1:{port}", f"0.0.0.0:{port}", "'web'", "'plain'", f"port {port}"):
        assert word in lines[0], (word, lines[0])
