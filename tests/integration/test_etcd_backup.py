"""docs/kubernetes.md's etcd procedures, run as written against a real 3-member etcd:
snapshot save, restore into a new data directory, and the replacement of a member
whose volume is lost (member remove, member add, start with --initial-cluster-state
existing)."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from meshxl.local.ports import free_ports
from meshxl.local.procs import run
from meshxl.local.wait import wait_until
from tests.harness.etcd import EtcdServer

KEYS = {f"/meshxl/v1/mesh/clusters/orders/members/orders-{i}": f'{{"n": {i}}}'
        for i in range(3)}


def _etcdctl() -> str:
    path = shutil.which("etcdctl")
    if path is None:
        pytest.fail("etcdctl is not installed (Debian: apt-get install etcd-client; "
                    "scripts/setup.sh does it)", pytrace=False)
    return path


async def etcdctl(*args: str, endpoints: str | None = None) -> str:
    argv = [_etcdctl(), *args] + ([f"--endpoints={endpoints}"] if endpoints else [])
    code, out, err = await run(argv, timeout=30,
                               env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"})
    assert code == 0, f"etcdctl {' '.join(args)}: {err}"
    return out


class _JoiningMember(EtcdServer):
    """A member that joins a running cluster (``--initial-cluster-state existing``)."""

    def _argv(self) -> list[str]:
        argv = super()._argv()
        argv[argv.index("--initial-cluster-state") + 1] = "existing"
        return argv


async def _get(endpoint: str, key: str) -> str:
    """A serializable read: what this member has, not what the leader says."""
    out = await etcdctl("get", key, "--consistency=s", "--print-value-only",
                        endpoints=endpoint)
    return out.strip()


async def test_snapshot_restore_and_member_replacement(harness: Any, etcd_cluster: Any,
                                                       tmp_path: Path) -> None:
    endpoints = ",".join(etcd_cluster.urls)
    for key, value in KEYS.items():
        await etcdctl("put", key, value, endpoints=endpoints)

    # -- backup: a consistent snapshot from one member ----------------------------------
    snapshot = tmp_path / "meshxl-etcd.db"
    await etcdctl("snapshot", "save", str(snapshot), endpoints=etcd_cluster[0].url)
    status = json.loads(await etcdctl("snapshot", "status", str(snapshot), "-w", "json"))
    assert status["totalKey"] >= len(KEYS)

    # -- restore into a new data directory: a new one-member cluster ----------------------
    client_port, peer_port = free_ports(2)
    name = harness.unique_name("restored")
    data = harness.path(name) / "data"
    peer = f"http://127.0.0.1:{peer_port}"
    await etcdctl("snapshot", "restore", str(snapshot), f"--name={name}",
                  f"--data-dir={data}", f"--initial-cluster={name}={peer}",
                  f"--initial-advertise-peer-urls={peer}",
                  "--initial-cluster-token=meshxl-etcd-restored")
    restored = EtcdServer(harness, name=name, client_port=client_port, peer_port=peer_port,
                          initial_cluster=f"{name}={peer}", token="meshxl-etcd-restored",
                          data_dir=data)
    await restored.start()
    for key, value in KEYS.items():
        assert await _get(restored.url, key) == value
    members = json.loads(await etcdctl("member", "list", "-w", "json",
                                       endpoints=restored.url))["members"]
    assert [m["name"] for m in members] == [name], "restored as a new cluster"

    # -- replace a member whose volume is lost ---------------------------------------------
    lost = etcd_cluster[2]
    await etcd_cluster.kill(2)
    shutil.rmtree(lost.data_dir)
    alive = ",".join(m.url for m in etcd_cluster.members[:2])
    listed = json.loads(await etcdctl("member", "list", "-w", "json", endpoints=alive))
    member_id = next(m["ID"] for m in listed["members"] if m["name"] == lost.name)
    # The lost member may have been the leader: until the others elect one, the remove
    # can run out of etcdctl's deadline. Retry then; a retried remove that finds the
    # member gone means an earlier attempt applied.

    async def remove() -> bool:
        try:
            await etcdctl("member", "remove", f"{member_id:x}", endpoints=alive)
        except AssertionError as exc:
            if "member not found" in str(exc):
                return True
            if not any(reason in str(exc) for reason in (
                    "deadline exceeded", "leader changed", "no leader", "unhealthy cluster")):
                raise
            return False
        return True
    await wait_until(remove, timeout=30, interval=0.5, what="member remove accepted")
    new_client, new_peer = free_ports(2)
    new_peer_url = f"http://127.0.0.1:{new_peer}"
    # Right after a removal etcd may refuse the add ("unhealthy cluster": its strict
    # reconfiguration check waits until the remaining members are seen active): retry.
    added = ""

    async def add() -> bool:
        nonlocal added
        try:
            added = await etcdctl("member", "add", lost.name, f"--peer-urls={new_peer_url}",
                                  endpoints=alive)
        except AssertionError as exc:
            if "unhealthy cluster" not in str(exc):
                raise
            return False
        return True
    await wait_until(add, timeout=30, interval=0.5, what="member add accepted")
    initial = next(line.split("=", 1)[1].strip('"') for line in added.splitlines()
                   if line.startswith("ETCD_INITIAL_CLUSTER="))
    assert f"{lost.name}={new_peer_url}" in initial
    replacement = _JoiningMember(
        harness, name=lost.name, client_port=new_client, peer_port=new_peer,
        initial_cluster=initial, token=f"unused-{uuid.uuid4().hex[:6]}",
        data_dir=harness.path(f"{lost.name}-new") / "data")
    await replacement.start(timeout=30)
    for key, value in KEYS.items():
        assert await _get(replacement.url, key) == value
    all_three = ",".join([*(m.url for m in etcd_cluster.members[:2]), replacement.url])

    async def healthy() -> bool:
        out = await etcdctl("endpoint", "health", "-w", "json", endpoints=all_three)
        return all(h["health"] for h in json.loads(out)) and len(json.loads(out)) == 3
    await wait_until(healthy, timeout=30, what="three healthy members after the replacement")
    members = json.loads(await etcdctl("member", "list", "-w", "json",
                                       endpoints=all_three))["members"]
    assert sorted(m["name"] for m in members) == sorted(
        [etcd_cluster[0].name, etcd_cluster[1].name, lost.name])
    await etcdctl("put", "/meshxl/v1/after-replacement", "ok", endpoints=all_three)
    assert await _get(replacement.url, "/meshxl/v1/after-replacement") == "ok"
