"""A role per cluster, refused by etcd itself: ``meshxl etcd grant`` against a real etcd
with authentication on. A sidecar of virtual system t01 running as its own user works
(writes, reads, bulk saves, transactions, deletes, registration, leases, statistics)
and etcd refuses t01's credentials t02's sessions, and t010's."""

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
from meshxl.local.procs import Owner, run
from meshxl.local.wait import wait_until
from meshxl.model import parse_model
from meshxl.model.vsls import placement_of
from meshxl.operator.actions import apply_model
from tests.harness.cli import meshxl
from tests.harness.clock import scaled
from tests.harness.secure_etcd import ROOT_PASSWORD, enable_auth_on
from tests.harness.sidecar import SidecarProcess

pytestmark = pytest.mark.integration

KEYS = Keys()
MODEL = """\
pools:
  - name: web
    listener: {address: 127.0.0.1, port: 10000}
    members:
      - {name: w1, address: 127.0.0.1, port: 18081}
      - {name: w2, address: 127.0.0.1, port: 18082}
virtual_systems:
  - names: [t01, t010]
    pool: web
  - name: t02
    pool: web
    sessions: {replication: narrow}    # reads sessions on demand, probes etcd's revision
"""


def _secret(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
async def auth_etcd(harness: Owner) -> Any:
    from tests.harness.etcd import start_etcd

    server = await start_etcd(harness, "etcd-roles")
    await enable_auth_on(server.url)
    return server


async def test_a_role_per_cluster_is_enforced_by_etcd(
        harness: Owner, auth_etcd: Any, tmp_path: Path) -> None:
    root = ["--etcd", auth_etcd.url, "--etcd-user", "root", "--etcd-password-file",
            str(_secret(tmp_path / "root", ROOT_PASSWORD))]
    root_security = etcd.EtcdSecurity(user="root", password=ROOT_PASSWORD)
    async with etcd.client(auth_etcd.url, security=root_security) as client:
        await apply_model(client, KEYS, MODEL, "test")

    passwords = {t: _secret(tmp_path / f"pw-{t}", f"password of {t}!")
                 for t in ("t01", "t02")}
    # The dry run prints etcdctl's commands and changes nothing; each tenant's grant.
    (code, out, err), *granted = await asyncio.gather(
        meshxl("etcd", "grant", "t01", "--user", "tenant-t01", "--dry-run", *root),
        *(meshxl("etcd", "grant", tenant, "--user", f"tenant-{tenant}",
                 "--user-password-file", str(passwords[tenant]), "-o", "json", *root)
          for tenant in ("t01", "t02")))
    assert code == 0, err
    assert ("etcdctl role grant-permission meshxl-cluster-t01 readwrite "
            "/meshxl/v1/sessions/t01/ --prefix") in out
    assert "etcdctl user grant-role tenant-t01 meshxl-cluster-t01" in out
    for code, out, err in granted:
        assert code == 0, err
        assert json.loads(out)["user_created"] is True
    # Again: nothing to change; and a tenant's user may not grant itself more: etcd
    # refuses, in one line.
    (code, out, err), (refused, _, why) = await asyncio.gather(
        meshxl("etcd", "grant", "t01", "--user", "tenant-t01", *root),
        meshxl("etcd", "grant", "t02", "--user", "tenant-t01", "--etcd", auth_etcd.url,
               "--etcd-user", "tenant-t01", "--etcd-password-file", str(passwords["t01"])))
    assert code == 0, err
    assert "role meshxl-cluster-t01: up to date" in out
    assert "permissions granted 0, revoked 0" in out
    assert refused == 1 and why.strip().splitlines() == [
        "meshxl: etcd refused the grant: permission denied (run it with the root user's "
        "credentials, --etcd-user root)"], why

    sidecar = SidecarProcess(harness, cluster="t01", member="w1", etcd=auth_etcd.url,
                             app_port=free_port(), etcd_user="tenant-t01",
                             etcd_password_file=passwords["t01"])
    await sidecar.start()
    assert (await sidecar.put("cart-1", {"items": 1})).status == 201
    assert (await sidecar.patch("cart-1", {"more": True})).status == 200
    assert (await sidecar.get("cart-1")).json() == {"items": 1, "more": True}
    saved = await sidecar.bulk_save([{"session": "cart-2", "data": {"n": 2}},
                                     {"session": "cart-3", "data": {"n": 3}}])
    assert saved.status == 200 and all(i["status"] in (200, 201)
                                       for i in saved.json()["items"]), saved.json()
    done = await sidecar.transaction([
        {"operation": "upsert", "session": "cart-4", "data": {"n": 4}},
        {"operation": "delete", "session": "cart-3"}])
    assert done.status == 200, done.json()
    assert (await sidecar.delete("cart-2")).status == 204

    # Its registration and statistics are in etcd (seen with root's credentials).
    async with etcd.client(auth_etcd.url, security=root_security) as client:
        async def published() -> bool:
            return (await client.get(KEYS.sync_stats("t01", "w1").encode())) is not None

        await wait_until(published, timeout=10.0, what="the sidecar's sync statistics")
        assert (await client.get(KEYS.member("t01", "w1").encode())) is not None
        await client.put(KEYS.session("t02", "theirs").encode(), b"{}")
        await client.put(KEYS.session("t010", "theirs").encode(), b"{}")
    status = await sidecar.status()
    assert status["registered"] and status["ready"], status
    assert "permission denied" not in sidecar.logs()
    # Nothing it does was refused or half-done (a read refused is logged as a warning).
    assert not [line for line in sidecar.logs().splitlines()
                if " WARNING " in line or " ERROR " in line], sidecar.logs()

    # t01's credentials: etcd itself refuses t02's and t010's sessions.
    t01 = etcd.EtcdSecurity(user="tenant-t01", password=f"password of {'t01'}!")
    async with etcd.client(auth_etcd.url, security=t01) as client:
        assert (await client.get(KEYS.session("t01", "cart-1").encode())) is not None
        for key in (KEYS.session("t02", "theirs"), KEYS.session("t010", "theirs"),
                    KEYS.sessions_mark("t01")):
            with pytest.raises(aetcd.exceptions.ClientError, match="permission denied"):
                await client.get(key.encode())
            with pytest.raises(aetcd.exceptions.ClientError, match="permission denied"):
                await client.put(key.encode(), b"{}")
        with pytest.raises(aetcd.exceptions.ClientError, match="permission denied"):
            await client.get_prefix(KEYS.sessions_prefix("t02").encode())
        with pytest.raises(aetcd.exceptions.ClientError, match="permission denied"):
            await client.put(KEYS.model.encode(), b"clusters: []")
        with pytest.raises(aetcd.exceptions.ClientError, match="permission denied"):
            await client.put(KEYS.member("t02", "w1").encode(), b"{}")

    # A sidecar holding only what it uses (t02: narrow; t02's active, so it holds
    # nothing it does not use: its standby would hold every session) works under its
    # role too; with delayed sync, it replicates its young sessions for a member down
    # and says so.
    model = parse_model(MODEL)
    member = placement_of(model, model.pools[0]).roles["t02"].active
    assert member is not None
    narrow = SidecarProcess(harness, cluster="t02", member=member, etcd=auth_etcd.url,
                            app_port=free_port(), etcd_user="tenant-t02",
                            etcd_password_file=passwords["t02"], sync_delay=30)
    await narrow.start()
    assert (await narrow.get("nothing")).status == 404  # asked of etcd: not held here
    assert (await narrow.put("mine", {"n": 1})).status == 201
    assert (await narrow.get("mine")).json() == {"n": 1}
    assert (await narrow.delete("theirs")).status == 204  # read from etcd, then deleted
    assert (await narrow.put("young", {"n": 1})).json()["replicated"] is False
    async with etcd.client(auth_etcd.url, security=root_security) as client:
        await client.put(KEYS.member_admin("t02", member).encode(),
                         b'{"at": "2026-01-01T00:00:00+00:00"}')

        async def acknowledged() -> bool:
            return await client.get(KEYS.member_flushed("t02", member).encode()) is not None

        await wait_until(acknowledged, timeout=10.0, what="the planned move acknowledged")
        assert await client.get(KEYS.session("t02", "young").encode()) is not None
    assert not [line for line in narrow.logs().splitlines()
                if " WARNING " in line or " ERROR " in line], narrow.logs()

    # A graceful stop revokes the registration's lease (etcd checks write permission on
    # every key under it): the registration goes at once.
    await sidecar.stop()
    assert "lease not revoked" not in sidecar.logs()
    async with etcd.client(auth_etcd.url, security=root_security) as client:
        assert (await client.get(KEYS.member("t01", "w1").encode())) is None


POOL_MODEL = """\
pools:
  - name: web
    listener: {address: 127.0.0.1, port: 10000}
    members:
      - {name: w1, address: 127.0.0.1, port: 18081}
      - {name: w2, address: 127.0.0.1, port: 18082}
virtual_systems:
  - names: [ta, tb]
    pool: web
"""


async def test_a_pool_sidecar_talks_to_etcd_as_each_vs_own_user(
        harness: Owner, auth_etcd: Any, tmp_path: Path) -> None:
    """``--etcd-credentials-dir``: one sidecar process serves two VSs, each as its own
    etcd user, the pool's liveness key as the pool's user, the process itself as a user
    that may only read the mesh. With VS ta's entry holding tb's user, etcd refuses
    ta's writes (503, nothing stored) while tb keeps working: the isolation is
    etcd's."""
    root = ["--etcd", auth_etcd.url, "--etcd-user", "root", "--etcd-password-file",
            str(_secret(tmp_path / "root", ROOT_PASSWORD))]
    root_security = etcd.EtcdSecurity(user="root", password=ROOT_PASSWORD)
    async with etcd.client(auth_etcd.url, security=root_security) as client:
        await apply_model(client, KEYS, POOL_MODEL, "test")
    # etcdctl's own 5 s per command is short for user adds (bcrypt) beside the grants on
    # two loaded cores; and its 2 s to dial includes logging in, which etcd retries while
    # the grants beside it change the auth store ("revision when password checked became
    # stale; retrying"): "context deadline exceeded" at its first attempt.
    ctl = ["etcdctl", "--endpoints", auth_etcd.url, "--user", f"root:{ROOT_PASSWORD}",
           f"--command-timeout={int(scaled(30))}s", f"--dial-timeout={int(scaled(30))}s"]
    creds = tmp_path / "creds"
    for tenant in ("ta", "tb", "web"):
        (creds / tenant).mkdir(parents=True)
        _secret(creds / tenant / "username",
                "pool-web" if tenant == "web" else f"tenant-{tenant}")
        _secret(creds / tenant / "password", f"password of {tenant}")
    results = await asyncio.gather(
        *(meshxl("etcd", "grant", tenant, "--user", f"tenant-{tenant}",
                 "--user-password-file", str(creds / tenant / "password"), *root)
          for tenant in ("ta", "tb")),
        # The pool's own user writes its member's liveness key (docs/vsls.md).
        meshxl("etcd", "grant", "--pool", "web", "--user", "pool-web",
               "--user-password-file", str(creds / "web" / "password"), *root),
        run([*ctl, "role", "add", "mesh-reader"]),
        run([*ctl, "user", "add", "pool-w1", "--new-user-password", "password of w1"]))
    for code, _, err in results:
        assert code == 0, err
    for argv in (["role", "grant-permission", "mesh-reader", "read", KEYS.mesh_prefix,
                  "--prefix"], ["user", "grant-role", "pool-w1", "mesh-reader"]):
        code, _, err = await run([*ctl, *argv])
        assert code == 0, err

    sidecar = SidecarProcess(harness, cluster=None, pool="web", member="w1",  # type: ignore[arg-type]
                             etcd=auth_etcd.url, app_port=free_port(), etcd_user="pool-w1",
                             etcd_password_file=_secret(tmp_path / "pw-w1", "password of w1"),
                             etcd_credentials_dir=creds)
    await sidecar.start()
    for tenant in ("ta", "tb"):
        put = await sidecar.request("PUT", f"/v1/clusters/{tenant}/sessions/s1",
                                    data=json.dumps({"of": tenant}).encode(),
                                    headers={"Content-Type": "application/json"})
        assert put.status == 201, put.json()
        got = await sidecar.request("GET", f"/v1/clusters/{tenant}/sessions/s1")
        assert got.json() == {"of": tenant}
    assert not [line for line in sidecar.logs().splitlines()
                if " WARNING " in line or " ERROR " in line], sidecar.logs()
    async with etcd.client(auth_etcd.url, security=root_security) as client:
        assert (await client.get(KEYS.pool_member("web", "w1").encode())) is not None

    # tb's password rotated, its file first (a Secret updated), then in etcd, which
    # drops tb's tokens: the sidecar reads the file again, no restart, nothing refused.
    _secret(creds / "tb" / "password", "rotated-password-of-tb")
    code, _, err = await run([*ctl, "user", "passwd", "tenant-tb", "--interactive=false"],
                             stdin=b"rotated-password-of-tb\n")  # etcdctl: no spaces
    assert code == 0, err
    rotated = await sidecar.request("PUT", "/v1/clusters/tb/sessions/s1", data=b'{"n": 1}',
                                    headers={"Content-Type": "application/json"})
    assert rotated.status == 200, rotated.json()
    assert "etcd credentials read again from their files: password changed" in sidecar.logs()

    # ta's entry swapped for tb's user: etcd refuses ta everything of its own.
    _secret(creds / "ta" / "username", "tenant-tb")
    _secret(creds / "ta" / "password", "rotated-password-of-tb")
    # The pool's user refused too: a warning, its VSs served all the same.
    _secret(creds / "web" / "password", "not the pool's password")
    await sidecar.stop()
    await sidecar.start(wait_ready=False)

    async def tb_served() -> bool:
        return (await sidecar.request("GET", "/v1/clusters/tb/sessions/s1")).status == 200

    await wait_until(tb_served, timeout=15.0, what="tb served again")
    refused = await sidecar.request("PUT", "/v1/clusters/ta/sessions/s2",
                                    data=b'{"n": 2}',
                                    headers={"Content-Type": "application/json"})
    assert refused.status == 503, refused.json()
    assert refused.json()["error"].startswith(
        "cluster 'ta' is not started: etcd refused user tenant-tb cluster ta's keys: "
        "etcdserver: permission denied"), refused.json()
    assert (await sidecar.request("PUT", "/v1/clusters/tb/sessions/s2", data=b'{"n": 2}',
                                  headers={"Content-Type": "application/json"})).status == 201
    ready = await sidecar.readyz()
    assert ready.status == 503 and b"ta: not started" in ready.body, ready.body
    warnings = (await sidecar.request("GET", "/v1/status")).json()["warnings"]
    assert [w for w in warnings if w.startswith("pool web: member w1's liveness key is "
                                                 "not written")], warnings
    async with etcd.client(auth_etcd.url, security=root_security) as client:
        assert (await client.get(KEYS.session("ta", "s2").encode())) is None
        assert (await client.get(KEYS.session("tb", "s2").encode())) is not None
