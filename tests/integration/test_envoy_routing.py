"""The cluster model as routed by a real Envoy: config, stickiness, weights, failover.

Each test writes a model file, starts the in-process control plane on it, a real Envoy
and echo backends on loopback, then checks what Envoy received (``/config_dump``,
``/clusters``) and where real requests land (``x-meshxl-member``).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from meshxl.local.ports import free_ports
from meshxl.local.wait import wait_until
from meshxl.model.spec import Stickiness
from meshxl.model.traffic import Retries
from tests.harness import (
    Backend,
    EnvoyFixture,
    Host,
    Outcome,
    drive,
    failures,
    maglev,
    members_seen,
)
from tests.harness.clock import scaled

pytestmark = pytest.mark.integration

LOOPBACK = "127.0.0.1"


# -- model helpers -----------------------------------------------------------------------


def member(backend: Backend, **fields: Any) -> dict[str, Any]:
    """A model member for an echo backend (its name is the member name)."""
    return {"name": backend.name, "address": LOOPBACK, "port": backend.port, **fields}


def cluster(
    name: str, mode: str, members: Sequence[dict[str, Any]], port: int, **fields: Any
) -> dict[str, Any]:
    """A model cluster exposed on ``127.0.0.1:port``; ``fields`` are any other keys.

    The sick-member judge only reports (``degradation: {action: report}``) unless
    ``fields`` say otherwise: these tests place sessions by weight and hash, and on a
    loaded machine a member that answers slower than its peers for a second and a half
    had its weight cut (as it should), which is not what they test."""
    return {
        "name": name,
        "mode": mode,
        "members": list(members),
        "listener": {"address": LOOPBACK, "port": port},
        "degradation": {"action": "report"},
        **fields,
    }


def write_model(path: Path, *clusters: dict[str, Any]) -> Path:
    """Write (atomically replace) the model file, as an operator's editor would."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"clusters": list(clusters)}, sort_keys=False))
    os.replace(tmp, path)
    return path


async def start_stack(
    tmp_path: Path, start_control_plane: Any, start_envoy: Any, *clusters: dict[str, Any]
) -> tuple[Path, EnvoyFixture]:
    """Model file -> control plane -> Envoy; returns once every member is healthy."""
    model = write_model(tmp_path / "model.yaml", *clusters)
    plane = await start_control_plane(config_path=model)
    envoy = await start_envoy("edge", plane.port)
    await envoy.wait_ready()
    for spec in clusters:
        count = len(spec["members"])
        await envoy.wait_hosts(
            spec["name"],
            lambda hs, n=count: len(hs) == n and all(h.healthy for h in hs),
            timeout=20,
            what=f"all {count} members of {spec['name']} healthy",
        )
    return model, envoy


def served(outcomes: Iterable[Outcome]) -> Counter[str | None]:
    """Requests per member that served them."""
    return Counter(o.member for o in outcomes)


def seconds(duration: str) -> float:
    """A proto3 JSON duration ("0.250s") in seconds."""
    assert duration.endswith("s"), duration
    return float(duration[:-1])


def dump_section(dump: dict[str, Any], type_suffix: str) -> dict[str, Any]:
    """One section of a full ``/config_dump`` by its ``@type`` suffix."""
    for item in dump["configs"]:
        if item["@type"].endswith(type_suffix):
            return dict(item)
    raise AssertionError(f"no {type_suffix} in config dump")


async def only_member(
    url: str, expected: str, *, sessions: int = 40, host: str | None = None
) -> bool:
    """True when a short burst of distinct sessions is all served by ``expected``."""
    res = await drive(
        url,
        sessions,
        1,
        concurrency=4,
        max_seconds=10,
        extra_headers={"Host": host} if host else None,
    )
    return not failures(res) and set(served(res)) == {expected}


async def wait_host_flag(
    envoy: EnvoyFixture, cluster_name: str, backend: Backend, healthy: bool
) -> None:
    """Wait until Envoy's view of ``backend`` in ``cluster_name`` is (un)healthy."""

    def check(hosts: list[Host]) -> bool:
        (host,) = [h for h in hosts if h.port == backend.port]
        return host.healthy is healthy

    await envoy.wait_hosts(
        cluster_name,
        check,
        timeout=15,
        what=f"{backend.name} {'healthy' if healthy else 'unhealthy'}",
    )


