"""The control plane's live view (``/ui/`` on its admin port) in a real browser:
headless Chromium (Debian's package) driven by Playwright, against real etcd, two
control-plane replicas, three members and Envoy.

The page must show the members, Envoy's ACKed versions and the sidecars; a member
killed under traffic must show as lost, with its failover's timeline (loss seen,
rebuild, push, Envoy's ACK, the takeovers), within a second of the control plane
seeing it; every replica shows the same; text from the mesh is shown as text; and the
page runs without a single console error, loading nothing from anywhere else.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aetcd
import aiohttp
import pytest

from meshxl.etcd.keys import Keys
from meshxl.local.deployment import DemoDeployment
from meshxl.local.ports import free_ports
from meshxl.local.procs import Owner
from meshxl.local.traffic import Traffic
from meshxl.local.wait import wait_until
from meshxl.operator.actions import apply_model
from meshxl.ui import SECURITY_HEADERS, install
from meshxl.xds.app import ControlPlane
from meshxl.xds.config import ControlPlaneConfig
from meshxl.xds.types import CLUSTER as CDS
from meshxl.xds.types import ENDPOINT
from tests.harness.browser import (
    BrowserNotInstalled,
    Console,
    find_chromium,
    open_page,
    wait_for_js,
)
from tests.harness.cli import meshxl_json
from tests.harness.clock import scaled
from tests.harness.controlplane import InProcessControlPlane
from tests.harness.load import under_way

# ``heavy`` only where the page's timing is judged (a failover shown within
# SHOWN_WITHIN, a warm-up's ramp); the rest wait for what the page shows.
pytestmark = pytest.mark.integration

POLL = 0.25
"""The page's poll period in these tests (seconds; ?interval=)."""
SHOWN_WITHIN = 1.0
"""Seconds from the control plane seeing a loss to the page showing it (generous: the
page polls every POLL s and one read of etcd takes milliseconds)."""

# Records when the page first shows member a as not ready and the failover of a: a
# MutationObserver sees the DOM change as it happens (Date.now(), the host's clock, the
# same one the control plane stamps its observation with).
OBSERVE = """
window.__seen = {};
new MutationObserver(() => {
  const now = Date.now();
  const row = document.querySelector('tr.member[data-cluster="demo"][data-member="a"]');
  if (row && row.dataset.state !== "ready" && !window.__seen.state) {
    window.__seen.state = {at: now, state: row.dataset.state};
  }
  const card = document.querySelector('.failover[data-cluster="demo"][data-member="a"]');
  if (card && !window.__seen.failover) {
    window.__seen.failover = {at: now, detected: Number(card.dataset.detected)};
  }
}).observe(document, {subtree: true, childList: true, attributes: true});
"""


@pytest.fixture
def chromium() -> str:
    """Fail (never skip) without a browser: setup installs it."""
    try:
        return find_chromium()
    except BrowserNotInstalled as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
async def deployment(harness: Owner, tmp_path: Path) -> AsyncIterator[DemoDeployment]:
    async with DemoDeployment(tmp_path / "work", replicas=2) as d:
        harness.own(d.owner)  # its processes' logs in a failure report
        yield d


def assert_clean(console: Console) -> None:
    assert console.problems() == [], "\n".join(console.problems())


async def member_states(page: Any) -> dict[str, str]:
    return dict(await page.eval_on_selector_all(
        "tr.member", "rows => rows.map(r => [r.dataset.member, r.dataset.state])"))


