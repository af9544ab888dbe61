"""Several Envoys, one session: two proxies whose views of the members differ.

Two real Envoys, each on a host of its own (a network namespace), take one
configuration from one control plane; three members (the demo counter app and its
statesync sidecar each, on real etcd) run beside the test. Connections from Envoy 1's
host to member a are refused, a fault between that proxy and that member only: Envoy 1
drops a, Envoy 2 still sees it healthy, and one session is served by two members at
once.

What must hold: the session's counter stays exact (the acknowledged increments are
1..N and the final counter is N), because etcd's revision compare refuses the members'
conflicting writes (412 to the app, which reads again and retries; a plain write of a
member that lost the session gets 409); and the proxies agree again: with the hash
alone once the ejection ends, with a pin after one answer (docs/faults.md, "Proxies
that disagree", has the numbers this test prints).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from meshxl import headers as hdr
from meshxl.local import commands
from meshxl.local.ports import free_ports
from meshxl.local.procs import Owner
from meshxl.local.wait import wait_http, wait_until
from tests.harness import EnvoyFixture, EtcdServer
from tests.harness.netns import Network, unavailable
from tests.harness.sidecar import SidecarProcess
from tests.integration.test_pinned_sessions import PIN, Browser

pytestmark = pytest.mark.integration

MEMBERS = ("a", "b", "c")
STATE_CLUSTER = "shop"
HASHED, PINNED, EJECTED = "hashed", "pinned", "ejected"
EJECTION = 1.0
"""base_ejection_time of the cluster without health checks (seconds)."""
WINDOW = 2.0
"""Seconds of concurrent writes while the proxies disagree."""
MAX_WRITES = 300
"""Requests per writer loop at most (each loop also stops after WINDOW)."""
PACE = 0.02
"""Pause between probe rounds (seconds)."""
LIMIT = 10.0
"""No wait for the proxies to agree lasts longer than this (seconds)."""


@dataclass(frozen=True)
class Answer:
    """One request of the test: through which proxy, who answered, what, when."""

    proxy: int
    member: str | None
    status: int
    seq: int | None
    at: float  # time.monotonic()

    @property
    def acked(self) -> bool:
        return self.status == 200


@dataclass
class Mesh:
    net: Network
    proxies: Sequence[EnvoyFixture]
    listeners: dict[str, int]
    sidecars: dict[str, SidecarProcess]
    app_ports: dict[str, int]
    http: aiohttp.ClientSession

    def url(self, proxy: int, cluster: str) -> str:
        return f"http://{self.net.ip(proxy - 1)}:{self.listeners[cluster]}/counter"

    async def call(self, proxy: int, cluster: str, session: str, method: str = "POST",
                   pins: Browser | None = None) -> Answer:
        """One request for ``session`` through proxy 1 or 2 (with the pin ``pins``
        keeps, which then keeps the pin of the answer)."""
        headers = pins.headers(session) if pins is not None else {hdr.SESSION: session}
        async with self.http.request(method, self.url(proxy, cluster),
                                     headers=headers) as resp:
            body = await resp.json(content_type=None)
            if pins is not None:
                pins.keep(session, resp)
            seq = body.get("seq") if resp.status == 200 else None
            return Answer(proxy, resp.headers.get(hdr.MEMBER), resp.status, seq,
                          time.monotonic())

    async def both(self, cluster: str, session: str,
                   pins: Browser | None = None) -> tuple[Answer, Answer]:
        """The member each proxy sends ``session`` to now (a read: nothing written)."""
        one, two = await asyncio.gather(self.call(1, cluster, session, "GET", pins),
                                        self.call(2, cluster, session, "GET", pins))
        return one, two

    async def ejected(self, proxy: int, cluster: str, member: str) -> None:
        """Until proxy ``proxy`` has ejected ``member`` from ``cluster``."""
        port = self.app_ports[member]
        await self.proxies[proxy - 1].wait_hosts(
            cluster, lambda hs: any(h.port == port and not h.healthy for h in hs),
            timeout=LIMIT, what=f"{member} ejected from {cluster}")

    async def ejections(self, cluster: str) -> list[int]:
        """Each proxy's count of outlier ejections in ``cluster``."""
        return [await envoy.stat(f"cluster.{cluster}.outlier_detection.ejections_enforced_total")
                for envoy in self.proxies]

    async def refuse(self, member: str) -> None:
        """Connections from proxy 1's host to ``member`` are refused from now on."""
        await self.net.refuse(0, self.net.driver_ip, self.app_ports[member])

    async def heal(self) -> None:
        await self.net.heal(0)

    async def counters(self) -> Counter[str]:
        """The sidecars' takeovers, 409s (``write_conflicts``) and 412s, summed."""
        totals: Counter[str] = Counter()
        for sidecar in self.sidecars.values():
            status = await sidecar.status()
            totals["takeovers"] += status["takeovers"]
            totals["conflicts_409"] += status["write_conflicts"]
            reply = await sidecar.request("GET", "/metrics")
            for family in text_string_to_metric_families(reply.body.decode()):
                for sample in family.samples:
                    if (sample.name == "meshxl_statesync_writes_total"
                            and sample.labels.get("result") == "precondition_failed"):
                        totals["precondition_failed_412"] += int(sample.value)
        return totals