# -- 1. what Envoy receives ----------------------------------------------------------------


async def test_config_dump_carries_the_model(
    tmp_path, start_control_plane, start_envoy, start_backends
):
    a, b, c = await start_backends(3)
    (lport,) = free_ports(1)
    shared = cluster(
        "shared",
        "load-sharing",
        [member(a, weight=100), member(b, weight=100), member(c, weight=200)],
        lport,
        route={"domains": ["shared.local"]},
        stickiness={"algorithm": "maglev", "header": "x-session-id", "maglev_table_size": 5003},
        health_check={"path": "/healthz", "interval": "300ms", "no_traffic_interval": "700ms"},
        outlier_detection={"consecutive_local_origin_failure": 1, "base_ejection_time": "4s"},
        retries={"attempts": 4, "budget_percent": 40, "host_selection_max_attempts": 6},
    )
    ha = cluster(
        "ha",
        "high-availability",
        [member(a, site="dc1"), member(b, site="dc1"), member(c, site="dc2")],
        lport,
        route={"domains": ["ha.local"]},
        sites=[{"name": "dc1"}, {"name": "dc2"}],
        stickiness={"algorithm": "ring_hash", "cookie": {"name": "ha-session", "ttl": "30m"}},
    )
    by_ip = cluster(
        "byip",
        "load-sharing",
        [member(a), member(b)],
        lport,
        route={"domains": ["byip.local"]},
        stickiness={"source_ip": True},
    )
    _, envoy = await start_stack(tmp_path, start_control_plane, start_envoy, shared, ha, by_ip)

    clusters = await envoy.dynamic_clusters()
    sc = clusters["shared"]
    assert sc["lb_policy"] == "MAGLEV"
    assert int(sc["maglev_lb_config"]["table_size"]) == 5003
    (check,) = sc["health_checks"]
    assert seconds(check["interval"]) == pytest.approx(0.3)
    assert seconds(check["no_traffic_interval"]) == pytest.approx(0.7)
    assert check["http_health_check"]["path"] == "/healthz"
    od = sc["outlier_detection"]
    assert od["split_external_local_origin_errors"] is True
    assert od["consecutive_local_origin_failure"] == 1
    assert seconds(od["base_ejection_time"]) == pytest.approx(4.0)
    (threshold,) = sc["circuit_breakers"]["thresholds"]
    assert threshold["retry_budget"]["budget_percent"]["value"] == pytest.approx(40)
    # One member per tier: placed by tier, so retries can move to the next one.
    assert clusters["ha"]["lb_policy"] == "LEAST_REQUEST"
    assert "ring_hash_lb_config" not in clusters["ha"]

    full = await envoy.config_dump(include_eds=True)
    routes = {
        route["name"]: route["route"]
        for rc in dump_section(full, ".RoutesConfigDump")["dynamic_route_configs"]
        for vhost in rc["route_config"]["virtual_hosts"]
        for route in vhost["routes"]
    }
    assert routes["shared"]["hash_policy"][0]["header"]["header_name"] == "x-session-id"
    cookie = routes["ha"]["hash_policy"][0]["cookie"]
    assert cookie["name"] == "ha-session"
    assert seconds(cookie["ttl"]) == pytest.approx(1800)
    assert routes["byip"]["hash_policy"][0]["connection_properties"]["source_ip"] is True

    retry = routes["shared"]["retry_policy"]
    assert retry["num_retries"] == 4
    assert [p["name"] for p in retry["retry_host_predicate"]] == [
        "envoy.retry_host_predicates.previous_hosts"
    ]
    assert retry["host_selection_retry_max_attempts"] == "6"
    assert "retry_priority" not in retry  # load-sharing: no priority hop by default
    ha_retry = routes["ha"]["retry_policy"]
    assert ha_retry["retry_priority"]["name"] == "envoy.retry_priorities.previous_priorities"

    eds = {
        item["endpoint_config"]["cluster_name"]: item["endpoint_config"]
        for item in dump_section(full, ".EndpointsConfigDump")["dynamic_endpoint_configs"]
    }

    def endpoints(name: str) -> dict[int, tuple[int, str, int]]:
        """port -> (priority, zone, load_balancing_weight)."""
        return {
            lb["endpoint"]["address"]["socket_address"]["port_value"]: (
                group.get("priority", 0),
                group.get("locality", {}).get("zone", ""),
                lb["load_balancing_weight"],
            )
            for group in eds[name]["endpoints"]
            for lb in group["lb_endpoints"]
        }

    shared_eps = endpoints("shared")
    assert {p for p, _, _ in shared_eps.values()} == {0}
    wa, wb, wc = (shared_eps[x.port][2] for x in (a, b, c))
    assert wa == wb and wc == 2 * wa, shared_eps
    ha_eps = endpoints("ha")
    assert [ha_eps[x.port][:2] for x in (a, b, c)] == [(0, "dc1"), (1, "dc1"), (2, "dc2")]