@pytest.mark.heavy
async def test_the_page_shows_members_and_a_failover_as_it_happens(
    chromium: str, deployment: DemoDeployment, tmp_path: Path,
) -> None:
    d = deployment
    # The second replica: no Envoy is connected to it, so it follows no failover
    # itself; it shows what etcd holds, like every replica.
    quiet, busy = d.replicas[1], d.replicas[0]
    async with open_page(tmp_path / "profile") as (page, console):
        await page.add_init_script(OBSERVE)
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        await page.goto(f"{quiet.admin_url}/ui?interval={POLL}")
        assert page.url == f"{quiet.admin_url}/ui/?interval={POLL}"
        await wait_for_js(page, "document.querySelectorAll('tr.member[data-state=ready]')"
                          ".length === 3", timeout=10)
        rows = await page.eval_on_selector_all("tr.member", """rows => rows.map(r =>
            Array.from(r.cells).map(c => c.textContent.trim()))""")
        by_member = {r[0]: r for r in rows}
        assert by_member["a"][1:4] == ["dc1", "active", "0"], rows
        assert by_member["b"][2] == "standby" and by_member["c"][2] == "backup", rows
        assert "100%" in by_member["a"][5] and "0%" in by_member["b"][5], rows
        assert by_member["a"][7] == "ready", rows  # the reason column

        # Envoy's ACKed versions are this replica's (both serve the same hashes), once
        # the page has polled after the last change (endpoints move while members settle:
        # a read of each at one moment may fall on either side of one).
        await page.wait_for_selector('tr.node[data-node="meshxl-demo"]')
        shown: list[Any] = []

        async def page_shows_what_is_served() -> bool:
            node = await page.eval_on_selector(
                'tr.node[data-node="meshxl-demo"]',
                "r => Array.from(r.cells).map(c => c.textContent)")
            served = (await quiet.status())["versions"]
            shown[:] = [node, served]
            return bool(node[3:5] == [served[CDS], served[ENDPOINT]])

        await wait_until(page_shows_what_is_served, timeout=10,
                         what="the page showing the versions the replica serves",
                         explain=lambda: shown)
        node = shown[0]
        assert node[0] == "meshxl-demo" and node[1] == busy.name
        # The sidecars' sync state.
        await wait_for_js(page, "document.querySelectorAll('#sidecars tr.sidecar').length"
                          " === 3", timeout=10)

        # kill -9 the active member under traffic.
        traffic = Traffic(f"{d.url}/counter", 10, time.time() + 12, max_requests=2000)
        load = asyncio.create_task(traffic.run())
        await under_way(lambda: traffic.records, 30)
        await d.kill_member("a")
        await wait_for_js(page, "window.__seen.failover && window.__seen.state", timeout=20)
        seen = await page.evaluate("window.__seen")
        detected = seen["failover"]["detected"]
        state_after = seen["state"]["at"] / 1000 - detected
        failover_after = seen["failover"]["at"] / 1000 - detected
        print(f"\nshown after the control plane saw the loss: member state "
              f"{state_after * 1000:.0f} ms, failover {failover_after * 1000:.0f} ms "
              f"(polling every {POLL * 1000:.0f} ms)")
        assert seen["state"]["state"] == "lost"
        within = scaled(SHOWN_WITHIN)
        assert state_after < within and failover_after < within, seen

        # The failover's timeline: loss seen, rebuild, push and Envoy's ACK, then the
        # takeovers that member b's sidecar publishes (every 2 s).
        card = '.failover[data-cluster="demo"][data-member="a"]'
        await page.wait_for_selector(f'{card}[data-outcome="converged"]', timeout=10_000)
        for mark in ("line.detect", "rect.rebuild", "rect.push", "rect.ack", "circle.ack"):
            assert await page.locator(f"{card} svg {mark}").count() >= 1, mark
        await wait_for_js(page, f"""Array.from(document.querySelectorAll('{card} svg text'))
            .some(t => t.textContent.startsWith('takeovers by b'))""", timeout=15,
                          what="the takeovers by member b on the timeline")
        assert await page.locator(f"{card} svg rect.takeover").count() >= 1
        text = await page.locator(card).inner_text()
        assert "lease_expired" in text and "1/1 Envoys ACKed" in text, text
        assert f"followed by replica {busy.name}" in text, text
        states = await member_states(page)
        assert states["a"] == "lost" and states["b"] == "ready", states
        b_share = await page.eval_on_selector('tr.member[data-member="b"] meter', "m => m.value")
        assert b_share == 1

        # The other replica shows the same failover.
        await page.goto(f"{busy.admin_url}/ui/?interval={POLL}")
        await page.wait_for_selector(f'{card}[data-outcome="converged"]')
        assert await page.locator(f"{card} svg rect.takeover").count() >= 1

        await load
        assert_clean(console)
        local = ("http://127.0.0.1:", "data:")
        assert all(url.startswith(local) for url in requests), requests


HOSTILE_MEMBER = '<img src=x onerror="window.__xss=1">'
HOSTILE_NODE = "<b>envoy</b>&amp;"
HOSTILE_NACK = "</td><script>window.__xss=2</script> field [bold]x[/] \u202e"
HOSTILE_REASON = "<iframe srcdoc='<script>parent.__xss=3</script>'>"

