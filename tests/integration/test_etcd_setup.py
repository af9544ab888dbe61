"""Least privilege by default: ``meshxl etcd setup`` against a real etcd with client
certificates (``--client-cert-auth``, as every Kubernetes overlay runs it), where etcd
takes the user from a certificate's common name. From the model it makes a user per
cluster; then a sidecar with its cluster's certificate registers, writes and reads,
while etcd refuses that certificate the model, another cluster's sessions and
registrations, and the shard map, and refuses the shared sidecar certificate of older
installations everything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aetcd
import pytest

from meshxl import etcd
from meshxl.etcd.keys import Keys
from meshxl.local.ports import free_port
from meshxl.local.procs import Owner
from tests.harness.certs import CA, Leaf
from tests.harness.cli import meshxl
from tests.harness.secure_etcd import start_secure_etcd
from tests.harness.sidecar import SidecarProcess

pytestmark = pytest.mark.integration

KEYS = Keys()
MODEL = """\
clusters:
  - name: orders
    listener: {address: 127.0.0.1, port: 10001}
    members:
      - {name: orders-0, address: 127.0.0.1, port: 18091}
pools:
  - name: web
    listener: {address: 127.0.0.1, port: 10000}
    members:
      - {name: w1, address: 127.0.0.1, port: 18081}
      - {name: w2, address: 127.0.0.1, port: 18082}
virtual_systems:
  - names: [t01, t02]
    pool: web
