"""A pool with ``membership: registered``, through real etcd and two control-plane
replicas: a listed member is in the placement only while its sidecar is registered
in a virtual system of the pool. Its registrations' leases expiring (a sidecar killed
with kill -9) take it out like ``member down`` on the pool, its VSs' actives on their
standbys, on both replicas alike; registered again, it takes back exactly its roles;
a revoked registration (a sidecar stopped) takes it out at once."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import aetcd
import pytest

from meshxl.etcd.keys import Keys
from meshxl.local.wait import wait_until
from meshxl.model import parse_model
from meshxl.model.placement import VirtualRoles
from meshxl.model.vsls import placement_of
from meshxl.operator.actions import apply_model
from meshxl.operator.views import read_mesh, vs_report
from meshxl.statesync.membership import Membership
from meshxl.xds.app import ControlPlane
from tests.harness.cli import meshxl
from tests.harness.clock import scaled

pytestmark = pytest.mark.integration

KEYS = Keys()
LOOPBACK = "127.0.0.1"
MEMBERS = {"w1": ("a", 9101), "w2": ("b", 9102), "w3": ("a", 9103)}
TENANTS = ["t1", "t2", "t3", "t4", "t5", "t6"]
#: The registrations' lease TTL. Eighteen leases in one test process, each refreshed
#: every TTL/3 with attempts of at most TTL/3: at 2 s, a CI machine whose two cores are
#: saturated by the rest of the suite stalled one first registration past its whole
#: 2 s budget. Lease expiry is what this file tests, so the TTL follows the one clock.
TTL = scaled(4.0)
MODEL = """
pools:
  - name: web
    membership: registered
    listener: {address: 127.0.0.1, port: 10000}
    sites: [{name: a}, {name: b}]
    members:""" + "".join(
    f"\n      - {{name: {m}, address: {LOOPBACK}, port: {port}, site: {site}}}"
    for m, (site, port) in MEMBERS.items()) + f"""
virtual_systems:
  - names: [{", ".join(TENANTS)}]
    pool: web
"""


def roles_of(plane: ControlPlane) -> tuple[frozenset[str], dict[str, VirtualRoles]]:
    """The lost members and every VS's roles as this replica computes them."""
    model = plane.model
    assert model is not None
    placement = placement_of(model, model.pools[0], plane.runtime)
    return placement.lost, dict(placement.roles)


async def until(what: str, check: Callable[[], bool], timeout: float = 15.0) -> float:
    """Wait (bounded) until ``check()``; the seconds it took."""
    start = time.monotonic()
    await wait_until(check, timeout=timeout, what=what)
    return time.monotonic() - start


