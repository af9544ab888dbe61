"""An installation's etcd users and roles, least privilege by default (``meshxl etcd
setup``, docs/security.md, "etcd: least privilege by default").

From the model: every cluster, pool and virtual system gets the role
``meshxl-cluster-{cluster}`` (:func:`.roles.cluster_permissions`: its own sessions and
registrations, read of the mesh; a pool's also its members' liveness keys,
:func:`.roles.pool_permissions`) and a user of the same name holding that role and no
other (a pool's user also its virtual systems' roles: the pool's sidecars host
them); the control plane's and the operators' users get the role ``meshxl``
(read-write on the whole prefix: the model, admin state, the shard map); ``root``
holds etcd's ``root`` role. The users have no password: with ``--client-cert-auth``
etcd takes the user from a client certificate's common name, so a sidecar proves
its cluster with the certificate ``meshxl-etcd-{cluster}`` (CN
``meshxl-cluster-{cluster}``) the injector mounts, and a certificate whose common name
is no user (the shared ``meshxl-statesync`` of older installations) gets nothing.
Idempotent; authentication is turned on last (``enable_auth``), once every user that
must keep working exists.

With ``passwords`` (``--password-dir``: an etcd behind a bridge that presents one
certificate for every client, where a certificate cannot say who is asking) each user
gets its password instead, and a client proves its user by etcd's Authenticate RPC: a
user is created with its password, and an existing one whose password etcd does not
accept is given it (a user made without a password, which etcd never lets log in with
one, is made again with the same roles). ``root`` keeps the password it has; its entry
is used only to create it.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aetcd import rpc

from meshxl.errors import InputError, Unavailable

from .roles import Grant, GrantResult, Range, apply_roles, etcdctl_commands, role_name

__all__ = ["CONTROL_PLANE_ROLE", "DEFAULT_CONTROL_PLANE_USERS", "Setup", "SetupResult",
           "apply_setup", "cluster_user", "setup_commands"]

CONTROL_PLANE_ROLE = "meshxl"
"""Read-write on the whole prefix: the control plane and the operator commands."""
DEFAULT_CONTROL_PLANE_USERS = ("meshxl-system",)
"""The common name of the overlays' certificate for meshxl's own pods."""


def cluster_user(cluster: str) -> str:
    """The etcd user (and client certificate common name) of a cluster's sidecars."""
    return role_name(cluster)


@dataclass(frozen=True)
class Setup:
    """The users and roles of an installation: one per cluster, the control plane's."""

    clusters: tuple[str, ...]
    control_plane_users: tuple[str, ...] = DEFAULT_CONTROL_PLANE_USERS
    root: str = "/meshxl"
    enable_auth: bool = False
    pools: tuple[str, ...] = ()
    """The pools among them: their roles also write their members' liveness keys
    (:func:`.roles.pool_permissions`), which no virtual system's role may."""
    hosted: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """(pool, its virtual systems' names): a pool's user also holds the role of each
    virtual system it hosts, so a pool sidecar that talks to etcd with its own
    certificate alone serves them all (``--etcd-credentials-dir`` narrows each virtual
    system to its own user instead). A virtual system's user never holds the pool's."""
    passwords: Mapping[str, str] | None = field(default=None, repr=False, compare=False)
    """Each user's password (``root``'s optional: used only to create it); None: the
    users have none, and etcd takes them from client certificates' common names."""

    def __post_init__(self) -> None:
        self.grant()  # the clusters' and pools' names checked
        if self.passwords is not None:
            missing = [u for u in self.users() if u != "root" and not self.passwords.get(u)]
            if missing:
                raise InputError(f"no password for etcd user {missing[0]!r}"
                                 + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                                    else ""))
        for user in self.control_plane_users:
            if not user or not user.isprintable() or " " in user:
                raise InputError(f"invalid etcd user name {user!r}")
            if user == "root" or user in {cluster_user(c) for c in self.names}:
                raise InputError(f"--control-plane-user {user!r} is a user meshxl etcd "
                                 "setup manages otherwise")

    @property
    def names(self) -> tuple[str, ...]:
        """Every cluster, virtual system and pool: each has a user of its own."""
        return (*self.clusters, *self.pools)

    def grant(self) -> Grant:
        return Grant(self.clusters, root=self.root, pools=self.pools)

    def control_plane_permissions(self) -> list[Range]:
        return [Range(self.root.rstrip("/") + "/", "readwrite",
                      why="everything of meshxl: the model, admin state, the shard map")]

    def users(self) -> dict[str, tuple[str, ...]]:
        """Each user this setup manages and the roles it holds: its own (a pool's user
        also its virtual systems')."""
        users: dict[str, tuple[str, ...]] = {cluster_user(c): (role_name(c),)
                                             for c in self.names}
        for pool, systems in self.hosted:
            if pool in self.pools:
                users[cluster_user(pool)] = (role_name(pool), *(
                    role_name(vs) for vs in systems if vs in self.clusters))
        users.update({u: (CONTROL_PLANE_ROLE,) for u in self.control_plane_users})
        users["root"] = ("root",)
        return users


@dataclass
class SetupResult:
    roles: GrantResult
    users_created: list[str] = field(default_factory=list)
    roles_given: int = 0
    roles_taken: int = 0
    auth_enabled: bool = False
    passwords_set: list[str] = field(default_factory=list)
    """Existing users given their password (names only)."""

    def as_dict(self) -> dict[str, Any]:
        return {"roles_created": self.roles.roles_created,
                "permissions_granted": self.roles.permissions_granted,
                "permissions_revoked": self.roles.permissions_revoked,
                "users_created": self.users_created, "roles_given": self.roles_given,
                "roles_taken": self.roles_taken, "auth_enabled": self.auth_enabled,
                "passwords_set": self.passwords_set}


