"""A role per cluster (meshxl/etcd/roles.py): the ranges cover the cluster's own keys
and no other cluster's, whatever their names, and the etcdctl rendering says the same."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshxl.errors import InputError
from meshxl.etcd.keys import Keys
from meshxl.etcd.roles import (
    Grant,
    Range,
    cluster_permissions,
    etcdctl_commands,
    pool_permissions,
    prefix_end,
)

KEYS = Keys()
NAMES = st.from_regex(r"[a-z0-9]([a-z0-9._-]{0,10}[a-z0-9])?", fullmatch=True)


def covers(r: Range, key: str) -> bool:
    raw = key.encode()
    if not r.prefix:
        return raw == r.key.encode()
    return r.key.encode() <= raw < r.range_end


def own_writes(cluster: str) -> list[str]:
    return [KEYS.session(cluster, "s1"), KEYS.deletion(cluster, "s1", 7),
            KEYS.member(cluster, "m1"), KEYS.sync_stats(cluster, "m1"),
            KEYS.problem(cluster, "m1", "disk"), KEYS.member_flushed(cluster, "m1")]


@given(NAMES, NAMES)
def test_a_role_covers_its_cluster_and_no_other(mine: str, theirs: str) -> None:
    ranges = cluster_permissions(KEYS, mine)
    writable = [r for r in ranges if r.access == "readwrite"]
    for key in own_writes(mine):
        assert any(covers(r, key) for r in writable), key
    if theirs != mine:
        for key in own_writes(theirs):
            assert not any(covers(r, key) for r in writable), key
        for key in (KEYS.session(theirs, "s1"), KEYS.deletion(theirs, "s1", 7)):
            assert not any(covers(r, key) for r in ranges), key
    assert not any(covers(r, KEYS.sessions_mark(mine)) for r in ranges)
    for key in (KEYS.model, KEYS.member(theirs, "m"), KEYS.failover(mine, "m1"),
                KEYS.member_state(mine, "m1"), KEYS.shards, KEYS.shard_fence):
        assert any(covers(r, key) for r in ranges), key
    for key in (KEYS.model, KEYS.member_admin(mine, "m1"), KEYS.failover(mine, "m1")):
        assert not any(covers(r, key) for r in writable), key


def test_t01_never_covers_t010() -> None:
    (sessions, *_) = cluster_permissions(KEYS, "t01")
    assert sessions.key == "/meshxl/v1/sessions/t01/"
    assert sessions.range_end == b"/meshxl/v1/sessions/t010"  # exclusive: the mark key
    assert prefix_end(b"/a/") == b"/a0"


def test_etcdctl_rendering() -> None:
    lines = etcdctl_commands(Grant(("t01", "t02"), user="tenant"))
    assert lines[0] == "etcdctl role add meshxl-cluster-t01"
    assert ("etcdctl role grant-permission meshxl-cluster-t01 readwrite "
            "/meshxl/v1/sessions/t01/ --prefix") in lines
    assert "etcdctl role grant-permission meshxl-cluster-t01 read /meshxl/v1/shards" in lines
    assert lines[-2:] == ["etcdctl user grant-role tenant meshxl-cluster-t01",
                          "etcdctl user grant-role tenant meshxl-cluster-t02"]
    assert etcdctl_commands(Grant(("a",), root="/other"))[1].endswith(
        "readwrite /other/v1/sessions/a/ --prefix")


@pytest.mark.parametrize("grant", [
    lambda: Grant(()), lambda: Grant(("a/b",)), lambda: Grant(("",)),
    lambda: Grant(("a",), user="two words"), lambda: Grant((), pools=("a/b",)),
    lambda: Grant(("web",), pools=("web",))])
def test_bad_grants_are_input_errors(grant: object) -> None:
    with pytest.raises(InputError):
        grant()  # type: ignore[operator]


def test_setup_gives_each_cluster_a_user_of_its_own_role_only() -> None:
    from meshxl.etcd.setup import Setup, setup_commands

    setup = Setup(("orders", "t01"), enable_auth=True)
    assert setup.users() == {"meshxl-cluster-orders": ("meshxl-cluster-orders",),
                             "meshxl-cluster-t01": ("meshxl-cluster-t01",),
                             "meshxl-system": ("meshxl",), "root": ("root",)}
    (broad,) = setup.control_plane_permissions()
    assert (broad.key, broad.access, broad.prefix) == ("/meshxl/", "readwrite", True)
    lines = setup_commands(setup)
    assert lines[-1] == "etcdctl auth enable"
    assert "etcdctl user add meshxl-cluster-t01 --no-password" in lines
    # No cluster's role reaches the model, another cluster's keys or the shard map.
    for cluster, ranges in setup.grant().roles().items():
        name = cluster.removeprefix("meshxl-cluster-")
        other = "t01" if name == "orders" else "orders"
        for key in (KEYS.model, KEYS.shards, KEYS.shard_fence, KEYS.session(other, "s"),
                    KEYS.member(other, "m")):
            assert not [r for r in ranges if covers(r, key) and r.access == "readwrite"]


@pytest.mark.parametrize("users", [("root",), ("meshxl-cluster-t01",), ("a b",), ("",)])
def test_setup_refuses_a_control_plane_user_it_manages_otherwise(
        users: tuple[str, ...]) -> None:
    from meshxl.etcd.setup import Setup

    with pytest.raises(InputError):
        Setup(("t01",), users)


def pool_writes(pool: str) -> list[str]:
    return [KEYS.pool_member(pool, "m1"), KEYS.pool_keyed(pool, "m1"),
            KEYS.pool_liveness(pool)]


@given(NAMES, NAMES)
def test_only_a_pools_role_writes_its_members_liveness(pool: str, other: str) -> None:
    """A pool member's liveness key is the pool's role's alone: no cluster's or
    virtual system's role (a tenant's) writes any pool's, and a pool's writes no other
    pool's (docs/vsls.md, "Registered membership")."""
    mine = [r for r in pool_permissions(KEYS, pool) if r.access == "readwrite"]
    for key in pool_writes(pool):
        assert any(covers(r, key) for r in mine), key
        for name in (pool, other):
            assert not [r for r in cluster_permissions(KEYS, name)
                        if covers(r, key) and r.access == "readwrite"], (name, key)
    if other != pool:
        for key in pool_writes(other):
            assert not any(covers(r, key) for r in mine), key
    grant = Grant(("t01",), pools=(pool,) if pool != "t01" else ("web",))
    assert set(grant.roles()) == {"meshxl-cluster-t01", f"meshxl-cluster-{grant.pools[0]}"}