def model(driver: str, app_ports: dict[str, int], listeners: dict[str, int]) -> dict[str, Any]:
    """Three clusters of the same members: the hash alone (health checks and outlier
    detection as by default), the hash and a pin, and the hash with outlier detection
    alone (no health checks: an ejection lasts its base_ejection_time)."""
    members = [{"name": m, "address": driver, "port": app_ports[m]} for m in MEMBERS]

    def cluster(name: str, **fields: Any) -> dict[str, Any]:
        return {"name": name, "mode": "load-sharing", "members": members,
                "listener": {"address": "0.0.0.0", "port": listeners[name]}, **fields}

    return {"clusters": [
        cluster(HASHED, stickiness={"header": hdr.SESSION}),
        cluster(PINNED, stickiness={"header": hdr.SESSION,
                                    "pin": {"cookie": {"name": PIN}}}),
        cluster(EJECTED, stickiness={"header": hdr.SESSION}, health_check={"enabled": False},
                outlier_detection={"base_ejection_time": f"{EJECTION:g}s",
                                   "interval": "250ms"}),
    ]}


@pytest.fixture
async def mesh(harness: Owner, tmp_path: Path, etcd: EtcdServer, start_sidecar: Any,
               start_control_plane: Any, start_envoy: Any) -> AsyncIterator[Mesh]:
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"two proxies on two hosts need network namespaces: {reason}")
    net = await Network(harness, 2).create()
    driver = net.driver_ip  # the members and the control plane listen here
    app_ports = dict(zip(MEMBERS, free_ports(len(MEMBERS), driver), strict=True))
    listeners = dict(zip((HASHED, PINNED, EJECTED), free_ports(3), strict=True))
    sidecars = [await start_sidecar(cluster=STATE_CLUSTER, member=m, etcd=etcd.url,
                                    app_port=app_ports[m], app_host=driver, log_level="info",
                                    wait_ready=False) for m in MEMBERS]
    apps = [harness.spawn(f"app-{m}", commands.app(
        m, cluster=STATE_CLUSTER, listen=f"{driver}:{app_ports[m]}", sidecar=sc.url))
        for m, sc in zip(MEMBERS, sidecars, strict=True)]
    # An app is healthy once its sidecar is ready: one wait covers both.
    await asyncio.gather(*(wait_http(f"http://{driver}:{app_ports[m]}/healthz", process=app,
                                     timeout=30) for m, app in zip(MEMBERS, apps, strict=True)))
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(model(driver, app_ports, listeners), sort_keys=False))
    plane = await start_control_plane(config_path=path, host=driver)
    proxies = await asyncio.gather(*(
        start_envoy(f"proxy-{i + 1}", (driver, plane.port), admin_address=net.ip(i),
                    wrap=functools.partial(net.wrap, i)) for i in range(2)))
    for envoy in proxies:
        await envoy.wait_ready()
        for name in listeners:
            await envoy.wait_hosts(name, lambda hs: len(hs) == len(MEMBERS) and all(
                h.healthy for h in hs), timeout=20, what=f"every member of {name} healthy")
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(),
                                     timeout=aiohttp.ClientTimeout(total=10)) as http:
        yield Mesh(net, proxies, listeners, dict(zip(MEMBERS, sidecars, strict=True)),
                   app_ports, http)


