"""Virtual systems over one pool, through real etcd, the control plane and Envoy.

Four echo members, twelve virtual systems routed by Host name on one listener. Each
VS is served by its active; kill -9 of one member moves only the VSs whose active it
was, each to its standby with no failed request (a refused connect is retried on the
standby's tier), while every other VS keeps serving from the same member. Then
``meshxl member down`` on the pool re-places: the lost member leaves every VS and each
VS that lost its standby gets a new one, and ``meshxl vs`` shows it; ``meshxl vs move``
puts one VS's active on the member the operator chose and moves no other VS, and ``meshxl
vs priority`` orders one VS by the operator's list (its first live member active)."""

from __future__ import annotations

import asyncio
import io
import json
import time
from typing import Any

import aetcd
import aiohttp
import pytest
from prometheus_client import generate_latest
from rich.console import Console

from meshxl.etcd.keys import Keys
from meshxl.local.ports import free_ports
from meshxl.model import parse_model
from meshxl.model.vsls import placement_of
from meshxl.operator.actions import apply_model, set_member_admin, set_vs_priority
from meshxl.operator.tables import render_vs, status_view
from meshxl.operator.views import read_mesh, status_report, vs_report
from tests.harness import Backend
from tests.harness.cli import meshxl

pytestmark = pytest.mark.integration

KEYS = Keys()
LOOPBACK = "127.0.0.1"
TENANTS = [f"t{i:02d}" for i in range(1, 13)]
ROUNDS_AFTER_KILL = 40  # every VS asked this many times after the kill (bounded)


def model_text(backends: list[Backend], port: int) -> str:
    members = "".join(
        f"\n      - {{name: {b.name}, address: {LOOPBACK}, port: {b.endpoint[1]}, "
        f"site: {'ab'[i % 2]}}}" for i, b in enumerate(backends))
    return f"""
pools:
  - name: web
    listener: {{address: {LOOPBACK}, port: {port}}}
    sites: [{{name: a}}, {{name: b}}]
    members:{members}
virtual_systems:
  - names: [{", ".join(TENANTS)}]
    pool: web
    stickiness: {{header: x-session}}
"""


async def ask(http: aiohttp.ClientSession, port: int, vs: str, i: int) -> tuple[int, str]:
    """One request to a virtual system by its Host name: (status, the member that served)."""
    async with http.get(f"http://{LOOPBACK}:{port}/", headers={
            "Host": f"{vs}.tenants.example", "x-session": f"s{i}"}) as resp:
        await resp.read()
        return resp.status, resp.headers.get("x-meshxl-member", "")


