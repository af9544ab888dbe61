"""The sick-member signal end to end: a real Envoy streams its access log to the real
control plane, which sees, per upstream host, a slower member's latency and a failing
member's errors (meshxl.xds.accesslog, meshxl.xds.upstream)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from meshxl.local.ports import free_ports
from meshxl.local.wait import wait_until
from meshxl.xds.upstream import HostSample
from tests.harness.clock import scaled

pytestmark = [pytest.mark.integration, pytest.mark.heavy]

LOOPBACK = "127.0.0.1"
SLOWER = 0.050  # seconds the slow member adds to every answer
REQUESTS = 300
TOKEN = "0123456789abcdef0123456789abcdef"


class Member:
    """A tiny HTTP/1.1 member on loopback: answers 200 after ``delay``, or 503 to every
    ``fail_every``-th request (health checks, on /healthz, always pass)."""

    def __init__(self, delay: float = 0.0, fail_every: int = 0) -> None:
        self.delay = delay
        self.fail_every = fail_every
        self.served = 0
        self.failed = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Member:
        self.server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                status = b"200 OK"
                if not path.startswith(b"/healthz"):
                    self.served += 1
                    if self.fail_every and self.served % self.fail_every == 0:
                        status = b"503 Service Unavailable"
                        self.failed += 1
                    elif self.delay:
                        await asyncio.sleep(self.delay)
                writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


class TcpMember:
    """A TCP member that echoes a line and closes."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> TcpMember:
        self.server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            if line:  # a health check connects and closes: not a connection of a client
                self.connections += 1
                writer.write(line)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


def model(members: dict[str, Member], tcp: list[TcpMember], ports: list[int]
          ) -> dict[str, Any]:
    return {"clusters": [{
        "name": "web", "mode": "load-sharing",
        "members": [{"name": n, "address": LOOPBACK, "port": m.port}
                    for n, m in members.items()],
        "outlier_detection": {"enabled": False},  # the sick members stay in, as they would
        "listener": {"address": LOOPBACK, "port": ports[0]},
    }, {
        "name": "db", "mode": "load-sharing", "protocol": "tcp",
        "members": [{"name": f"t{i}", "address": LOOPBACK, "port": m.port}
                    for i, m in enumerate(tcp)],
        "listener": {"address": LOOPBACK, "port": ports[1]},
    }]}


async def tcp_connections(port: int, count: int) -> None:
    for i in range(count):
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(f"hello {i}\n".encode())
        async with asyncio.timeout(5):
            assert await reader.readline() == f"hello {i}\n".encode()
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("token", [None, TOKEN], ids=["open", "token"])
async def test_a_slow_and_a_failing_member_are_seen_per_host(
        tmp_path: Path, start_control_plane: Any, start_envoy: Any, token: str | None) -> None:
    """With a token on the ADS port, Envoy's log streams carry none: they are admitted
    because the node's ADS stream comes from the same address (meshxl.xds.accesslog)."""
    members = {"fast": await Member().start(), "slow": await Member(delay=SLOWER).start(),
               "failing": await Member(fail_every=5).start()}
    tcp = [await TcpMember().start(), await TcpMember().start()]
    try:
        port, tcp_port = free_ports(2)
        path = tmp_path / "model.yaml"
        path.write_text(yaml.safe_dump(model(members, tcp, [port, tcp_port]),
                                       sort_keys=False))
        auth: dict[str, Any] = {} if token is None else {"token": token}
        plane = await start_control_plane(config_path=path, admin=f"{LOOPBACK}:0", **auth)
        envoy = await start_envoy("edge", plane.port,
                                  **({} if token is None else {"xds_token": token}))
        await envoy.wait_ready()
        await envoy.wait_hosts("web", lambda hs: len(hs) == 3 and all(h.healthy for h in hs),
                               timeout=20, what="three healthy members")
        await envoy.wait_hosts("db", lambda hs: len(hs) == 2 and all(h.healthy for h in hs),
                               timeout=20, what="two healthy TCP members")
        started = time.time()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async def one(i: int) -> int:
                async with http.get(f"http://{LOOPBACK}:{port}/r/{i}") as resp:
                    await resp.read()
                    return resp.status

            statuses = []
            for k in range(0, REQUESTS, 20):  # 20 at a time: bounded concurrency
                statuses += await asyncio.gather(*(one(i) for i in range(k, k + 20)))
        host = {n: f"{LOOPBACK}:{m.port}" for n, m in members.items()}
        assert members["failing"].failed > 0

        # Soon after the last answer the control plane has every attempt per host: what
        # the members served (the wait is for the count asserted below, not one less).
        summary: dict[str, HostSample] = {}
        served = sum(m.served for m in members.values())
        deadline = time.monotonic() + scaled(10.0)  # every request reported (a deadline)
        while time.monotonic() < deadline:
            summary = plane.upstream.summary("web", started - 1.0, time.time())
            if sum(s.requests for s in summary.values()) >= served:
                break
            await asyncio.sleep(0.1)
        assert set(summary) == set(host.values()), summary
        fast, slow, failing = (summary[host[n]] for n in ("fast", "slow", "failing"))
        # Every upstream attempt is a request of its host, retried ones included.
        assert fast.requests + slow.requests + failing.requests == served
        assert failing.errors == members["failing"].failed
        assert fast.errors == slow.errors == 0
        assert slow.p90 is not None and fast.p90 is not None
        assert slow.p90 >= fast.p90 + 0.040, (slow, fast)

        # The same through the admin port's /v1/status.
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://{LOOPBACK}:{plane.admin_port}/v1/status") as resp:
            status = await resp.json()
        shown = status["upstream"]["web"]
        assert shown[host["failing"]]["errors"] == failing.errors
        assert shown[host["slow"]]["p90"] >= shown[host["fast"]]["p90"] + 0.040
        sample = plane.metrics.registry.get_sample_value
        recorded = sample("meshxl_xds_access_log_entries_total", {"result": "recorded"})
        assert recorded is not None and recorded >= REQUESTS
        assert sample("meshxl_xds_access_log_entries_total", {"result": "refused"}) == 0
        # Envoy's clients saw the failing member's answers retried on another member.
        assert statuses.count(200) == REQUESTS

        # TCP: one request per connection, at its member, without a latency.
        since = time.time()
        await tcp_connections(tcp_port, 20)
        tcp_hosts = {f"{LOOPBACK}:{m.port}": m for m in tcp}
        seen: dict[str, HostSample] = {}

        def reported() -> bool:
            nonlocal seen
            seen = plane.upstream.summary("db", since - 1.0, time.time())
            return sum(s.requests for s in seen.values()) >= 20

        await wait_until(reported, timeout=10, interval=0.1, what="20 TCP requests reported")
        assert set(seen) <= set(tcp_hosts) and sum(s.requests for s in seen.values()) == 20
        for host_name, sample in seen.items():
            assert sample == HostSample(tcp_hosts[host_name].connections, 0, None, None, None)
    finally:
        for m in members.values():
            await m.stop()
        for t in tcp:
            await t.stop()
