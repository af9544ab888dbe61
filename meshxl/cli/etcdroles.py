"""``meshxl etcd setup``, ``meshxl etcd passwords`` and ``meshxl etcd grant``: the
installation's etcd users and roles from the model, a role and a user per cluster
(docs/security.md, "etcd: least privilege by default"), with passwords where a
certificate cannot name the user (an etcd behind a bridge: "etcd: passwords behind a
bridge"), and a per-cluster etcd role for each cluster named (and a user holding them),
so that etcd itself keeps one cluster's sidecars out of another's sessions
(docs/security.md, "etcd: a role per cluster")."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from .errors import fail, run
from .options import etcd_client, etcd_option, output_option, print_json, root_option


@click.group()
def etcd() -> None:
    """etcd administration for meshxl (users and roles per cluster)."""


def _user_password(password_file: Path | None) -> str | None:
    from meshxl.etcd import read_secret_file

    from_env = os.environ.get("MESHXL_ETCD_USER_PASSWORD") or None
    if password_file is not None:
        if from_env is not None:
            fail("give the user's password once: --user-password-file or "
                 "MESHXL_ETCD_USER_PASSWORD, not both")
        return str(read_secret_file(password_file, "user password file"))
    return from_env


@etcd.command("grant")
@click.argument("clusters", nargs=-1)
@click.option("--pool", "pools", metavar="NAME", multiple=True,
              help="A pool whose role to make (repeatable): a cluster's, and read-write "
                   "on the pool's keys where its members prove themselves live, which no "
                   "virtual system's role may write. For the pool's own sidecars only.")
@click.option("--user", metavar="NAME", default=None,
              help="The etcd user the sidecars of these clusters connect as: created if "
                   "missing (its password from --user-password-file or "
                   "MESHXL_ETCD_USER_PASSWORD) and given each cluster's role.")
@click.option("--user-password-file", type=click.Path(dir_okay=False, path_type=Path),
              envvar="MESHXL_ETCD_USER_PASSWORD_FILE", default=None, metavar="FILE",
              help="File whose first line is --user's password (to create the user, or "
                   "to change its password).")
@click.option("--dry-run", is_flag=True,
              help="Print the same grant as etcdctl commands; change nothing.")
@output_option
@etcd_option
@root_option
def etcd_grant(clusters: tuple[str, ...], pools: tuple[str, ...], user: str | None,
               user_password_file: Path | None, dry_run: bool, output: str, etcd_urls: str,
               etcd_root: str) -> None:
    """Create the role meshxl-cluster-CLUSTER for each CLUSTER (a cluster or a virtual
    system): read-write on that cluster's sessions, deletion records, registrations,
    sync statistics and problems, read-only on the mesh (model, registrations), its
    failover records and member history, and nothing else; the same for each --pool,
    with its members' liveness keys besides; then grant the roles to --user. Run it
    with the root user's credentials (--etcd-user root)."""
    from meshxl.errors import InputError
    from meshxl.etcd.roles import Grant, apply_grant, etcdctl_commands

    password = _user_password(user_password_file) if user is not None else None
    if user is None and user_password_file is not None:
        fail("--user-password-file needs --user")
    try:
        grant = Grant(tuple(clusters), user=user, password=password, root=etcd_root,
                      pools=tuple(pools))
    except InputError as exc:
        fail(str(exc))
    if dry_run:
        lines = etcdctl_commands(grant)
        if output == "json":
            print_json({"commands": lines, "roles": {
                role: [{"key": r.key, "prefix": r.prefix, "access": r.access, "why": r.why}
                       for r in ranges] for role, ranges in grant.roles().items()}})
        else:
            click.echo("\n".join(lines))
        return

    async def go() -> Any:
        async with etcd_client(etcd_urls) as client:
            return await apply_grant(client.channel, grant)

    result = run(go)
    if output == "json":
        print_json(result.as_dict())
        return
    for role in grant.roles():
        click.echo(f"role {role}: " + ("created" if role in result.roles_created
                                       else "up to date"))
    click.echo(f"permissions granted {result.permissions_granted}, revoked "
               f"{result.permissions_revoked}")
    if user is not None:
        click.echo(f"user {user}: " + ("created, " if result.user_created else
                                       "password changed, " if result.password_changed
                                       else "") + f"given {len(grant.roles())} role(s)")