@given(NAMES)
def test_no_sidecar_role_writes_a_pools_stored_placement(pool: str) -> None:
    """The stored placement (``pools/POOL/placement``) is the control plane's alone:
    neither the pool's role (its hosting sidecars) nor a tenant's writes it, so no
    sidecar's credential moves a virtual system's roles (docs/vsls.md)."""
    key = KEYS.pool_placement(pool)
    for role in (pool_permissions(KEYS, pool), cluster_permissions(KEYS, pool)):
        assert not [r for r in role if covers(r, key) and r.access == "readwrite"]
        assert [r for r in role if covers(r, key)]  # read: the sidecar places too


def test_setup_gives_a_pool_its_own_user_with_the_pools_role() -> None:
    from meshxl.etcd.setup import Setup, setup_commands

    setup = Setup(("t01", "t02"), pools=("web",), hosted=(("web", ("t01", "t02")),))
    users = setup.users()
    # The pool's sidecars host its virtual systems: its user holds their roles too;
    # a virtual system's user holds its own alone.
    assert users["meshxl-cluster-web"] == ("meshxl-cluster-web", "meshxl-cluster-t01",
                                           "meshxl-cluster-t02")
    assert users["meshxl-cluster-t01"] == ("meshxl-cluster-t01",)
    assert "etcdctl user grant-role meshxl-cluster-web meshxl-cluster-t02" in (
        setup_commands(setup))
    roles = setup.grant().roles()
    for key in pool_writes("web"):
        assert [r for r in roles["meshxl-cluster-web"] if covers(r, key)
                and r.access == "readwrite"]
        assert not [r for r in roles["meshxl-cluster-t01"] if covers(r, key)
                    and r.access == "readwrite"]
    assert ("etcdctl role grant-permission meshxl-cluster-web readwrite "
            "/meshxl/v1/mesh/pools/web/members/ --prefix") in setup_commands(setup)