"""


def _security(ca: CA, leaf: Leaf) -> etcd.EtcdSecurity:
    return etcd.EtcdSecurity(ca=ca.cert, cert=leaf.cert, key=leaf.key)


def _options(ca: CA, leaf: Leaf) -> list[str]:
    return ["--etcd-ca", str(ca.cert), "--etcd-cert", str(leaf.cert), "--etcd-key",
            str(leaf.key)]


async def test_setup_gives_each_cluster_only_its_own_keys(harness: Owner,
                                                          tmp_path: Path) -> None:
    ca = CA(harness.path("pki"))
    server = await start_secure_etcd(harness, ca, name="etcd-setup")
    leaf = {cn: ca.issue(cn, server=False) for cn in (
        "root", "meshxl-system", "meshxl-cluster-t01", "meshxl-cluster-web",
        "meshxl-statesync")}
    model = tmp_path / "model.yaml"
    model.write_text(MODEL)
    url = server.url

    code, out, err = await meshxl("etcd", "setup", str(model), "--dry-run", "--etcd", url)
    assert code == 0, err
    for line in ("etcdctl user add meshxl-cluster-t01 --no-password",
                 "etcdctl user grant-role meshxl-cluster-orders meshxl-cluster-orders",
                 "etcdctl user grant-role meshxl-system meshxl", "etcdctl auth enable"):
        assert (line in out.splitlines()) == (line != "etcdctl auth enable"), out
    code, out, err = await meshxl("etcd", "setup", str(model), "--enable-auth", "-o", "json",
                                  "--etcd", url, *_options(ca, leaf["root"]))
    assert code == 0, err
    done = json.loads(out)
    assert done["auth_enabled"] is True
    assert sorted(done["users_created"]) == sorted([
        "meshxl-cluster-orders", "meshxl-cluster-web", "meshxl-cluster-t01",
        "meshxl-cluster-t02", "meshxl-system", "root"])
    # Again, with authentication on: nothing to change. A sidecar's certificate may not
    # run it (etcd refuses: one line).
    (code, out, err) = await meshxl("etcd", "setup", str(model), "--enable-auth", "-o", "json",
                                    "--etcd", url, *_options(ca, leaf["root"]))
    assert code == 0, err
    again = json.loads(out)
    assert again["users_created"] == [] and again["roles_given"] == 0, again
    assert again["permissions_granted"] == 0, again
    code, _, err = await meshxl("etcd", "setup", str(model), "--etcd", url,
                                *_options(ca, leaf["meshxl-cluster-t01"]))
    assert code == 1 and err.strip().splitlines() == [
        "meshxl: etcd refused the grant: permission denied (run it with the root user's "
        "credentials, --etcd-user root)"], err

    # The control plane's certificate (the role meshxl) stores the model.
    code, _, err = await meshxl("apply", str(model), "--etcd", url,
                                *_options(ca, leaf["meshxl-system"]))
    assert code == 0, err

    # A sidecar of t01 with its cluster's certificate: registers, writes, reads.
    sidecar = SidecarProcess(harness, cluster="t01", member="w1", etcd=url,
                             app_port=free_port(), etcd_ca=ca.cert,
                             etcd_cert=leaf["meshxl-cluster-t01"].cert,
                             etcd_key=leaf["meshxl-cluster-t01"].key)
    await sidecar.start(timeout=30.0)
    assert (await sidecar.put("cart-1", {"items": 1})).status == 201
    assert (await sidecar.get("cart-1")).json() == {"items": 1}
    status = await sidecar.status()
    assert status["registered"] and status["ready"], status
    assert "permission denied" not in sidecar.logs()

    system = _security(ca, leaf["meshxl-system"])
    async with etcd.client(url, security=system) as client:
        assert await client.get(KEYS.member("t01", "w1").encode()) is not None
        await client.put(KEYS.session("t02", "theirs").encode(), b"{}")
        await client.put(KEYS.member("t02", "w2").encode(), b"{}")

    # t01's certificate: etcd refuses the model, t02's sessions and registrations, the
    # shard map and its fence.
    denied: list[tuple[str, Any]] = []
    async with etcd.client(url, security=_security(ca, leaf["meshxl-cluster-t01"])) as client:
        assert await client.get(KEYS.session("t01", "cart-1").encode()) is not None
        for key in (KEYS.model, KEYS.session("t02", "theirs"), KEYS.member("t02", "w2"),
                    KEYS.shards, KEYS.shard_fence, KEYS.member_admin("t01", "w1")):
            with pytest.raises(aetcd.exceptions.ClientError, match="permission denied"):
                await client.put(key.encode(), b"{}")
            denied.append(("put", key))
        with pytest.raises(aetcd.exceptions.ClientError, match="permission denied"):
            await client.get(KEYS.session("t02", "theirs").encode())
        with pytest.raises(aetcd.exceptions.ClientError, match="permission denied"):
            await client.get_prefix(KEYS.sessions_prefix("orders").encode())
        # Nor may a virtual system's certificate prove a pool member live.
        with pytest.raises(aetcd.exceptions.ClientError, match="permission denied"):
            await client.put(KEYS.pool_member("web", "w2").encode(), b"{}")
    # The pool's certificate: its sidecars host t01 and t02 (their sessions and
    # registrations) and prove its members live; not the model, nor another cluster's.
    async with etcd.client(url, security=_security(ca, leaf["meshxl-cluster-web"])) as client:
        for key in (KEYS.session("t01", "by-pool"), KEYS.session("t02", "by-pool"),
                    KEYS.member("t02", "w1"), KEYS.pool_member("web", "w1")):
            await client.put(key.encode(), b"{}")
        for key in (KEYS.model, KEYS.session("orders", "by-pool"),
                    KEYS.member("orders", "w1"), KEYS.shards):
            with pytest.raises(aetcd.exceptions.ClientError, match="permission denied"):
                await client.put(key.encode(), b"{}")
    # The shared certificate of older installations names no user: nothing at all.
    async with etcd.client(url, security=_security(ca, leaf["meshxl-statesync"])) as client:
        for key in (KEYS.model, KEYS.session("t01", "cart-1")):
            with pytest.raises(aetcd.exceptions.ClientError, match="permission denied"):
                await client.get(key.encode())
    assert len(denied) == 6