def _setup_of(model: Path, control_plane_users: tuple[str, ...], etcd_root: str,
              enable_auth: bool = False, passwords: Any = None) -> Any:
    """The :class:`~meshxl.etcd.setup.Setup` of a model file (a one-line exit on bad
    input)."""
    from meshxl.errors import InputError
    from meshxl.etcd.setup import DEFAULT_CONTROL_PLANE_USERS, Setup
    from meshxl.model import load_model

    from .errors import checked

    spec = checked(lambda: load_model(model))
    virtual = spec.virtual_names
    names = [c.name for c in spec.clusters if c.name not in virtual] + [
        name for vs in spec.virtual_systems for name in vs.all_names]
    pools = [p.name for p in spec.pools]
    hosted = tuple((p, tuple(name for vs in spec.virtual_systems if vs.pool == p
                             for name in vs.all_names)) for p in pools)
    if not names and not pools:
        fail(f"{model}: the model has no cluster, pool or virtual system")
    try:
        return Setup(tuple(names), control_plane_users or DEFAULT_CONTROL_PLANE_USERS,
                     root=etcd_root, enable_auth=enable_auth, pools=tuple(pools),
                     hosted=hosted, passwords=passwords)
    except InputError as exc:
        fail(str(exc))


_control_plane_option = click.option(
    "--control-plane-user", "control_plane_users", metavar="NAME", multiple=True,
    help="A user of the control plane or an operator, given read-write on the whole "
         "prefix (the role meshxl); repeatable. Default: meshxl-system, the common name "
         "of the overlays' certificate for meshxl's own pods.")


@etcd.command("setup")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@_control_plane_option
@click.option("--enable-auth", is_flag=True,
              help="Turn etcd's authentication on once the users exist: from then on a "
                   "certificate (or user) that is none of them gets nothing.")
@click.option("--password-dir", type=click.Path(file_okay=False, path_type=Path),
              envvar="MESHXL_ETCD_PASSWORD_DIR", metavar="DIR", default=None,
              help="Give each user a password, from DIR/USER/password (meshxl etcd "
                   "passwords makes them; a basic-auth Secret per user mounted at "
                   "DIR/USER): for an etcd reached through a bridge that presents one "
                   "certificate for every client (the external-etcd overlay). Users "
                   "are created with it, or given it if etcd does not accept it; root "
                   "keeps its own (DIR/root/password only creates it).")
@click.option("--dry-run", is_flag=True,
              help="Print the same setup as etcdctl commands; change nothing.")
@output_option
@etcd_option
@root_option
def etcd_setup(model: Path, control_plane_users: tuple[str, ...], enable_auth: bool,
               password_dir: Path | None, dry_run: bool, output: str, etcd_urls: str,
               etcd_root: str) -> None:
    """The etcd users and roles of an installation, from MODEL (a model file): for each
    cluster, pool and virtual system, the role meshxl-cluster-NAME (as `meshxl etcd
    grant`, a pool's with --pool) and a user of that name holding it and no other
    role; the role meshxl (read-write on the prefix) for each --control-plane-user;
    root. Without --password-dir the users have no password: etcd takes them from
    client certificates' common names. Idempotent; run it again after adding a
    cluster. Run it as etcd's root user. No password is ever printed."""
    from meshxl.etcd.passwords import PasswordDir
    from meshxl.etcd.setup import apply_setup, setup_commands

    from .errors import checked

    setup = _setup_of(model, control_plane_users, etcd_root, enable_auth)
    if dry_run:
        lines = setup_commands(setup, password_dir)
        if output == "json":
            print_json({"commands": lines, "users": setup.users()})
        else:
            click.echo("\n".join(lines))
        return
    if password_dir is not None:
        directory = PasswordDir(password_dir)
        users = [u for u in setup.users() if u != "root"]
        passwords = checked(lambda: directory.read_all(users))
        if checked(lambda: directory.file("root")).exists():
            passwords["root"] = checked(lambda: directory.read("root"))
        setup = _setup_of(model, control_plane_users, etcd_root, enable_auth, passwords)

    async def go() -> Any:
        async with etcd_client(etcd_urls) as client:
            return await apply_setup(client.channel, setup)

    result = run(go)
    if output == "json":
        print_json(result.as_dict())
        return
    click.echo(f"roles: {len(setup.grant().roles()) + 1}, created "
               f"{len(result.roles.roles_created)}; "
               f"permissions granted {result.roles.permissions_granted}, revoked "
               f"{result.roles.permissions_revoked}")
    click.echo(f"users: {len(setup.users())}, created {len(result.users_created)}; roles "
               f"given {result.roles_given}, taken {result.roles_taken}")
    if password_dir is not None:
        click.echo("passwords: " + (f"set for {', '.join(result.passwords_set)}"
                                    if result.passwords_set else "all current"))
    click.echo("authentication: " + ("enabled" if result.auth_enabled else
                                     "unchanged (--enable-auth to turn it on)"))