async def test_a_lost_member_moves_only_its_own_virtual_systems_to_their_standbys(
        start_control_plane: Any, start_envoy: Any, start_backends: Any, etcd: Any,
        etcd_client: aetcd.Client) -> None:
    backends = await start_backends(4)
    (port,) = free_ports(1)
    text = model_text(backends, port)
    model = parse_model(text)
    roles = placement_of(model, model.pools[0]).roles
    await apply_model(etcd_client, KEYS, text, "test")
    plane = await start_control_plane(etcd=etcd.url)
    envoy = await start_envoy("edge", plane.port)
    await envoy.wait_ready()
    for vs in TENANTS:
        await envoy.wait_hosts(vs, lambda hs: len(hs) == 4 and all(h.healthy for h in hs),
                               what=f"{vs}: four healthy members")

    held: dict[str, list[str]] = {}
    for vs in TENANTS:
        held.setdefault(roles[vs].active or "", []).append(vs)
    victim = max(backends, key=lambda b: (len(held.get(b.name, [])), b.name))
    moved = held[victim.name]
    stayed = [vs for vs in TENANTS if vs not in moved]
    assert moved and stayed
    print(f"\nactive roles per member: { {b.name: len(held.get(b.name, [])) for b in backends} }")

    async with aiohttp.ClientSession() as http:
        # Every VS is served by its active.
        for vs in TENANTS:
            for i in range(5):
                assert await ask(http, port, vs, i) == (200, roles[vs].active), vs

        # kill -9 of the busiest member, with traffic to every VS before and after.
        answers: dict[str, list[tuple[float, int, str]]] = {vs: [] for vs in TENANTS}
        killed_at = 0.0

        async def traffic(rounds: int, start: int) -> None:
            for r in range(start, start + rounds):
                results = await asyncio.gather(*(ask(http, port, vs, r) for vs in TENANTS))
                now = time.monotonic()
                for vs, (status, member) in zip(TENANTS, results, strict=True):
                    answers[vs].append((now, status, member))

        await traffic(10, 0)
        await victim.kill9()
        killed_at = time.monotonic()
        await traffic(ROUNDS_AFTER_KILL, 10)
        for vs in stayed:  # the other VSs: the same member, no failure
            assert {(s, m) for _, s, m in answers[vs]} == {(200, roles[vs].active)}, vs
        failed = 0
        for vs in moved:  # its own VSs: on their standby at once, retries included
            after = [(s, m) for t, s, m in answers[vs] if t > killed_at]
            failed += sum(1 for s, _ in after if s != 200)
            assert {m for s, m in after if s == 200} <= {roles[vs].standby}, (vs, after)
        print(f"kill -9 {victim.name}: {len(moved)} VSs moved to their standbys "
              f"({failed} of {len(moved) * ROUNDS_AFTER_KILL} requests to them failed), "
              f"{len(stayed)} others kept their member with 0 failed requests")
        assert failed == 0

        # The operator takes the member out of the pool: it is re-placed.
        await set_member_admin(etcd_client, KEYS, "web", victim.name, down=True,
                               reason="kill -9")
        for vs in TENANTS:
            await envoy.wait_hosts(vs, lambda hs: victim.name not in {h.hostname for h in hs},
                                   what=f"{victim.name} gone from {vs}")
        report = vs_report(await read_mesh(etcd_client, KEYS))
        rows = {v["name"]: v for v in report["virtual_systems"]}
        for vs in TENANTS:
            row = rows[vs]
            expected = roles[vs].standby if vs in moved else roles[vs].active
            assert row["active"] == expected, row
            assert victim.name not in (row["active"], row["standby"], *row["spares"]), row
            assert row["standby"] is not None and row["standby"] != row["active"]
            if roles[vs].standby != victim.name and vs not in moved:
                assert row["standby"] == roles[vs].standby, row  # untouched
            for i in range(3):
                assert await ask(http, port, vs, i) == (200, expected), vs
        pool = {m["name"]: m for m in report["pools"][0]["members"]}
        assert pool[victim.name]["lost"] and pool[victim.name]["active"] == 0
        assert sum(m["active"] for m in pool.values()) == len(TENANTS)
        console = Console(width=200, file=io.StringIO())
        render_vs(report, console)
        table = console.file.getvalue()
        assert "lost" in table and "pool web" in table and "t07" in table

        # meshxl vs move: one VS's active to a member the operator chooses.
        now = {vs: (rows[vs]["active"], rows[vs]["standby"]) for vs in TENANTS}
        target_vs = stayed[0]
        site = {b.name: "ab"[i % 2] for i, b in enumerate(backends)}
        former = now[target_vs][0]
        chosen = next(b.name for b in backends if b.name not in (victim.name, former)
                      and site[b.name] != site[former])
        for args, expected in (
                (("nope", chosen), "unknown virtual system 'nope'"),
                ((target_vs, "zz"), "unknown member 'zz' in pool 'web'"),
                ((target_vs, victim.name), f"member '{victim.name}' is admin down on 'web'"),
                ((target_vs,), "give a MEMBER to move the active to, or --clear")):
            code, _, err = await meshxl("vs", "move", *args, "--etcd", etcd.url)
            assert code != 0 and expected in one_line(err), (args, err)
        code, out, err = await meshxl("vs", "move", target_vs, chosen, "--reason", "drill",
                                      "--etcd", etcd.url)
        assert code == 0 and f"{target_vs}: active moved to {chosen}" in out, err
        chosen_port = next(b.endpoint[1] for b in backends if b.name == chosen)
        await envoy.wait_hosts(target_vs, lambda hs: {h.port for h in hs if h.priority == 0}
                               == {chosen_port}, what=f"{chosen} active in {target_vs}")
        for vs in TENANTS:  # the moved VS on its chosen member, every other untouched
            for i in range(3):
                assert await ask(http, port, vs, i) == (
                    200, chosen if vs == target_vs else now[vs][0]), vs
        plane.refresh_gauges()  # the placement in the control plane's metrics, per VS
        metrics = generate_latest(plane.metrics.registry).decode()
        actives = [line for line in metrics.splitlines() if line.startswith(
            "meshxl_xds_vs_role{") and f'role="active",vs="{target_vs}"}}' in line]
        assert actives == [f'meshxl_xds_vs_role{{member="{chosen}",pool="web",role="active",'
                           f'vs="{target_vs}"}} 1.0'], actives
        report = vs_report(await read_mesh(etcd_client, KEYS))
        rows = {v["name"]: v for v in report["virtual_systems"]}
        assert rows[target_vs]["active"] == chosen and rows[target_vs]["standby"] == former
        assert rows[target_vs]["moved"]["applied"] and rows[target_vs]["moved"]["reason"] == "drill"
        assert all((rows[v]["active"], rows[v]["standby"]) == now[v]
                   for v in TENANTS if v != target_vs)
        code, out, err = await meshxl("vs", "show", target_vs, "--etcd", etcd.url)
        assert code == 0 and "moved by operator" in out, err
        code, out, err = await meshxl("status", "--cluster", target_vs, "--etcd", etcd.url)
        assert code == 0 and f"active moved to {chosen} by operator" in out, err
        code, out, err = await meshxl("vs", "move", target_vs, "--clear", "--etcd", etcd.url)
        assert code == 0 and "chosen by the placement again" in out, err
        await envoy.wait_hosts(target_vs, lambda hs: chosen_port not in {
            h.port for h in hs if h.priority == 0}, what=f"{target_vs} back to its placement")
        assert await ask(http, port, target_vs, 0) == (200, former)

        # meshxl vs priority: the operator's list. Its head (the victim, down on the pool)
        # is not live: the next listed member is the active, the one after it the standby.
        # (Its refusals are vs move's above, one code path: set_vs_priority.)
        first, second = (b.name for b in backends if b.name not in (victim.name, former))
        code, out, err = await meshxl("vs", "priority", target_vs, victim.name, first, second,
                                      "--reason", "drill", "--etcd", etcd.url)
        assert code == 0, err
        assert one_line(out) == (
            f"{target_vs}: priority {victim.name}, {first}, {second} (etcd revision "
            f"{out.split('revision ')[1].split(')')[0]}); {victim.name} is admin down on "
            f"'web': not live now"), out
        port_of = {b.name: b.endpoint[1] for b in backends}
        await envoy.wait_hosts(target_vs, lambda hs: sorted((h.priority, h.port) for h in hs)
                               == [(0, port_of[first]), (1, port_of[second]), (2, port_of[former])],
                               what=f"{target_vs} in the operator's order")
        for vs in TENANTS:  # the listed VS on its first live member, every other untouched
            assert await ask(http, port, vs, 0) == (
                200, first if vs == target_vs else now[vs][0]), vs
        read = await read_mesh(etcd_client, KEYS)
        rows = {v["name"]: v for v in vs_report(read)["virtual_systems"]}
        same_site = site[first] == site[second]
        assert rows[target_vs]["priority"] == {
            "order": [victim.name, first, second], "reason": "drill", "applied": True,
            "standby_on_its_site": same_site, "by": rows[target_vs]["priority"]["by"],
            "at": rows[target_vs]["priority"]["at"]}
        assert (rows[target_vs]["active"], rows[target_vs]["standby"]) == (first, second)
        assert all((rows[v]["active"], rows[v]["standby"]) == now[v]
                   for v in TENANTS if v != target_vs)
        console = Console(width=240, file=io.StringIO())
        render_vs(vs_report(read, target_vs), console)
        for renderable in status_view(status_report(read, target_vs)):
            console.print(renderable)
        shown = console.file.getvalue()
        assert f"{victim.name}, {first}, {second}" in shown and "(operator's order)" in shown
        assert f"priority {victim.name}, {first}, {second} set by operator" in shown
        assert ("warning: virtual system " + target_vs in shown) == same_site, shown
        # vs move is the one-member list: it replaces the list (one record a VS).
        code, out, err = await meshxl("vs", "move", target_vs, former, "--etcd", etcd.url)
        assert code == 0 and (f"replaces the operator's list {victim.name}, {first}, "
                              f"{second}") in out, err
        await envoy.wait_hosts(target_vs, lambda hs: {h.port for h in hs if h.priority == 0}
                               == {port_of[former]}, what=f"{former} active in {target_vs}")
        stored = await etcd_client.get_prefix(KEYS.preferred_prefix(target_vs).encode())
        assert [kv.key.decode() for kv in stored] == [KEYS.preferred(target_vs, former)]
        code, out, err = await meshxl("vs", "priority", target_vs, "--clear", "--etcd", etcd.url)
        assert code == 0 and "ordered by the placement again" in out, err
        assert not await etcd_client.get_prefix(KEYS.preferred_prefix(target_vs).encode())