async def session_on(mesh: Mesh, cluster: str, member: str, prefix: str) -> str:
    """A session both proxies send to ``member``."""
    for i in range(60):
        session = f"{prefix}{i}"
        if {x.member for x in await mesh.both(cluster, session)} == {member}:
            return session
    raise AssertionError(f"no session of 60 goes to {member} in {cluster}")


def acknowledged(writes: Sequence[Answer]) -> list[int]:
    """The acknowledged values of one session's increments, asserted to be 1..N: no two
    acknowledged the same value, none skipped. The others (409: the app gave up after
    its compare-and-set attempts) wrote nothing."""
    assert all(w.status in (200, 409) for w in writes), Counter(w.status for w in writes)
    acked = sorted(w.seq for w in writes if w.acked and w.seq is not None)
    assert acked == list(range(1, len(acked) + 1)), acked
    return acked


def assert_exact(writes: Sequence[Answer], final: Answer) -> list[int]:
    """Every acknowledged increment counted once, none lost: the acknowledged values
    are 1..N and the counter is N."""
    acked = acknowledged(writes)
    assert final.acked and final.seq == len(acked), (final, len(acked))
    return acked


async def test_two_proxies_that_disagree_keep_one_exact_session_and_agree_again(
    mesh: Mesh,
) -> None:
    hashed = await session_on(mesh, HASHED, "a", "h")
    pinned = await session_on(mesh, PINNED, "a", "p")
    ejected = await session_on(mesh, EJECTED, "a", "e")
    browser = Browser(mesh.url(1, PINNED))  # carries the pin of the last answer
    pin_writes = [await mesh.call(2, PINNED, pinned, pins=browser)]
    assert pin_writes[0].member == "a" and pinned in browser.pins, pin_writes
    before = await mesh.counters()

    # -- 1. proxy 1 loses member a; proxy 2 keeps it --------------------------------------
    await mesh.refuse("a")
    fault = time.monotonic()

    async def writes(proxies: Sequence[int], cluster: str, session: str,
                     pins: Browser | None = None) -> list[Answer]:
        out: list[Answer] = []
        while time.monotonic() - fault < WINDOW and len(out) < MAX_WRITES:
            proxy = proxies[len(out) % len(proxies)]
            out.append(await mesh.call(proxy, cluster, session, "POST", pins))
        return out

    # One session's increments through both proxies at once; a pinned session's
    # alternately through proxy 1 and proxy 2 by one client that keeps the pin.
    via1, via2, alternating = await asyncio.gather(
        writes([1], HASHED, hashed), writes([2], HASHED, hashed),
        writes([1, 2], PINNED, pinned, browser))
    pin_writes += alternating

    # The views diverged for real: two members served the session at the same time.
    assert "a" not in {w.member for w in via1}, Counter(w.member for w in via1)
    assert {w.member for w in via2} == {"a"}, Counter(w.member for w in via2)
    by_a = sorted(w.seq for w in via2 if w.acked and w.seq is not None)
    by_others = [w.seq for w in via1 if w.acked and w.seq is not None]
    assert by_a and by_others, (Counter(w.status for w in via1), Counter(w.status for w in via2))
    assert any(by_a[0] < s < by_a[-1] for s in by_others), "the members did not interleave"

    # Health is per proxy: proxy 1 dropped a (its first refused connect ejected it, its
    # health check failed), proxy 2 saw nothing wrong.
    await mesh.ejected(1, HASHED, "a")
    port_a = mesh.app_ports["a"]
    assert [h.healthy for h in await mesh.proxies[1].hosts(HASHED) if h.port == port_a] \
        == [True]
    assert (await mesh.ejections(HASHED))[1] == 0

    # A plain write (no If-Match) of a member that lost the session is fenced: 409
    # naming the owner (the writer of the last acknowledged increment).
    hashed_writes = via1 + via2
    acked = acknowledged(hashed_writes)
    last = max((w for w in hashed_writes if w.acked), key=lambda w: w.seq or 0)
    writers = {w.member for w in hashed_writes if w.acked and w.member is not None}
    stale = sorted(writers - {last.member})[0]
    fenced = await mesh.sidecars[stale].put(hashed, {"seq": 0, "member": stale})
    assert fenced.status == 409 and fenced.json()["owner"] == last.member, fenced

    # -- 2. the fault ends: with the hash alone, the proxies agree once proxy 1 takes a
    # back (its health check passes) -------------------------------------------------------
    await mesh.heal()
    healed_a = time.monotonic()

    async def agreed() -> float | None:
        one, two = await mesh.both(HASHED, hashed)
        return time.monotonic() if one.member == two.member == "a" else None

    hash_agreed = await wait_until(agreed, timeout=LIMIT, interval=PACE,
                                   what="both proxies to send the hashed session to a")
    assert hash_agreed is not None
    final = await mesh.call(2, HASHED, hashed, "GET")
    assert final.acked and final.seq == len(acked), (final, len(acked))  # 409 wrote nothing

    # With a pin, proxy 2 followed proxy 1's answer: after the first answer from the new
    # member every answer of both proxies came from it, during the fault.
    moved_at = next(i for i, w in enumerate(pin_writes) if w.proxy == 1)
    moved_to = pin_writes[moved_at].member
    assert moved_to not in (None, "a"), pin_writes[:4]
    assert {w.member for w in pin_writes[moved_at:]} == {moved_to}, pin_writes[moved_at:]
    followed = next(w for w in pin_writes[moved_at:] if w.proxy == 2)
    pin_answers = pin_writes.index(followed)  # answers after the fault until agreement
    # ... and the pin holds when a is back in proxy 1's view: the session does not move.
    await mesh.proxies[0].wait_hosts(PINNED, lambda hs: all(h.healthy for h in hs),
                                     timeout=LIMIT, what="a healthy again")
    assert {x.member for x in await mesh.both(PINNED, pinned, browser)} == {moved_to}
    pin_acked = assert_exact(pin_writes, await mesh.call(2, PINNED, pinned, "GET"))

    after = await mesh.counters()
    rise = {k: after[k] - before[k] for k in after}
    assert rise["precondition_failed_412"] > 0, rise  # the compare refused the loser
    assert rise["takeovers"] > 0 and rise["conflicts_409"] >= 1, rise
    app_gave_up = sum(w.status == 409 for w in hashed_writes)

    # -- 3. outlier detection alone: a burst of failures through proxy 1 ejects a there
    # for base_ejection_time, though the fault is over at once ------------------------------
    await mesh.refuse("a")
    burst = await mesh.call(1, EJECTED, ejected)
    await mesh.ejected(1, EJECTED, "a")
    await mesh.heal()
    healed_b = time.monotonic()
    assert burst.acked and burst.member != "a", burst
    ejected_writes = [burst]
    back: Answer | None = None
    while back is None and time.monotonic() - healed_b < LIMIT:
        for proxy in (2, 1):
            ejected_writes.append(await mesh.call(proxy, EJECTED, ejected))
        if ejected_writes[-1].member == "a":
            back = ejected_writes[-1]
        await asyncio.sleep(PACE)
    assert back is not None, "proxy 1 never took member a back"
    assert {w.member for w in ejected_writes if w.proxy == 2} == {"a"}
    assert any(w.proxy == 1 and w.member != "a" and w.at > healed_b for w in ejected_writes), (
        "the ejection ended with the fault: nothing to measure")
    assert_exact(ejected_writes, await mesh.call(2, EJECTED, ejected, "GET"))
    assert (await mesh.ejections(EJECTED))[1] == 0

    print(f"\nproxies disagree: {len(acked)} of {len(hashed_writes)} increments sent "
          f"through both at once acknowledged ({app_gave_up} given up by the app), "
          f"sidecars {dict(rise)}; pinned session {len(pin_acked)} increments\n"
          f"  hash only, health checks on: agreed {hash_agreed - healed_a:.3f}s after the "
          f"fault ended ({hash_agreed - fault:.3f}s after it began)\n"
          f"  hash only, outlier detection alone (base_ejection_time {EJECTION:g}s): agreed "
          f"{back.at - burst.at:.3f}s after the ejection ({back.at - healed_b:.3f}s after "
          f"the fault ended)\n"
          f"  pin: agreed {followed.at - fault:.3f}s after the fault began, "
          f"answer {pin_answers} of the fault\n")
