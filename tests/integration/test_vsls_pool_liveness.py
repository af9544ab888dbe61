"""Pool liveness only from what a member itself proves, against a real etcd with
authentication on (``meshxl etcd grant``: a role for the pool, one for each tenant),
real hosting sidecars (``meshxl serve statesync --pool web``) and a control plane
(issue #51, item 5; docs/vsls.md, "Pools with `membership: registered`").

Each hosting sidecar writes its member's pool-level liveness key with the pool's
credential, and the pool is marked once every member did. A member then stopped is
lost; a tenant whose credential grants a lease of its own, keeps it alive and writes a
leased registration of that member under its own VS makes it live for nobody: it stays
lost on the control plane and in the operator's view, and no role moves. etcd refuses
the tenant's credential the pool's keys (its liveness key, the marks)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aetcd
import pytest

from meshxl import etcd
from meshxl.etcd.keys import Keys
from meshxl.local.ports import free_port
from meshxl.local.procs import Owner
from meshxl.local.wait import wait_until
from meshxl.model.placement import VirtualRoles
from meshxl.model.vsls import placement_of
from meshxl.operator.actions import apply_model
from meshxl.operator.views import read_mesh, vs_report
from meshxl.xds.app import ControlPlane
from tests.harness.cli import meshxl
from tests.harness.secure_etcd import ROOT_PASSWORD, enable_auth_on
from tests.harness.sidecar import SidecarProcess

pytestmark = pytest.mark.integration

KEYS = Keys()
TENANTS = ("t1", "t2", "t3", "t4")
MEMBERS = ("w1", "w2", "w3")
MODEL = """\
pools:
  - name: web
    membership: registered
    listener: {address: 127.0.0.1, port: 10000}
    members:""" + "".join(
    f"\n      - {{name: {m}, address: 127.0.0.1, port: {18180 + i}}}"
    for i, m in enumerate(MEMBERS)) + f"""
virtual_systems:
  - names: [{", ".join(TENANTS)}]
    pool: web
"""
ROOT = etcd.EtcdSecurity(user="root", password=ROOT_PASSWORD)


def _secret(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def roles_of(plane: ControlPlane) -> tuple[frozenset[str], dict[str, VirtualRoles]]:
    model = plane.model
    assert model is not None
    placement = placement_of(model, model.pools[0], plane.runtime)
    return placement.lost, dict(placement.roles)


async def test_a_tenants_leased_registration_keeps_no_dead_member_live(
        harness: Owner, start_control_plane: Any, tmp_path: Path) -> None:
    from tests.harness.etcd import start_etcd

    server = await start_etcd(harness, "etcd-pool-liveness")
    await enable_auth_on(server.url)
    url = server.url
    root = ["--etcd", url, "--etcd-user", "root", "--etcd-password-file",
            str(_secret(tmp_path / "root", ROOT_PASSWORD))]
    async with etcd.client(url, security=ROOT) as client:
        await apply_model(client, KEYS, MODEL, "test")
    # The pool's user (the hosting processes' own credential, which also serves the
    # other VSs here), and tenant t1's own user, in the credentials directory the
    # hosting processes read.
    creds = tmp_path / "creds"
    pool_password = _secret(tmp_path / "pool-web", "password of the pool")
    _secret(creds / "t1" / "username", "tenant-t1")
    _secret(creds / "t1" / "password", "password of t1")
    for argv in (["--pool", "web", *TENANTS[1:], "--user", "pool-web",
                  "--user-password-file", str(pool_password)],
                 ["t1", "--user", "tenant-t1", "--user-password-file",
                  str(creds / "t1" / "password")]):
        code, _, err = await meshxl("etcd", "grant", *argv, *root)
        assert code == 0, err

    sidecars = {m: SidecarProcess(harness, cluster=None, pool="web",  # type: ignore[arg-type]
                                  member=m, etcd=url, app_port=free_port(),
                                  etcd_user="pool-web", etcd_password_file=pool_password,
                                  etcd_credentials_dir=creds, lease_ttl=2.0)
                for m in MEMBERS}
    await asyncio.gather(*(s.start(timeout=30.0) for s in sidecars.values()))
    plane = await start_control_plane(etcd=url, etcd_security=ROOT)

    # Every member proved itself with its pool key, the pool is marked: the upgrade's
    # fallback to VS registrations is over.
    await wait_until(lambda: plane.runtime.pool_live_of("web") == set(MEMBERS)
                     and "web" in plane.runtime.pools_by_key, timeout=15.0,
                     what="every member's pool key, and the pool marked")
    for sidecar in sidecars.values():
        assert "liveness key not written" not in sidecar.logs()
        status = (await sidecar.request("GET", "/v1/status")).json()
        assert not [w for w in status["warnings"] if "liveness" in w], status

    dead = "w2"
    await sidecars[dead].stop()  # graceful: its leases revoked, out at once
    await wait_until(lambda: roles_of(plane)[0] == {dead}, timeout=15.0,
                     what=f"{dead} lost")
    before = roles_of(plane)[1]
    assert all(dead not in r.order for r in before.values())

    # Tenant t1's own credential: a lease it keeps alive, and a registration of the dead
    # member under its own VS, ready. etcd takes it (t1's own keys).
    t1 = etcd.EtcdSecurity(user="tenant-t1", password="password of t1")
    async with etcd.client(url, security=t1) as client:
        lease = await client.lease(30)
        await lease.refresh()
        await client.put(KEYS.member("t1", dead).encode(), json.dumps({
            "address": "127.0.0.1", "port": 18181, "ready": True}).encode(), lease=lease)
        await wait_until(lambda: ("t1", dead) in plane.runtime.registrations
                         and ("t1", dead) not in plane.runtime.unleased, timeout=10.0,
                         what="the control plane read the tenant's leased registration")
        lost, roles = roles_of(plane)
        assert lost == {dead}, "a tenant's leased registration made a dead member live"
        assert roles == before, "a role moved onto the dead member"
        async with etcd.client(url, security=ROOT) as operator:
            report = vs_report(await read_mesh(operator, KEYS))
        pool = {m["name"]: m for m in report["pools"][0]["members"]}
        assert pool[dead]["lost"] and pool[dead]["why"] == "unregistered"
        assert all(v["active"] != dead for v in report["virtual_systems"])

        # The pool's keys are not the tenant's: etcd refuses them all.
        for key in (KEYS.pool_member("web", dead), KEYS.pool_keyed("web", dead),
                    KEYS.pool_liveness("web")):
            with pytest.raises(aetcd.exceptions.ClientError, match="permission denied"):
                await client.put(key.encode(), b"{}", lease=lease)
            with pytest.raises(aetcd.exceptions.ClientError, match="permission denied"):
                await client.delete(key.encode())
        await lease.revoke()