# -- 2. stickiness -------------------------------------------------------------------------


async def test_sticky_sessions_by_header_and_by_envoy_cookie(
    tmp_path, start_control_plane, start_envoy, start_backends
):
    backends = await start_backends(3)
    (lport,) = free_ports(1)
    by_header = cluster(
        "web",
        "load-sharing",
        [member(x) for x in backends],
        lport,
        route={"domains": ["web.local"]},
        stickiness={"header": "x-session-id"},
    )
    by_cookie = cluster(
        "cart",
        "load-sharing",
        [member(x) for x in backends],
        lport,
        route={"domains": ["cart.local"]},
        stickiness={"algorithm": "ring_hash", "cookie": {"name": "cart-session", "ttl": "1h"}},
    )
    await start_stack(tmp_path, start_control_plane, start_envoy, by_header, by_cookie)
    url = f"http://{LOOPBACK}:{lport}/"

    res = await drive(
        url, 200, 10, concurrency=16, max_seconds=30, extra_headers={"Host": "web.local"}
    )
    assert not failures(res), failures(res)[:5]
    assert len(res) == 2000
    seen = members_seen(res)
    moved = {s: m for s, m in seen.items() if len(set(m)) != 1}
    assert not moved, f"{len(moved)} sessions changed member, e.g. {list(moved.items())[:3]}"
    per_member = Counter(m[0] for m in seen.values())
    assert set(per_member) == {x.name for x in backends}, per_member

    # Without the cookie, Envoy sets it (the ttl makes it generate one) ...
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(), timeout=aiohttp.ClientTimeout(total=5)
    ) as http:
        async with http.get(url, headers={"Host": "cart.local"}) as resp:
            assert resp.status == 200
            first = resp.headers["x-meshxl-member"]
            jar: SimpleCookie = SimpleCookie()
            for raw in resp.headers.getall("Set-Cookie", []):
                jar.load(raw)
        assert "cart-session" in jar, "Envoy did not set the hash cookie"
        assert int(jar["cart-session"]["max-age"]) == 3600
        # ... and replaying it from a fresh connection keeps the session on its member.
        value = jar["cart-session"].value
        for _ in range(10):
            async with http.get(
                url,
                headers={
                    "Host": "cart.local",
                    "Cookie": f"cart-session={value}",
                    "Connection": "close",
                },
            ) as resp:
                assert resp.status == 200
                assert resp.headers["x-meshxl-member"] == first

    # Browser-like clients: each session keeps whatever cookie Envoy gave it.
    res = await drive(
        url,
        50,
        6,
        header=None,
        keep_set_cookies=True,
        max_seconds=20,
        extra_headers={"Host": "cart.local"},
    )
    assert not failures(res), failures(res)[:5]
    moved = {s: m for s, m in members_seen(res).items() if len(set(m)) != 1}
    assert not moved, f"cookie sessions changed member: {list(moved.items())[:3]}"
    # Client-chosen cookie values spread over all members, each still sticky.
    res = await drive(
        url,
        100,
        3,
        header=None,
        cookie="cart-session",
        max_seconds=20,
        extra_headers={"Host": "cart.local"},
    )
    assert not failures(res), failures(res)[:5]
    seen = members_seen(res)
    assert all(len(set(m)) == 1 for m in seen.values())
    assert {m[0] for m in seen.values()} == {x.name for x in backends}


