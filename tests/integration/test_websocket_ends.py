"""WebSocket ends and kill -9 through the real Envoy, with only the control plane and
one Envoy in front of two echo members (a active, b standby): seconds, not a deployment.

Envoy's router counts the end of every WebSocket whose member closes first (as RFC 6455
asks of a server, a graceful close included) as a local-origin failure of the member
(envoyproxy/envoy#24690). Such an end must neither eject the member nor, through the
ejection and ``close_connections_on_host_health_failure``, close its other WebSockets.
And after a kill -9 a reconnect must reach the standby on its first dial, without
waiting for a health check or an ejection (docs/model.md, "WebSocket"). Plain requests
keep one-failure ejection all the same: WebSockets go to the cluster's upgrades twin
(:mod:`meshxl.xds.upgrades`), requests to the cluster itself.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from typing import Any

import aiohttp
import pytest
import yaml

from meshxl import headers as hdr
from meshxl.local.ports import free_ports
from meshxl.xds.upgrades import upgrade_cluster
from tests.harness import Backend, EnvoyFixture

pytestmark = pytest.mark.integration


LOOPBACK = "127.0.0.1"
CHAT = "chat"
CHAT_WS = upgrade_cluster(CHAT)


async def _active_and_standby(tmp_path: Any, start_control_plane: Any, start_envoy: Any,
                              start_backends: Any) -> tuple[Backend, Backend, EnvoyFixture,
                                                            str]:
    """Members a (active) and b (standby) of a high-availability WebSocket cluster with
    meshxl's defaults, except health checks slow enough (3 s) that nothing in a test's
    window comes from them."""
    a, b = await start_backends(["a", "b"])
    (port,) = free_ports(1)
    model = {"clusters": [{
        "name": CHAT, "mode": "high-availability",
        "members": [{"name": x.name, "address": LOOPBACK, "port": x.port} for x in (a, b)],
        "listener": {"address": LOOPBACK, "port": port},
        "stickiness": {"header": hdr.SESSION},
        "health_check": {"interval": "3s", "no_traffic_interval": "3s",
                         "unhealthy_interval": "3s"},
    }]}
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(model, sort_keys=False))
    plane = await start_control_plane(config_path=path)
    envoy = await start_envoy("edge", plane.port)
    await envoy.wait_ready()
    for cluster in (CHAT, CHAT_WS):
        await envoy.wait_hosts(cluster, lambda hs: len(hs) == 2 and all(h.healthy for h in hs),
                               timeout=20, what=f"both members healthy in {cluster}")
    return a, b, envoy, f"http://{LOOPBACK}:{port}/ws"


async def _open(http: aiohttp.ClientSession, url: str, session: str,
                ) -> tuple[aiohttp.ClientWebSocketResponse, str]:
    ws = await http.ws_connect(url, headers={hdr.SESSION: session})
    await ws.send_str("who")
    return ws, (await ws.receive_json(timeout=5))["member"]


async def _end_as_rfc_client(url: str, session: str, member: str) -> None:
    """Open a WebSocket, check its member, then close it as RFC 6455 (7.1.1) asks of a
    client: send the close frame and wait for the server to close the TCP connection
    first. (aiohttp's client closes its side at once, racing the member.)"""
    host, _, rest = url.removeprefix("http://").partition(":")
    port, _, path = rest.partition("/")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      f"Sec-WebSocket-Version: 13\r\n{hdr.SESSION}: {session}\r\n\r\n"
                      ).encode())
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        assert f"{hdr.MEMBER}: {member}".lower().encode() in head.lower(), head
        mask = os.urandom(4)
        payload = (1000).to_bytes(2, "big")  # normal closure
        writer.write(bytes([0x88, 0x80 | len(payload)]) + mask
                     + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        await writer.drain()
        async with asyncio.timeout(5):
            rest_of_it = await reader.read()  # until the member closes
        assert rest_of_it[:1] == b"\x88", rest_of_it  # its close frame, then EOF
    finally:
        writer.close()


async def test_a_websocket_that_ends_leaves_its_member_and_its_other_websockets(
        tmp_path: Any, start_control_plane: Any, start_envoy: Any, start_backends: Any,
) -> None:
    a, _, envoy, url = await _active_and_standby(tmp_path, start_control_plane,
                                                 start_envoy, start_backends)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        staying, on = await _open(http, url, "staying")
        assert on == a.name
        for i in range(3):
            await _end_as_rfc_client(url, f"leaving-{i}", a.name)
        # Envoy counted each end as a failure of the member ...
        await envoy.wait_until(
            lambda: envoy.stat(f"cluster.{CHAT_WS}.outlier_detection."
                               "ejections_detected_consecutive_local_origin_failure"),
            timeout=5, what="Envoy to count a WebSocket's end as a local-origin failure")
        # ... and keeps it: no ejection, its other WebSocket open, new ones placed on it.
        for cluster in (CHAT, CHAT_WS):
            assert await envoy.stat(
                f"cluster.{cluster}.outlier_detection.ejections_enforced_total") == 0
        await staying.send_str("still there?")
        assert (await staying.receive_json(timeout=5))["member"] == a.name
        fresh, on = await _open(http, url, "fresh")
        assert on == a.name
        await fresh.close()
        await staying.close()


async def test_after_kill_9_a_reconnect_reaches_the_standby_on_its_first_dial(
        tmp_path: Any, start_control_plane: Any, start_envoy: Any, start_backends: Any,
) -> None:
    """Each reconnect meets the dead member once (refused) and its retry goes to the
    next tier: nothing waits for a health check or an ejection."""
    a, b, envoy, url = await _active_and_standby(tmp_path, start_control_plane,
                                                 start_envoy, start_backends)
    sessions = [f"s{i}" for i in range(8)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        opened = [await _open(http, url, s) for s in sessions]
        assert {on for _, on in opened} == {a.name}
        await a.kill9()
        for ws, _ in opened:
            message = await ws.receive(timeout=5)
            assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                    aiohttp.WSMsgType.ERROR), message
        started = time.monotonic()
        again = await asyncio.gather(*(_open(http, url, s) for s in sessions))
        took = time.monotonic() - started
        assert {on for _, on in again} == {b.name}
        for ws, _ in again:
            await ws.close()
    # Every reconnect met the dead member (Envoy still held it healthy) and was retried
    # on the standby, well inside the health check's 3 s.
    print(f"reconnected in {took:.2f} s")  # the connect failures above prove the retry
    assert await envoy.stat(f"cluster.{CHAT_WS}.upstream_cx_connect_fail") >= 1
    assert await envoy.stat(f"cluster.{CHAT_WS}.upstream_rq_retry") >= 1


async def test_websocket_ends_keep_their_member_and_a_dead_one_is_ejected_on_its_first_refusal(
        tmp_path: Any, start_control_plane: Any, start_envoy: Any, start_backends: Any,
) -> None:
    """Both at once on one cluster: WebSockets that end gracefully eject nothing, and a
    member killed -9 is ejected for plain requests by the first refused connect (as a
    hand-written Envoy with one-failure local-origin ejection does), not left to be
    retried until its health check fails (3 s here)."""
    a, b, envoy, url = await _active_and_standby(tmp_path, start_control_plane,
                                                 start_envoy, start_backends)
    plain = url.removesuffix("/ws") + "/hello"
    enforced = f"cluster.{CHAT}.outlier_detection.ejections_enforced_total"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        for i in range(3):
            await _end_as_rfc_client(url, f"leaving-{i}", a.name)
        await envoy.wait_until(
            lambda: envoy.stat(f"cluster.{CHAT_WS}.outlier_detection."
                               "ejections_detected_consecutive_local_origin_failure"),
            timeout=5, what="Envoy to count a WebSocket's end as a local-origin failure")
        async with http.get(plain, headers={hdr.SESSION: "s"}) as response:
            assert response.status == 200
            assert response.headers[hdr.MEMBER] == a.name
        assert await envoy.stat(enforced) == 0
        assert await envoy.stat(f"cluster.{CHAT_WS}.outlier_detection."
                                "ejections_enforced_total") == 0

        await a.kill9()
        started = time.monotonic()
        async with http.get(plain, headers={hdr.SESSION: "s"}) as response:
            assert response.status == 200
            assert response.headers[hdr.MEMBER] == b.name  # retried on the standby
        await envoy.wait_until(lambda: envoy.stat(enforced), timeout=2,
                               what="the dead member ejected after one refused connect")
        took = time.monotonic() - started
    assert await envoy.stat(f"cluster.{CHAT}.outlier_detection."
                            "ejections_enforced_consecutive_local_origin_failure") == 1
    assert await envoy.stat(f"cluster.{CHAT}.upstream_cx_connect_fail") == 1
    (dead,) = [h for h in await envoy.hosts(CHAT) if h.endpoint == f"{LOOPBACK}:{a.port}"]
    assert not dead.healthy
    print(f"ejected in {took:.2f} s")  # by outlier detection (the stat), not health check