@etcd.command("passwords")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dir", "directory", required=True, metavar="DIR",
              type=click.Path(file_okay=False, path_type=Path),
              help="Where the passwords are kept: DIR/USER/password and DIR/USER/username "
                   "(made 0700, files 0600), what meshxl etcd setup --password-dir reads.")
@_control_plane_option
@click.option("--user", "users", metavar="NAME", multiple=True,
              help="Only this etcd user (meshxl-cluster-CLUSTER, meshxl-system...); "
                   "repeatable. Default: every user of the model but root.")
@click.option("--rotate", is_flag=True,
              help="Replace the passwords of the users (every one, or each --user) with "
                   "new ones; without it a user's existing password is kept.")
@click.option("--secrets", "secrets_out", metavar="FILE", default=None,
              help="Also write each user's Kubernetes Secret (kubernetes.io/basic-auth, "
                   "named after the user: meshxl-cluster-CLUSTER for the injector, "
                   "meshxl-system for the control plane) to FILE (0600), '-' for "
                   "standard output (for kubectl create -f - or kubectl replace -f -).")
@click.option("--namespace", metavar="NS", default=None,
              help="The Secrets' namespace (default: none, kubectl -n decides).")
@output_option
@root_option
def etcd_passwords(model: Path, directory: Path, control_plane_users: tuple[str, ...],
                   users: tuple[str, ...], rotate: bool, secrets_out: str | None,
                   namespace: str | None, output: str, etcd_root: str) -> None:
    """Make (or with --rotate replace) a random password for each etcd user of MODEL's
    installation that meshxl etcd setup manages, kept in DIR, and write them as
    Kubernetes Secrets. Talks to no etcd: run `meshxl etcd setup MODEL --password-dir
    DIR` to give etcd the passwords. No password is printed, except inside the
    Secrets written to standard output with --secrets -."""
    import json

    import yaml

    from meshxl.etcd.passwords import PasswordDir, secret_manifest

    from .errors import checked

    setup = _setup_of(model, control_plane_users, etcd_root)
    every = [u for u in setup.users() if u != "root"]
    unknown = sorted(set(users) - set(every))
    if unknown:
        fail(f"{unknown[0]!r} is no etcd user of this installation (its users: "
             f"{', '.join(every)})")
    chosen = [u for u in every if u in users] if users else every
    store = PasswordDir(directory)
    done = checked(lambda: store.ensure(chosen, rotate=chosen if rotate else ()))
    if secrets_out is not None:
        manifests = checked(lambda: [secret_manifest(u, store.read(u), namespace)
                                     for u in chosen])
        text = yaml.safe_dump_all(manifests, sort_keys=False)
        if secrets_out == "-":
            click.echo(text, nl=False)
        else:
            checked(lambda: _write_secrets(Path(secrets_out), text))
    to_stderr = secrets_out == "-"  # standard output holds the Secrets
    if output == "json":
        click.echo(json.dumps({**done.as_dict(), "directory": str(directory),
                               "secrets": secrets_out}, sort_keys=True), err=to_stderr)
        return
    for word, names in (("made", done.made), ("replaced", done.replaced),
                        ("kept", done.kept)):
        if names:
            click.echo(f"passwords {word}: {', '.join(names)}", err=to_stderr)
    if secrets_out not in (None, "-"):
        click.echo(f"Secrets written to {secrets_out}", err=to_stderr)


def _write_secrets(path: Path, text: str) -> None:
    """The Secrets' YAML into ``path``, readable by its owner alone."""
    from meshxl.etcd import EtcdSecurityError

    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
    except OSError as exc:
        raise EtcdSecurityError(f"cannot write {path}: {exc.strerror or exc}") from None


COMMANDS: list[click.Command] = [etcd]