async def test_a_member_whose_registration_lapses_leaves_the_placement_and_comes_back(
        start_control_plane: Any, etcd: Any, etcd_client: aetcd.Client) -> None:
    text = MODEL
    model = parse_model(text)
    base = placement_of(model, model.pools[0]).roles
    await apply_model(etcd_client, KEYS, text, "test")

    def sidecar(member: str) -> list[Membership]:
        """A pool member's sidecar: one registration (lease) per VS of the pool."""
        site, port = MEMBERS[member]
        return [Membership(etcd_client, KEYS, vs, member, address=LOOPBACK, port=port,
                           site=site, ttl=TTL) for vs in TENANTS]

    running = {m: sidecar(m) for m in MEMBERS}
    try:
        for parts in running.values():
            for part in parts:
                await part.start()
        planes = [await start_control_plane(etcd=etcd.url, replica=f"cp{i}")
                  for i in range(2)]

        def every(lost: set[str], roles: dict[str, VirtualRoles] | None = None) -> bool:
            return all(roles_of(p)[0] == lost and (roles is None or roles_of(p)[1] == roles)
                       for p in planes)

        await until("every member registered, the whole placement", lambda: every(
            set(), dict(base)))
        held = {m: [vs for vs in TENANTS if base[vs].active == m] for m in MEMBERS}
        victim = max(MEMBERS, key=lambda m: (len(held[m]), m))
        assert held[victim]

        # kill -9 of the victim's sidecar: nothing revokes its leases, they expire.
        for part in running.pop(victim):
            await part.stop(revoke=False)
        took = await until(f"{victim}'s leases expired", lambda: every({victim}),
                           timeout=4 * TTL + 5)
        print(f"\n{victim}: out of the placement {took:.1f} s after its sidecar stopped "
              f"(lease ttl {TTL:g} s)")
        lost, after = roles_of(planes[0])
        assert roles_of(planes[1])[1] == after  # both replicas compute the same
        for vs in TENANTS:
            expected = base[vs].standby if vs in held[victim] else base[vs].active
            assert after[vs].active == expected, vs
            assert victim not in after[vs].order and after[vs].standby is not None
            spec = planes[0].model.cluster(vs) if planes[0].model else None
            assert spec is not None and victim not in {m.name for m in spec.members}
        report = vs_report(await read_mesh(etcd_client, KEYS))
        pool = {m["name"]: m for m in report["pools"][0]["members"]}
        assert pool[victim]["lost"] and pool[victim]["why"] == "unregistered"
        assert pool[victim]["active"] == 0
        assert {v["name"]: v["active"] for v in report["virtual_systems"]} == {
            vs: after[vs].active for vs in TENANTS}
        code, out, err = await meshxl("vs", "list", "--etcd", etcd.url)
        assert code == 0 and "lost (unregistered)" in out, err

        # Registered again: exactly its roles back, on both replicas.
        running[victim] = sidecar(victim)
        for part in running[victim]:
            await part.start()
        await until(f"{victim} back in its roles", lambda: every(set(), dict(base)))

        # A sidecar stopped: its registrations revoked, out at once.
        other = next(m for m in MEMBERS if m != victim)
        for part in running.pop(other):
            await part.stop()
        took = await until(f"{other} revoked", lambda: every({other}), timeout=5)
        print(f"{other}: out of the placement {took:.2f} s after its leases were revoked")
    finally:
        for parts in running.values():
            for part in parts:
                with contextlib.suppress(Exception):
                    await part.stop()


async def test_a_tenants_unleased_registration_keeps_no_dead_member_live(
        start_control_plane: Any, etcd: Any, etcd_client: aetcd.Client) -> None:
    """A tenant's etcd role may write under its own VS: an unleased registration of a
    pool member there (no sidecar's lease behind it) must keep that member live for no
    VS. The member stays lost on both replicas and no active role moves onto it;
    the operator's view agrees."""
    text = MODEL
    await apply_model(etcd_client, KEYS, text, "test")
    dead = "w2"
    running = [Membership(etcd_client, KEYS, vs, m, address=LOOPBACK,
                          port=MEMBERS[m][1], site=MEMBERS[m][0], ttl=TTL)
               for m in MEMBERS if m != dead for vs in TENANTS]
    try:
        for part in running:
            await part.start()
        planes = [await start_control_plane(etcd=etcd.url, replica=f"cp{i}")
                  for i in range(2)]
        await until("the dead member lost", lambda: all(
            roles_of(p)[0] == {dead} for p in planes))
        before = roles_of(planes[0])[1]
        assert all(before[vs].active != dead for vs in TENANTS)

        # The tenant t1 writes a registration of the dead member under its own VS.
        site, port = MEMBERS[dead]
        await etcd_client.put(KEYS.member("t1", dead).encode(), (
            f'{{"address": "{LOOPBACK}", "port": {port}, "site": "{site}", '
            '"ready": true}').encode())
        await until("both replicas read the forged registration", lambda: all(
            ("t1", dead) in p.runtime.registrations for p in planes))
        for plane in planes:
            lost, roles = roles_of(plane)
            assert lost == {dead}, "an unleased registration made a dead member live"
            assert roles == before, "a role moved onto the dead member"
        report = vs_report(await read_mesh(etcd_client, KEYS))
        pool = {m["name"]: m for m in report["pools"][0]["members"]}
        assert pool[dead]["lost"] and pool[dead]["why"] == "unregistered"
        assert all(v["active"] != dead for v in report["virtual_systems"])
    finally:
        for part in running:
            with contextlib.suppress(Exception):
                await part.stop()