MODEL = """\
clusters:
- name: c
  membership: registered
  sites: [{name: dc1}]
"""


@pytest.fixture
async def plane(harness: Owner, etcd: Any) -> ControlPlane:
    """A control plane in this process with its admin port and the live view."""
    port, admin = free_ports(2)
    config = ControlPlaneConfig(listen=f"127.0.0.1:{port}", etcd=etcd.url,
                                admin=f"127.0.0.1:{admin}", replica="xds-<i>")
    control = ControlPlane(config, admin_pages=install)
    harness.own(InProcessControlPlane(control, harness.root / "control-plane.log"))
    await control.start()
    return control


async def test_text_from_the_mesh_is_shown_as_text(
    chromium: str, plane: ControlPlane, etcd_client: aetcd.Client, tmp_path: Path,
) -> None:
    keys = Keys()
    await apply_model(etcd_client, keys, MODEL, "test")
    registration = {"address": "127.0.0.1", "port": 9000, "site": "dc1", "ready": True,
                    "problems": ["<u>db</u>"]}
    await etcd_client.put(keys.member("c", HOSTILE_MEMBER).encode(),
                          json.dumps(registration).encode())
    await etcd_client.put(keys.member_admin("c", HOSTILE_MEMBER).encode(),
                          json.dumps({"reason": HOSTILE_REASON, "by": "<op>"}).encode())
    # The only other member reports a problem too: it serves all the same (the cluster's
    # last resort), and the page says so.
    await etcd_client.put(keys.member("c", "m2").encode(), json.dumps(
        {**registration, "port": 9001}).encode())
    node = {"streams": 1, "replica": "<i>xds</i>", "types": {CDS: {"acked_version": "<v>"}},
            "nacks": 1, "last_nack": {"type_url": CDS, "version": "<v>",
                                      "error": HOSTILE_NACK}}
    await etcd_client.put(keys.node(HOSTILE_NODE).encode(), json.dumps(node).encode())
    now = time.time()
    failover = {"id": "x", "cluster": "c", "member": HOSTILE_MEMBER, "cause": "<cause>",
                "from_state": "ready", "to_state": "<lost>", "detected": now - 1,
                "rebuild": now - 0.99, "built": now - 0.98, "version": "<v2>",
                "nodes_total": 1, "acked": 0, "nacked": 1, "outcome": "converged",
                "ended": now - 0.97, "replica": "<i>", "nodes": [
                    {"node": HOSTILE_NODE, "pushed": now - 0.98, "sent": now - 0.98,
                     "answered": now - 0.97, "nack": HOSTILE_NACK}]}
    await etcd_client.put(keys.failover("c", HOSTILE_MEMBER).encode(),
                          json.dumps(failover).encode())

    async with open_page(tmp_path / "profile") as (page, console):
        page.on("dialog", lambda dialog: console.errors.append(f"dialog: {dialog.message}"))
        await page.goto(f"http://127.0.0.1:{plane.admin_port}/ui/?interval={POLL}")
        await page.wait_for_selector(".failover svg rect.nack")
        await page.wait_for_selector("tr.node")
        body = await page.locator("body").inner_text()
        for text in (HOSTILE_MEMBER, HOSTILE_NODE, HOSTILE_REASON, "<u>db</u>", "<op>",
                     "<cause>", "<v2>", "<i>xds</i>", "replica xds-<i>"):
            assert text in body, text
        assert HOSTILE_NACK.strip() in body
        kept = 'tr.member[data-member="m2"][data-state="active-attention"]'
        await page.wait_for_selector(kept)
        cells = await page.eval_on_selector(kept, "r => Array.from(r.cells).map(c => "
                                            "c.textContent.trim())")
        assert "active-attention (<u>db</u>)" in cells, cells
        assert any("active with problems" in c for c in cells), cells
        # Nothing was parsed as markup: no element the texts spell exists, nothing ran.
        injected = await page.evaluate("""() => [
            document.querySelectorAll('img, iframe, b, u, i').length,
            Array.from(document.scripts).filter(s => !s.src).length,
            window.__xss === undefined]""")
        assert injected == [0, 0, True], injected
        # A long node name is cut in the drawing and whole in its tooltip.
        titles = await page.eval_on_selector_all(".failover svg text title",
                                                 "ts => ts.map(t => t.textContent)")
        assert f"Envoy {HOSTILE_NODE}" in titles, titles
        assert_clean(console)