# -- 3. weights ------------------------------------------------------------------------------


def weighted_shop(
    backends: Sequence[Backend], weights: dict[str, int], port: int, **fields: Any
) -> dict[str, Any]:
    """A load-sharing cluster ``shop`` of ``backends`` at ``weights`` (by name), sticky
    on ``x-session-id`` unless ``fields`` say otherwise."""
    fields.setdefault("stickiness", {"header": "x-session-id"})
    return cluster(
        "shop", "load-sharing", [member(x, weight=weights[x.name]) for x in backends],
        port, **fields,
    )


async def test_load_sharing_follows_member_weights(
    tmp_path, start_control_plane, start_envoy, start_backends
):
    a, b, c = await start_backends(3)
    weights = {a.name: 100, b.name: 100, c.name: 200}
    (lport,) = free_ports(1)
    spec = weighted_shop((a, b, c), weights, lport)
    await start_stack(tmp_path, start_control_plane, start_envoy, spec)

    res = await drive(f"http://{LOOPBACK}:{lport}/", 3000, 1, concurrency=16, max_seconds=30)
    assert not failures(res), failures(res)[:5]
    assert len(res) == 3000
    counts = served(res)
    total_weight = sum(weights.values())
    for name, weight in weights.items():
        expected = weight / total_weight
        share = counts[name] / len(res)
        assert abs(share - expected) <= 0.15 * expected, (name, share, expected, counts)


@pytest.mark.parametrize("algorithm", ["maglev", "ring_hash"])
async def test_retries_leave_a_dead_member_whatever_the_sessions_hash(
    algorithm, tmp_path, start_control_plane, start_envoy, start_backends
):
    # A member dies and, until its health check or an ejection removes it, stays among
    # Envoy's hosts (here neither comes within the test). Every request hashed to it
    # must be retried on another member. Envoy's re-picks on a consistent hash are
    # fixed by the session's hash (maglev: the hash's low bits flipped, ring hash: the
    # next ring entries), so a session whose re-picks all land on the dead member fails
    # every retry. The heavy member (6:1:1) holds 75 % of the table: with 5 re-picks,
    # 0.75^5 = 24 % of its sessions failed (and 0.4 % at 1:1:1, one demo kill in 25).
    # Maglev's re-picks are neighbouring slots, so in about one member set in 200 a
    # run of slots longer than the re-picks is the heavy member's alone: the sessions
    # hashed into it cannot leave (tests/harness/maglev.py), and exactly they fail.
    heavy, b, c = await start_backends(["heavy", "b", "c"])
    weights = {heavy.name: 600, b.name: 100, c.name: 100}
    (lport,) = free_ports(1)
    spec = weighted_shop(
        (heavy, b, c), weights, lport,
        stickiness={"header": "x-session-id", "algorithm": algorithm},
        health_check={"path": "/healthz", "interval": "60s", "no_traffic_interval": "60s"},
        outlier_detection={"enabled": False},
    )
    _, envoy = await start_stack(tmp_path, start_control_plane, start_envoy, spec)
    url = f"http://{LOOPBACK}:{lport}/"
    before = await drive(url, 400, 1, concurrency=16, max_seconds=20)
    assert not failures(before) and served(before)[heavy.name] > 200, served(before)
    sessions = [f"s{i}" for i in range(2000)]
    cannot_leave: set[str] = set()
    if algorithm == "maglev":
        cannot_leave = _maglev_stranded(await envoy.hosts("shop"), (heavy, b, c), before,
                                        heavy, sessions)

    # The cluster's retry and connection counters, so a failed session says which step
    # failed (a retry refused by the budget, a connect to a live member, a re-pick).
    counters = r"^cluster\.shop\.(upstream_rq_retry|upstream_cx_connect|retry_or_shadow)"
    cx_before = await envoy.stats(counters)
    await heavy.kill9()
    res = await drive(url, sessions, 1, concurrency=16, max_seconds=30)
    assert len(res) == 2000
    bad = failures(res)
    if {o.session for o in bad} != cannot_leave:
        cx = ", ".join(f"{k.removeprefix('cluster.shop.')} {v - cx_before.get(k, 0):+d}"
                       for k, v in sorted((await envoy.stats(counters)).items())
                       if v != cx_before.get(k, 0))
        raise AssertionError(
            f"{len(bad)} of {len(res)} sessions failed, e.g. {bad[:3]}; expected to fail "
            f"(re-picks all on the dead member): {sorted(cannot_leave)}; {cx}")
    assert set(served(res)) == {b.name, c.name}, served(res)
    # The retries did it: Envoy still takes the dead member for healthy.
    (dead,) = [h for h in await envoy.hosts("shop") if h.port == heavy.port]
    assert dead.healthy