def setup_commands(setup: Setup, password_dir: Path | None = None) -> list[str]:
    """The same setup as ``etcdctl`` commands (``--dry-run``); with ``password_dir``
    each user's password is read from its file by etcdctl (never on the command line)."""
    lines = etcdctl_commands(setup.grant())
    lines.append(f"etcdctl role add {CONTROL_PLANE_ROLE}")
    for r in setup.control_plane_permissions():
        lines.append(f"etcdctl role grant-permission {CONTROL_PLANE_ROLE} {r.access} "
                     f"{shlex.quote(r.key)} --prefix")
    for user, roles in setup.users().items():
        if password_dir is None:
            lines.append(f"etcdctl user add {shlex.quote(user)} --no-password")
        else:
            source = shlex.quote(str(password_dir / user / "password"))
            lines.append(f"etcdctl user add {shlex.quote(user)} --interactive=false "
                         f"< {source}")
        for role in roles:
            lines.append(f"etcdctl user grant-role {shlex.quote(user)} {shlex.quote(role)}")
    if setup.enable_auth:
        lines.append("etcdctl auth enable")
    return lines


async def apply_setup(channel: grpc.aio.Channel, setup: Setup,
                      timeout: float = 10.0) -> SetupResult:
    """Make the setup true in etcd: the roles exactly as listed, each user present and
    holding its roles and no other, then (``enable_auth``) authentication on. Needs
    etcd's root user once authentication is on."""
    roles = {**setup.grant().roles(), CONTROL_PLANE_ROLE: setup.control_plane_permissions()}
    result = SetupResult(await apply_roles(channel, roles, timeout))
    auth = rpc.AuthStub(channel)
    sidecars = {cluster_user(c) for c in setup.names}
    passwords = setup.passwords
    try:
        for user, wanted in setup.users().items():
            password = passwords.get(user) if passwords is not None else None
            try:
                got = await auth.UserGet(rpc.AuthUserGetRequest(name=user), timeout=timeout)
                held = set(got.roles)
            except grpc.aio.AioRpcError as exc:
                if "user name not found" not in (exc.details() or ""):
                    raise
                if passwords is not None and password is None:
                    raise InputError(f"etcd has no user {user!r}: give its password to "
                                     "create it (its entry in --password-dir)") from None
                await _add_user(auth, user, password, timeout)
                result.users_created.append(user)
                held = set()
            else:
                if password is not None and user != "root":
                    login = await _login(auth, user, password, timeout)
                    if login is not True:
                        held = await _give_password(auth, user, password, held,
                                                    auth_on=login is False, timeout=timeout)
                        result.passwords_set.append(user)
            for role in wanted:
                if role not in held:
                    await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(
                        user=user, role=role), timeout=timeout)
                    result.roles_given += 1
            # A cluster's user holds its own roles only (an older broad grant revoked).
            for other in sorted(held - set(wanted)) if user in sidecars else ():
                await auth.UserRevokeRole(rpc.AuthUserRevokeRoleRequest(
                    name=user, role=other), timeout=timeout)
                result.roles_taken += 1
        if setup.enable_auth:
            await auth.AuthEnable(rpc.AuthEnableRequest(), timeout=timeout)
            result.auth_enabled = True
    except grpc.aio.AioRpcError as exc:
        details = (exc.details() or str(exc.code())).removeprefix("etcdserver: ")
        if exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION,
                          grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
            raise InputError(f"etcd refused the setup: {details} (run it as etcd's root "
                             "user)") from None
        raise Unavailable(f"etcd request failed: {details}") from None
    return result


async def _add_user(auth: Any, user: str, password: str | None, timeout: float) -> None:
    if password is None:
        request = rpc.AuthUserAddRequest(name=user, options=rpc.UserAddOptions(
            no_password=True))
    else:
        request = rpc.AuthUserAddRequest(name=user, password=password)
    await auth.UserAdd(request, timeout=timeout)


async def _login(auth: Any, user: str, password: str, timeout: float) -> bool | None:
    """Whether etcd lets ``user`` log in with ``password``; None while authentication is
    off (etcd cannot be asked then)."""
    try:
        await auth.Authenticate(rpc.AuthenticateRequest(name=user, password=password),
                                timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        details = exc.details() or ""
        if "authentication is not enabled" in details:
            return None
        if "authentication failed" in details:
            return False
        raise
    return True


async def _give_password(auth: Any, user: str, password: str, held: set[str], *,
                         auth_on: bool, timeout: float) -> set[str]:
    """Give an existing ``user`` its password; the roles it holds after. With
    authentication on, its password is changed (etcd drops its tokens: its clients
    log in again, reading their password file anew), unless it was made without one,
    which etcd keeps so whatever the password: then, as while authentication is off (no
    client holds a token), it is made again with no role (the caller grants its own)."""
    if auth_on:
        await auth.UserChangePassword(rpc.AuthUserChangePasswordRequest(
            name=user, password=password), timeout=timeout)
        if await _login(auth, user, password, timeout):
            return held
    await auth.UserDelete(rpc.AuthUserDeleteRequest(name=user), timeout=timeout)
    await _add_user(auth, user, password, timeout)
    return set()