async def test_the_page_and_its_data_answer_with_the_admin_port(
    plane: ControlPlane, etcd: Any, etcd_client: aetcd.Client,
) -> None:
    await apply_model(etcd_client, Keys(), MODEL, "test")
    base = f"http://127.0.0.1:{plane.admin_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/ui", allow_redirects=False) as resp:
            assert resp.status == 302 and resp.headers["Location"] == "ui/"
        for path, kind in (("/ui/", "text/html"), ("/ui/ui.js", "text/javascript"),
                           ("/ui/ui.css", "text/css"), ("/v1/view", "application/json")):
            async with http.get(f"{base}{path}") as resp:
                assert resp.status == 200, path
                assert resp.content_type == kind, path
                for name, value in SECURITY_HEADERS.items():
                    assert resp.headers[name] == value, (path, name)
                body = await resp.read()
            if path == "/ui/":
                page = body.decode()
                assert "http://" not in page.replace('href="../v1/view"', "")
                assert "<script src=\"ui.js\" defer></script>" in page
            if path == "/ui/ui.js":
                assert b"innerHTML" not in body and b"insertAdjacentHTML" not in body
        for path in ("/ui/index.htm", "/ui/..%2fapp.py", "/ui/static"):
            async with http.get(f"{base}{path}") as resp:
                assert resp.status == 404, path
                assert (await resp.json())["status"] == 404
        async with http.get(f"{base}/v1/view") as resp:
            view = await resp.json()
    # What `meshxl status` and `meshxl sync` report, from the same functions.
    status = await meshxl_json("status", "--etcd", etcd.url)
    sync = await meshxl_json("sync", "--etcd", etcd.url)
    assert view["status"]["clusters"] == status["clusters"]
    assert view["status"]["nodes"] == status["nodes"]
    assert view["status"]["failovers"] == status["failovers"] == []
    assert view["sync"]["sidecars"] == sync["sidecars"]
    assert view["replica"]["name"] == "xds-<i>" and view["replica"]["ready"]


async def test_no_ui_serves_only_the_status_endpoints(control_plane_process: Any,
                                                      etcd: Any,
                                                      etcd_client: aetcd.Client) -> None:
    await apply_model(etcd_client, Keys(), MODEL, "test")
    plane = control_plane_process(etcd=etcd.url, extra_args=("--no-ui",))
    await plane.start()
    for path in ("/ui/", "/v1/view"):
        code, _ = await plane.get(path)
        assert code == 404, path
    assert (await plane.get("/v1/status"))[0] == 200


WARMING_MODEL = """\
clusters:
- name: w
  mode: load-sharing
  membership: registered
  warmup: 6s
  stickiness: {header: x-session-id}
"""


@pytest.mark.heavy
async def test_the_page_shows_a_member_warming_up(
    chromium: str, plane: ControlPlane, etcd_client: aetcd.Client, tmp_path: Path,
) -> None:
    """A member that joins a hashed cluster ramps (docs/model.md, "Warm-up"): the page
    says so, with its ramped share below the others', until the ramp ends."""
    keys = Keys()
    await apply_model(etcd_client, keys, WARMING_MODEL, "test")
    registration = {"address": "127.0.0.1", "port": 9000, "ready": True, "problems": []}
    await etcd_client.put(keys.member("w", "m1").encode(), json.dumps(registration).encode())
    # m1 joins a cluster where nobody serves: it takes its share at once.
    await wait_until(lambda: etcd_client.get(keys.member_state("w", "m1").encode()),
                     timeout=30, what="m1 in the member history")
    assert plane.warming.fractions == {}
    async with open_page(tmp_path / "profile") as (page, console):
        # The page first, polling, then m2 joins: a browser slow to start on a busy
        # machine would otherwise come after the ramp.
        await page.goto(f"http://127.0.0.1:{plane.admin_port}/ui/?interval={POLL}")
        await wait_for_js(page, "document.querySelector('tr.member[data-member=\"m1\"]') "
                          "!== null", timeout=10, what="the page showing m1")
        await etcd_client.put(keys.member("w", "m2").encode(), json.dumps(
            {**registration, "port": 9001}).encode())
        row = 'tr.member[data-member="m2"]'
        await wait_for_js(page, f"""(document.querySelector('{row}') || {{}})
            .textContent?.includes('warming up') === true""", timeout=10,
                          what="m2 shown warming up")
        rows = await page.eval_on_selector_all(
            "tr.member", "rows => rows.map(r => [r.dataset.member, r.textContent, "
            "r.querySelector('meter').value])")
        shares = {name: value for name, _, value in rows}
        assert shares["m2"] < shares["m1"], rows
        await wait_for_js(page, f"""(document.querySelector('{row}') || {{}})
            .textContent?.includes('warming up') === false""", timeout=20,
                          what="m2's ramp over")
        assert_clean(console)



