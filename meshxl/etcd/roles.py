"""Per-cluster etcd roles: what one cluster's statesync sidecars may read and write,
so that etcd itself refuses a sidecar of one cluster (one virtual system, one tenant)
the sessions of another (``meshxl etcd grant``, docs/security.md).

The role ``meshxl-cluster-{cluster}`` grants exactly the key ranges a sidecar of that
cluster uses (:func:`cluster_permissions`; a pool's, :func:`pool_permissions`, its
members' liveness keys besides; found by running a sidecar under the role
against an etcd with authentication on, ``tests/integration/test_etcd_roles.py``).
Every range of the cluster's own ends in ``/`` (its prefix's range ends at the next
character), so ``t01``'s never covers ``t010``'s keys; nor does it cover the drill's
mark key ``sessions/{cluster}0``, which only the drill writes, with the operator's
credentials. Leases need no permission in etcd.

The roles and the user are made through etcd's Auth API (aetcd 1.0 has no client
methods for it: its ``rpc.AuthStub`` on the client's channel, the token added by
:mod:`.auth`'s interceptors), or printed as ``etcdctl`` commands (:func:`etcdctl_commands`).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any, Literal

import grpc
from aetcd import rpc

from meshxl.errors import InputError, Unavailable

from .keys import Keys, prefix_end

__all__ = ["Grant", "GrantResult", "Range", "apply_grant", "apply_roles",
           "cluster_permissions", "etcdctl_commands", "pool_permissions", "prefix_end",
           "role_name"]

ROLE_PREFIX = "meshxl-cluster-"

Access = Literal["read", "readwrite"]


@dataclass(frozen=True)
class Range:
    """One permission: a key, or every key under a prefix (``prefix``), read or
    read-write."""

    key: str
    access: Access
    prefix: bool = True
    why: str = ""

    @property
    def range_end(self) -> bytes:
        """etcd's range end: the prefix's end, or empty for a single key."""
        return prefix_end(self.key.encode()) if self.prefix else b""

    def permission(self) -> Any:
        kind = rpc.Permission.READWRITE if self.access == "readwrite" else rpc.Permission.READ
        return rpc.Permission(permType=kind, key=self.key.encode(), range_end=self.range_end)


def role_name(cluster: str) -> str:
    return f"{ROLE_PREFIX}{cluster}"


def cluster_permissions(keys: Keys, cluster: str) -> list[Range]:
    """What a sidecar of ``cluster`` reads and writes, and nothing else."""
    return [
        Range(keys.sessions_prefix(cluster), "readwrite", why="its sessions"),
        Range(keys.deletions_prefix(cluster), "readwrite",
              why="records of the sessions deleted through the API"),
        Range(keys.members_prefix(cluster), "readwrite",
              why="its members' registrations (leased)"),
        Range(f"{keys.sync_prefix}{cluster}/", "readwrite",
              why="its sidecars' sync statistics"),
        Range(keys.flushed_prefix(cluster), "readwrite",
              why="its members' acknowledgements of planned moves (delayed sync; leased)"),
        Range(f"{keys.base}/problems/{cluster}/", "readwrite",
              why="problems its members report with a TTL"),
        Range(keys.mesh_prefix, "read",
              why="the model and every cluster's registrations and admin state (the "
                  "mesh the sidecar follows: no session state)"),
        Range(keys.failovers_prefix(cluster), "read", why="its failover timelines"),
        Range(f"{keys.states_prefix}{cluster}/", "read",
              why="its members' failover history (failback)"),
        Range(keys.shards, "read", prefix=False, why="the session shard map"),
        Range(keys.shard_fence, "read", prefix=False,
              why="the shard map version session transactions compare"),
    ]


def pool_permissions(keys: Keys, pool: str) -> list[Range]:
    """What a pool's own sidecars (the processes hosting its virtual systems) read and
    write: a cluster's, and the pool's keys, where each member proves itself live
    (``pools/POOL/``: its liveness key, leased, and the upgrade's marks). No other role
    covers them: a virtual system's (a tenant's) cannot keep a pool member live. The
    pool's stored placement (``pools/POOL/placement``) it only reads: the control
    plane alone writes it."""
    return [*cluster_permissions(keys, pool),
            Range(keys.pool_members_prefix(pool), "readwrite",
                  why="its members' liveness in the pool (leased), proved by them alone"),
            Range(keys.pool_keyed_prefix(pool), "readwrite",
                  why="the marks that its members prove their liveness so"),
            Range(keys.pool_liveness(pool), "readwrite", prefix=False,
                  why="the mark that every member proves it so (the upgrade is over)")]


@dataclass(frozen=True)
class Grant:
    """Roles for ``clusters`` and ``pools``, granted to ``user`` (None: only the
    roles)."""

    clusters: tuple[str, ...]
    user: str | None = None
    password: str | None = None
    """Needed only to create the user (or to change its password)."""
    root: str = "/meshxl"
    pools: tuple[str, ...] = ()
    """Names whose role is a pool's (:func:`pool_permissions`)."""

    def __post_init__(self) -> None:
        if not self.clusters and not self.pools:
            raise InputError("name at least one cluster or pool")
        keys = Keys(self.root)
        for cluster in self.clusters:
            try:
                keys.sessions_prefix(cluster)
            except ValueError as exc:
                raise InputError(str(exc)) from None
        for pool in self.pools:
            try:
                keys.pool_members_prefix(pool)
            except ValueError as exc:
                raise InputError(str(exc)) from None
        both = sorted(set(self.clusters) & set(self.pools))
        if both:
            raise InputError(f"{both[0]!r} is named both as a cluster and as a pool: a pool's "
                             "role writes its members' liveness, which no cluster's may")
        if self.user is not None and (not self.user or not self.user.isprintable()
                                      or " " in self.user):
            raise InputError(f"invalid etcd user name {self.user!r}")

    def roles(self) -> dict[str, list[Range]]:
        keys = Keys(self.root)
        roles = {role_name(c): cluster_permissions(keys, c) for c in self.clusters}
        roles.update({role_name(p): pool_permissions(keys, p) for p in self.pools})
        return roles