def _maglev_stranded(hosts: Sequence[Host], backends: Sequence[Backend],
                     before: Sequence[Outcome], dead: Backend,
                     sessions: Sequence[str]) -> set[str]:
    """The sessions whose retries cannot leave ``dead`` in Envoy's Maglev table of
    ``hosts``, once the table computed here placed every session of ``before`` where
    the real Envoy did (so a prediction of none is not a wrong table's)."""
    slots = maglev.table([(h.endpoint, h.weight) for h in hosts],
                         Stickiness(header="x-session-id").maglev_table_size)
    name = {f"{LOOPBACK}:{x.port}": x.name for x in backends}
    off = [o for o in before if name[maglev.picks(slots, o.session, 0)[0]] != o.member]
    assert not off, (f"Envoy placed {len(off)} of {len(before)} sessions off the Maglev "
                     f"table computed here, e.g. {off[:3]}")
    return maglev.stranded(slots, sessions, f"{LOOPBACK}:{dead.port}",
                           Retries().host_selection_max_attempts)


# -- 4. high availability ----------------------------------------------------------------------


async def test_ha_kill9_active_under_load_fails_no_request(
    tmp_path, start_control_plane, start_envoy, start_backends
):
    active, standby = await start_backends(["active", "standby"])
    (lport,) = free_ports(1)
    spec = cluster(
        "ledger",
        "high-availability",
        [member(active), member(standby)],
        lport,
        stickiness={"header": "x-session-id"},
    )
    _, envoy = await start_stack(tmp_path, start_control_plane, start_envoy, spec)
    url = f"http://{LOOPBACK}:{lport}/"

    res = await drive(url, 60, 2, max_seconds=10)
    assert not failures(res)
    assert set(served(res)) == {active.name}, served(res)

    started = time.monotonic()  # the outcomes' times count from here too (origin)
    live: list[Outcome] = []
    stop = asyncio.Event()
    load = asyncio.create_task(drive(url, 50, 300, concurrency=8, max_seconds=scaled(30),
                                     origin=started, live=live, stop=stop))
    # The fault comes once the load is under way: answers older than the margin the
    # checks below give the kill's signal.
    def answered_a_while_ago() -> bool:
        now = time.monotonic() - started
        return sum(1 for o in live if o.started + o.elapsed < now - 0.1) >= 20

    await wait_until(answered_a_while_ago, timeout=30, what="the load under way")
    # The signal goes at once; kill9() returns once the process is reaped, which a busy
    # machine can delay by a hundred ms or more while the standby already serves.
    signalled = time.monotonic() - started
    await active.kill9()
    reaped = time.monotonic() - started
    await wait_until(lambda: sum(1 for o in live if o.started > reaped) > 150, timeout=20,
                     what="150 requests sent after the kill answered")
    stop.set()
    res = await load

    assert not failures(res), f"{len(failures(res))} of {len(res)} failed, e.g. {failures(res)[:5]}"
    before = [o for o in res if o.started + o.elapsed < signalled - 0.05]
    after = [o for o in res if o.started > reaped]
    assert before and set(served(before)) == {active.name}, served(before)
    assert len(after) > 100, f"only {len(after)} requests after the kill"
    assert set(served(after)) == {standby.name}, served(after)
    await wait_host_flag(envoy, "ledger", active, healthy=False)