POOL_MODEL = """
pools:
  - name: web
    listener: {address: 127.0.0.1, port: 10000}
    sites: [{name: a}, {name: b}]
    members:
      - {name: w1, address: 127.0.0.1, port: 9001, site: a}
      - {name: w2, address: 127.0.0.1, port: 9002, site: b}
      - {name: w3, address: 127.0.0.1, port: 9003, site: a}
virtual_systems:
  - {names: [t1, t2, t3, t4, t5, t6], pool: web}
"""


async def test_the_page_shows_pools_and_moves_a_virtual_systems_active(
    chromium: str, plane: ControlPlane, etcd_client: aetcd.Client, tmp_path: Path,
) -> None:
    """Virtual systems: each pool's members with their roles, each VS's active and
    standby; ``vs move`` shows on the page as the VS's new active."""
    from meshxl.operator.actions import set_vs_preferred

    keys = Keys()
    await apply_model(etcd_client, keys, POOL_MODEL, "test")
    async with open_page(tmp_path / "profile") as (page, console):
        await page.goto(f"http://127.0.0.1:{plane.admin_port}/ui/?interval={POLL}")
        await wait_for_js(page, "document.querySelectorAll('tr.vs').length === 6",
                          timeout=5, what="six virtual systems shown")
        rows = dict(await page.eval_on_selector_all(
            "tr.vs", "rows => rows.map(r => [r.dataset.vs, r.dataset.active])"))
        members = await page.eval_on_selector_all(
            "tr.pool-member", "rows => rows.map(r => r.dataset.member)")
        assert members == ["w1", "w2", "w3"] and set(rows) == {f"t{i}" for i in range(1, 7)}
        target = "w2" if rows["t1"] != "w2" else "w1"
        await set_vs_preferred(etcd_client, keys, "t1", target, "test")
        await wait_for_js(page, f"""(document.querySelector('tr.vs[data-vs="t1"]') || {{}})
            .dataset?.active === '{target}'""", timeout=5, what="t1 moved")
        text = await page.eval_on_selector('tr.vs[data-vs="t1"]', "r => r.textContent")
        assert "moved by operator" in text
        order = await page.eval_on_selector('tr.vs[data-vs="t1"] td.priority',
                                            "c => c.textContent")
        assert order == target  # the one-member priority list, in its own column
        assert_clean(console)


async def test_the_browser_harness_records_failures_not_a_navigations_aborts(
    chromium: str, tmp_path: Path,
) -> None:
    """A request the page's own navigation aborts is not a failure of the page; a
    request to a closed port is."""
    from aiohttp import web

    async def slow(_: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="late")

    async def page_html(_: web.Request) -> web.Response:
        return web.Response(text="<p>x</p>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/slow", slow)
    app.router.add_get("/", page_html)
    runner = web.AppRunner(app)
    await runner.setup()
    port, closed = free_ports(2)
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with open_page(tmp_path / "profile") as (page, console):
            await page.goto(f"http://127.0.0.1:{port}/")
            await page.evaluate("() => { fetch('/slow').catch(() => {}); }")
            await asyncio.sleep(0.3)
            await page.goto(f"http://127.0.0.1:{port}/?again")  # aborts /slow
            assert console.failed_requests == [], console.failed_requests
            await page.evaluate(f"() => fetch('http://127.0.0.1:{closed}/').catch(() => {{}})")
            await wait_until(lambda: console.failed_requests, timeout=5,
                             what="the closed port's request recorded")
            assert f"127.0.0.1:{closed}" in console.failed_requests[0]
    finally:
        await runner.cleanup()
