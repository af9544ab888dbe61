"""Who may steer a judgement (meshxl.xds.accesslog): an admitted node counts only for
the clusters it routes to (the endpoints it subscribes to over ADS) and for their
members' hosts. A real ``meshxl serve xds`` on a real etcd; gRPC clients speak Envoy's
ADS and access log protocols: two honest Envoys of ``web`` and ``pay``, an intruder
(another namespace's sidecar, admitted, subscribed to ``api`` only) that reports a
healthy load-sharing member slow, floods a really slow member with fast answers, and
reports the high-availability active slow, and a liar that does route to ``web`` and
floods it the same way. Only the honest view counts: the intruder's entries count
nowhere, the liar's as one node's view among three."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aetcd
import aiohttp
import pytest

from meshxl.etcd.keys import Keys
from meshxl.local.ports import free_ports
from meshxl.local.wait import wait_until
from meshxl.operator.actions import apply_model
from tests.harness.als import AlsFeed, subscribe
from tests.harness.controlplane import ControlPlaneProcess

pytestmark = [pytest.mark.integration, pytest.mark.heavy]

KEYS = Keys()
LOOPBACK = "127.0.0.1"
FAST, SLOW = 0.005, 0.1
INTRUDER = "sidecar~10.0.0.9~x.other~other.svc.cluster.local"
"""An Istio sidecar of another namespace (admitted: no authentication here; with mutual
TLS its certificate names its namespace, which binds nothing of web's)."""


def model(web: list[int], pay: list[int], api: list[int]) -> str:
    out = "clusters:"
    for name, mode, ports in (("web", "load-sharing", web), ("pay", "high-availability", pay),
                              ("api", "load-sharing", api)):
        members = "".join(f"\n  - {{name: {name[0]}{i}, address: {LOOPBACK}, port: {p}}}"
                          for i, p in enumerate(ports))
        out += f"""
- name: {name}
  mode: {mode}
  degradation: {{detect: 1s, recover: 30s, min_requests: 10}}
  members:{members}"""
    return out + "\n"


async def records(client: aetcd.Client, cluster: str) -> dict[str, str]:
    got = await client.get_prefix(KEYS.health_prefix(cluster).encode())
    return {kv.key.decode().rsplit("/", 1)[1]: json.loads(kv.value)["kind"] for kv in got.kvs}


async def test_a_node_reports_only_on_what_it_routes_to(
        harness: Any, etcd: Any, etcd_client: aetcd.Client) -> None:
    web, pay, api = free_ports(3), free_ports(2), free_ports(2)
    await apply_model(etcd_client, KEYS, model(web, pay, api), "test")
    plane = await ControlPlaneProcess(harness, name="xds-0", etcd=etcd.url).start()

    def host(port: int) -> str:
        return f"{LOOPBACK}:{port}"

    async with subscribe(plane.address, "edge-1", ["web", "pay"]), \
            subscribe(plane.address, "edge-2", ["web", "pay"]), \
            subscribe(plane.address, "liar", ["web"]), \
            subscribe(plane.address, INTRUDER, ["api"]):
        # The honest Envoys: w0, w1 fast, w2 really slow; pay's active p0 fast.
        honest, honest_2 = (AlsFeed(plane.address, node, {
            ("web", host(web[0])): FAST, ("web", host(web[1])): FAST,
            ("web", host(web[2])): SLOW, ("pay", host(pay[0])): FAST}, seconds=10.0)
            for node in ("edge-1", "edge-2"))
        # A client of web that lies: w0 slow, w2 fast, ten times as often as the others.
        liar = AlsFeed(plane.address, "liar", {
            ("web", host(web[0])): SLOW, ("web", host(web[2])): FAST}, per_host=50,
            seconds=10.0)
        # The intruder: w1 slow, w2 fast ten times as often, p0 slow, and a host no
        # member has.
        intruder = AlsFeed(plane.address, INTRUDER, {
            ("web", host(web[1])): SLOW, ("web", host(web[2])): FAST,
            ("pay", host(pay[0])): SLOW, ("web", "127.0.0.1:1"): SLOW}, per_host=50,
            seconds=10.0)
        started = time.monotonic()
        feeds = (honest, honest_2, liar, intruder)
        for f in feeds:
            f.start()
        try:
            async def judged() -> dict[str, str]:
                return await records(etcd_client, "web")

            found = await wait_until(judged, timeout=8, interval=0.1,
                                     what="a member of web judged")
            took = time.monotonic() - started
            assert found == {"w2": "degraded"}, found
            # Two more seconds of both streams: nothing else is judged, pay's active
            # is not probed.
            until = time.monotonic() + 2.0
            while time.monotonic() < until:
                assert await records(etcd_client, "web") == {"w2": "degraded"}
                assert await records(etcd_client, "pay") == {}
                await asyncio.sleep(0.1)
            status = await plane.status()
            seen = status["upstream"]["web"]
            assert set(seen) == {host(p) for p in web}, seen  # not the intruder's host
            assert seen[host(web[1])]["p90"] < SLOW / 2  # only the honest views
            assert seen[host(web[0])]["p90"] < SLOW / 2  # the liar is one voice of three
            async with aiohttp.ClientSession() as http, http.get(
                    f"http://{LOOPBACK}:{plane.admin_port}/metrics") as resp:
                metrics = await resp.text()
            unrouted = next(float(line.split()[-1]) for line in metrics.splitlines()
                            if line.startswith("meshxl_xds_access_log_entries_total")
                            and 'result="unrouted"' in line)
            assert unrouted >= intruder.sent * 4 * 50 * 0.9, (unrouted, intruder.sent)
            print(f"\nw2 judged {took:.1f} s after the logs began; the intruder's entries "
                  "counted nowhere, the liar's as one view of three")
            assert all(f.error is None for f in feeds), [f.error for f in feeds]
        finally:
            for f in feeds:
                await f.stop()