# -- 5. two sites ------------------------------------------------------------------------------


async def test_second_site_takes_traffic_only_when_first_has_none(
    tmp_path, start_control_plane, start_envoy, start_backends
):
    d1a, d1b, d2 = await start_backends(["dc1a", "dc1b", "dc2a"])
    (lport,) = free_ports(1)
    spec = cluster(
        "pay",
        "load-sharing",
        [member(d1a, site="dc1"), member(d1b, site="dc1"), member(d2, site="dc2")],
        lport,
        sites=[{"name": "dc1"}, {"name": "dc2"}],
        stickiness={"header": "x-session-id"},
    )
    _, envoy = await start_stack(tmp_path, start_control_plane, start_envoy, spec)
    url = f"http://{LOOPBACK}:{lport}/"

    res = await drive(url, 200, 1, max_seconds=10)
    assert not failures(res)
    assert set(served(res)) == {d1a.name, d1b.name}, served(res)

    await d1a.set_health(False)
    await wait_host_flag(envoy, "pay", d1a, healthy=False)
    # Workers see health changes up to Envoy's update_merge_window after /clusters does:
    # poll until dc1's other member has all sessions, and never see dc2 meanwhile.
    seen_while_dc1_up: Counter[str | None] = Counter()

    async def only_dc1b() -> bool:
        res = await drive(url, 100, 1, max_seconds=10)
        assert not failures(res), failures(res)[:5]
        seen_while_dc1_up.update(served(res))
        return set(served(res)) == {d1b.name}

    await wait_until(only_dc1b, timeout=15, what=f"all traffic on {d1b.name}")
    assert d2.name not in seen_while_dc1_up, seen_while_dc1_up

    await d1b.set_health(False)
    await wait_host_flag(envoy, "pay", d1b, healthy=False)
    await wait_until(lambda: only_member(url, d2.name), timeout=15, what="traffic to move to dc2")

    await d1a.set_health(True)
    await wait_host_flag(envoy, "pay", d1a, healthy=True)
    await wait_until(lambda: only_member(url, d1a.name), timeout=15,
                     what="traffic to return to dc1")


# -- 6. model reload ---------------------------------------------------------------------------


async def test_model_file_change_reaches_envoy_without_restart(
    tmp_path, start_control_plane, start_envoy, start_backends
):
    a, b, c = await start_backends(3)
    (lport,) = free_ports(1)
    spec = cluster(
        "api", "load-sharing", [member(a), member(b)], lport, stickiness={"header": "x-session-id"}
    )
    model, envoy = await start_stack(tmp_path, start_control_plane, start_envoy, spec)
    before = {h.port: h.weight for h in await envoy.hosts("api")}
    assert before[a.port] == before[b.port]

    spec = cluster(
        "api",
        "load-sharing",
        [member(a, weight=300), member(b), member(c)],
        lport,
        stickiness={"header": "x-session-id"},
    )
    write_model(model, spec)

    def updated(hosts: list[Host]) -> bool:
        w = {h.port: h.weight for h in hosts}
        return (
            set(w) == {a.port, b.port, c.port}
            and w[a.port] == 3 * w[b.port]
            and w[b.port] == w[c.port]
            and all(h.healthy for h in hosts)
        )

    await envoy.wait_hosts(
        "api", updated, timeout=20, what="the new member and weight from the reloaded file"
    )

    # Envoy's workers pick up the new member's first passed health check within the
    # cluster's update_merge_window (1 s by default): poll, then check the split.
    async def all_three_serve() -> Counter[str | None] | None:
        res = await drive(f"http://{LOOPBACK}:{lport}/", 500, 1, concurrency=16, max_seconds=15)
        assert not failures(res), failures(res)[:5]
        counts = served(res)
        return counts if set(counts) == {a.name, b.name, c.name} else None

    counts = await wait_until(all_three_serve, timeout=15, what="traffic on the new member")
    assert counts[a.name] > counts[b.name] and counts[a.name] > counts[c.name], counts