def etcdctl_commands(grant: Grant) -> list[str]:
    """The same grant as ``etcdctl`` commands (``--dry-run``)."""
    lines: list[str] = []
    for role, ranges in grant.roles().items():
        lines.append(f"etcdctl role add {shlex.quote(role)}")
        for r in ranges:
            lines.append(f"etcdctl role grant-permission {shlex.quote(role)} {r.access} "
                         f"{shlex.quote(r.key)}" + (" --prefix" if r.prefix else ""))
    if grant.user is not None:
        user = shlex.quote(grant.user)
        lines.append(f"etcdctl user add {user}   # asks for the password")
        for role in grant.roles():
            lines.append(f"etcdctl user grant-role {user} {shlex.quote(role)}")
    return lines


@dataclass
class GrantResult:
    roles_created: list[str]
    permissions_granted: int
    permissions_revoked: int
    user_created: bool
    password_changed: bool

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _details(exc: grpc.aio.AioRpcError) -> str:
    return (exc.details() or str(exc.code())).removeprefix("etcdserver: ")


async def apply_grant(channel: grpc.aio.Channel, grant: Grant,
                      timeout: float = 10.0) -> GrantResult:
    """Make the grant true in etcd, idempotently: each role added if missing, its
    permissions set to exactly :func:`cluster_permissions` (others revoked), the user
    added (or its password changed) and given the roles. Needs an etcd user allowed to
    manage authentication (``root``)."""
    result = await apply_roles(channel, grant.roles(), timeout)
    if grant.user is not None:
        try:
            await _user(rpc.AuthStub(channel), grant, result, timeout)
        except grpc.aio.AioRpcError as exc:
            raise _refused(exc) from None
    return result


async def apply_roles(channel: grpc.aio.Channel, roles: dict[str, list[Range]],
                      timeout: float = 10.0) -> GrantResult:
    """Each role of ``roles`` added if missing and given exactly its ranges (any other
    permission revoked)."""
    auth = rpc.AuthStub(channel)
    result = GrantResult([], 0, 0, False, False)
    try:
        for role, ranges in roles.items():
            try:
                got = await auth.RoleGet(rpc.AuthRoleGetRequest(role=role), timeout=timeout)
                have = {(p.permType, p.key, p.range_end) for p in got.perm}
            except grpc.aio.AioRpcError as exc:
                if "role name not found" not in (exc.details() or ""):
                    raise
                await auth.RoleAdd(rpc.AuthRoleAddRequest(name=role), timeout=timeout)
                result.roles_created.append(role)
                have = set()
            want = {(p.permType, p.key, p.range_end)
                    for p in (r.permission() for r in ranges)}
            for _kind, key, end in sorted(have - want):
                await auth.RoleRevokePermission(rpc.AuthRoleRevokePermissionRequest(
                    role=role, key=key, range_end=end), timeout=timeout)
                result.permissions_revoked += 1
            for kind, key, end in sorted(want - have):
                await auth.RoleGrantPermission(rpc.AuthRoleGrantPermissionRequest(
                    name=role, perm=rpc.Permission(permType=kind, key=key, range_end=end)),
                    timeout=timeout)
                result.permissions_granted += 1
    except grpc.aio.AioRpcError as exc:
        raise _refused(exc) from None
    return result


def _refused(exc: grpc.aio.AioRpcError) -> Exception:
    details = _details(exc)
    if exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION,
                      grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
        return InputError(f"etcd refused the grant: {details} (run it with the root "
                          "user's credentials, --etcd-user root)")
    return Unavailable(f"etcd request failed: {details}")


async def _user(auth: Any, grant: Grant, result: GrantResult, timeout: float) -> None:
    assert grant.user is not None
    try:
        got = await auth.UserGet(rpc.AuthUserGetRequest(name=grant.user), timeout=timeout)
        roles = set(got.roles)
        if grant.password is not None:
            await auth.UserChangePassword(rpc.AuthUserChangePasswordRequest(
                name=grant.user, password=grant.password), timeout=timeout)
            result.password_changed = True
    except grpc.aio.AioRpcError as exc:
        if "user name not found" not in (exc.details() or ""):
            raise
        if grant.password is None:
            raise InputError(f"etcd has no user {grant.user!r}: give its password to "
                             "create it (--user-password-file or "
                             "MESHXL_ETCD_USER_PASSWORD)") from None
        await auth.UserAdd(rpc.AuthUserAddRequest(name=grant.user, password=grant.password),
                           timeout=timeout)
        result.user_created = True
        roles = set()
    for role in grant.roles():
        if role not in roles:
            await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user=grant.user, role=role),
                                     timeout=timeout)