async def test_meshxl_vs_as_an_operator_runs_it(etcd: Any, etcd_client: aetcd.Client) -> None:
    """``meshxl vs list`` / ``show`` over etcd: tables, JSON, the pool's member taken out
    with ``member down POOL MEMBER``, and one-line errors."""
    ports = free_ports(4)
    members = "".join(f"\n      - {{name: w{i}, address: {LOOPBACK}, port: {p}, "
                      f"site: {'ab'[i % 2]}}}" for i, p in enumerate(ports))
    text = f"""
pools:
  - name: web
    listener: {{address: {LOOPBACK}, port: {free_ports(1)[0]}}}
    sites: [{{name: a}}, {{name: b}}]
    members:{members}
virtual_systems:
  - names: [{", ".join(f"v{i:02d}" for i in range(60))}]
    pool: web
"""
    await apply_model(etcd_client, KEYS, text, "test")
    code, out, err = await meshxl("vs", "list", "--output", "json", "--etcd", etcd.url)
    assert code == 0, err
    report = json.loads(out)
    pool = {m["name"]: m for m in report["pools"][0]["members"]}
    assert [m["active"] for m in pool.values()] == [15, 15, 15, 15]  # 60 on 4: even
    assert len(report["virtual_systems"]) == 60
    for vs in report["virtual_systems"]:
        assert vs["active"] != vs["standby"]
        assert int(vs["active"][1]) % 2 != int(vs["standby"][1]) % 2  # another site

    code, _, err = await meshxl("member", "down", "web", "w1", "--etcd", etcd.url)
    assert code == 0, err
    code, out, err = await meshxl("vs", "list", "--output", "json", "--etcd", etcd.url)
    after = json.loads(out)
    rows = {v["name"]: v for v in after["virtual_systems"]}
    for vs in report["virtual_systems"]:
        row = rows[vs["name"]]
        assert row["active"] == (vs["standby"] if vs["active"] == "w1" else vs["active"])
        assert "w1" not in (row["standby"], *row["backups"], *row["spares"])
    lost = {m["name"]: m for m in after["pools"][0]["members"]}["w1"]
    assert lost["lost"] and lost["active"] == 0

    code, out, err = await meshxl("vs", "show", "v07", "--etcd", etcd.url)
    assert code == 0, err
    assert "v07" in out and "v08" not in out and "pool web" in out and "lost" in out
    # meshxl status sees each VS as a cluster: its active at priority 0.
    code, out, err = await meshxl("status", "--cluster", "v07", "--output", "json",
                                  "--etcd", etcd.url)
    assert code == 0, err
    (cluster,) = json.loads(out)["clusters"]
    roles = {m["name"]: (m["role"], m["priority"]) for m in cluster["members"]}
    assert roles[rows["v07"]["active"]] == ("active", 0)
    assert roles[rows["v07"]["standby"]] == ("standby", 1)
    assert "w1" not in roles
    code, _, err = await meshxl("vs", "show", "nope", "--etcd", etcd.url)
    assert code == 1 and one_line(err) == "meshxl: unknown virtual system 'nope'"
    code, _, err = await meshxl("member", "down", "pool-x", "w1", "--etcd", etcd.url)
    assert code != 0 and "unknown cluster or pool 'pool-x'" in one_line(err)

    # Two operators setting one VS's order at once: one record stays, the later one's,
    # never one for each (which of two records counts would be nobody's choice).
    for _ in range(3):
        await asyncio.gather(*(set_vs_priority(etcd_client, KEYS, "v09", order)
                               for order in (["w0", "w2"], ["w2", "w3"], ["w3"])))
        stored = await etcd_client.get_prefix(KEYS.preferred_prefix("v09").encode())
        assert len(stored) == 1, [kv.key for kv in stored]


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
