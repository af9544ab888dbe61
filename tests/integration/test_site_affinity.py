"""``site_affinity: local`` through two real Envoys, one per site (node locality zone).

The two Envoys run in two network namespaces (they share the model's listener port);
the echo members and the control plane listen on the test network's driver address.
Each site's Envoy sends new sessions to its own site's members, and to the other site's
only when none of its own is healthy; a session pinned at one site reaches the same
member through the other site's Envoy (the pin names the member, which every Envoy
knows, at a lower priority); an Envoy without a zone gets the global view.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from meshxl.local.ports import free_ports
from meshxl.local.procs import Owner
from meshxl.operator.views import EnvoyLive
from meshxl.xds.cache import Snapshot
from meshxl.xds.compiler import compile_resources
from meshxl.xds.types import ENDPOINT
from tests.harness import Backend
from tests.harness.ads import AdsHarness as Harness
from tests.harness.ads import names
from tests.harness.netns import Network, unavailable
from tests.unit.test_site_affinity import model

pytestmark = pytest.mark.integration

SESSION = "x-session-id"
PIN = "x-meshxl-pin"
SITE_OF = {"e1": "east", "e2": "east", "w1": "west", "w2": "west"}
SESSIONS = [f"s{i}" for i in range(24)]


async def served(http: aiohttp.ClientSession, url: str, pins: dict[str, str] | None = None,
                 keep: dict[str, str] | None = None) -> dict[str, str]:
    """The member that served each session (one request each, sent with its pin)."""
    out: dict[str, str] = {}
    for s in SESSIONS:
        headers = {SESSION: s}
        if pins and s in pins:
            headers[PIN] = pins[s]
        async with http.get(url, headers=headers) as r:
            assert r.status == 200, await r.text()
            out[s] = r.headers["x-meshxl-member"].rsplit("-", 1)[0]
            if keep is not None and PIN in r.headers:
                keep[s] = r.headers[PIN]
    return out


async def test_each_site_prefers_its_own_members_and_pins_hold_across_sites(
        harness: Owner, tmp_path: Path, start_control_plane: Any, start_envoy: Any,
        start_backends: Any) -> None:
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"two site Envoys need network namespaces: {reason}")
    net = await Network(harness, 3).create()
    driver = net.driver_ip
    backends: list[Backend] = await start_backends(list(SITE_OF), host=driver)
    by_name = {b.name.rsplit("-", 1)[0]: b for b in backends}
    (port,) = free_ports(1)
    members = [{"name": name, "address": driver, "port": by_name[name].port, "site": site}
               for name, site in SITE_OF.items()]
    model = {"clusters": [{
        "name": "shop", "mode": "load-sharing", "site_affinity": "local",
        "sites": [{"name": "east", "failover_rank": 0}, {"name": "west", "failover_rank": 0}],
        "stickiness": {"header": SESSION, "pin": {"header": PIN}},
        "health_check": {"path": "/healthz", "interval": "0.5s"},
        "members": members, "listener": {"address": "0.0.0.0", "port": port}}]}
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(model, sort_keys=False))
    plane = await start_control_plane(config_path=path, host=driver)
    zones = ("east", "west", None)
    envoys = [await start_envoy(f"edge-{zone or 'none'}", (driver, plane.port),
                                admin_address=net.ip(i), zone=zone,
                                wrap=functools.partial(net.wrap, i))
              for i, zone in enumerate(zones)]
    for envoy in envoys:
        await envoy.wait_ready()
        await envoy.wait_hosts("shop", lambda hs: len(hs) == 4 and all(h.healthy for h in hs),
                               timeout=20, what="all four members healthy")
    east, west, nowhere = (f"http://{net.ip(i)}:{port}/" for i in range(3))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        # Each site's Envoy keeps new sessions in its site; one without a zone spreads.
        east_pins: dict[str, str] = {}
        at_east = await served(http, east, keep=east_pins)
        at_west = await served(http, west)
        assert {SITE_OF[m] for m in at_east.values()} == {"east"}
        assert {SITE_OF[m] for m in at_west.values()} == {"west"}
        assert {SITE_OF[m] for m in (await served(http, nowhere)).values()} == {
            "east", "west"}
        assert len(east_pins) == len(SESSIONS)

        # A session pinned at east reaches its east member through west's Envoy.
        assert await served(http, west, pins=east_pins) == at_east

        # What each Envoy runs is what `meshxl verify` expects of its zone.
        from meshxl.operator.views.verify import fetch_envoy
        lives: list[EnvoyLive] = [await fetch_envoy(e.admin_url) for e in envoys]
        assert [live.zone for live in lives] == ["east", "west", ""]
        west_hosts = {h["address"]: h["priority"] for h in lives[1].clusters["shop"]}
        assert {SITE_OF[n]: west_hosts[f"{driver}:{by_name[n].port}"]
                for n in SITE_OF} == {"east": 1, "west": 0}
        status = plane.status()
        assert status["last_build"]["zones"].keys() == {"east", "west"}

        # West's members fail their health checks: west's Envoy falls back to east.
        for name in ("w1", "w2"):
            await by_name[name].set_health(False)
        await envoys[1].wait_hosts("shop", lambda hs: sum(h.healthy for h in hs) == 2,
                                   timeout=20, what="west's members unhealthy")
        fallen = await served(http, west)
        assert {SITE_OF[m] for m in fallen.values()} == {"east"}


async def test_each_envoy_gets_its_own_sites_view(xds: Harness) -> None:  # noqa: F811
    resources = compile_resources(model())
    snap = Snapshot.build(resources.by_type(), zones=resources.by_zone())
    xds.cache.set(snap)
    west, other = xds.envoy("west-1", zone="west"), xds.envoy("other-1")
    for envoy in (west, other):
        envoy.request(ENDPOINT, ["shop", "plain"])
    got_west, got_other = await west.recv(), await other.recv()
    assert got_west.version_info == snap.version(ENDPOINT, "west")
    assert got_other.version_info == snap.version(ENDPOINT)
    assert names(got_west) == ["plain", "shop"]
    assert xds.ads.zones() == {"west-1": "west"}
    assert xds.ads.node_status()["west-1"]["zone"] == "west"
