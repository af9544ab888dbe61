"""Passwords for the etcd users of an installation behind a bridge (the external-etcd
overlay): made at random and kept one file per user (``meshxl etcd passwords``), given
to etcd by ``meshxl etcd setup --password-dir``, written as Kubernetes Secrets, and
never printed or put on a command line."""

from __future__ import annotations

import base64
import re
import stat
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from meshxl.cli import main
from meshxl.errors import InputError
from meshxl.etcd import EtcdSecurityError
from meshxl.etcd.passwords import PasswordDir, new_password, secret_manifest
from meshxl.etcd.setup import Setup, setup_commands

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
  - names: [t01]
    pool: web
"""
USERS = ["meshxl-cluster-orders", "meshxl-cluster-t01", "meshxl-cluster-web", "meshxl-system"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_passwords_are_made_once_kept_and_rotated_one_by_one(tmp_path: Path) -> None:
    store = PasswordDir(tmp_path / "passwords")
    done = store.ensure(["a", "b"])
    assert (done.made, done.replaced, done.kept) == (["a", "b"], [], [])
    first = {u: store.read(u) for u in ("a", "b")}
    assert first["a"] != first["b"]
    for password in first.values():  # 256 random bits, URL-safe
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", password), password
    assert _mode(store.root) == 0o700 and _mode(store.entry("a")) == 0o700
    assert _mode(store.file("a")) == 0o600
    assert (store.entry("a") / "username").read_text() == "a\n"
    again = store.ensure(["a", "b"])
    assert again.kept == ["a", "b"] and {u: store.read(u) for u in "ab"} == first
    rotated = store.ensure(["a", "b"], rotate=["b"])
    assert (rotated.replaced, rotated.kept) == (["b"], ["a"])
    assert store.read("a") == first["a"] and store.read("b") != first["b"]
    assert not [p for p in store.entry("b").iterdir() if p.name.startswith(".")]


def test_a_missing_empty_or_foreign_entry_is_one_line_naming_it(tmp_path: Path) -> None:
    store = PasswordDir(tmp_path)
    with pytest.raises(EtcdSecurityError, match=r"no password for etcd user 'x': .*/x/password"):
        store.read("x")
    store.ensure(["x"])
    store.file("x").write_text("\n")
    with pytest.raises(EtcdSecurityError, match="is empty"):
        store.read("x")
    store.ensure(["y"])
    (store.entry("y") / "username").write_text("someone-else\n")
    with pytest.raises(EtcdSecurityError, match="names another etcd user than 'y'"):
        store.read("y")
    for bad in ("../x", ".hidden", "a/b", ""):
        with pytest.raises(InputError, match="cannot name a password entry"):
            store.entry(bad)


def test_secret_manifest_is_a_valid_basic_auth_secret_named_after_its_user() -> None:
    password = new_password()
    secret = secret_manifest("meshxl-cluster-orders", password, "shop")
    for version in ("1.29", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(secret, version, strict=True)
    assert secret["type"] == "kubernetes.io/basic-auth"
    assert secret["metadata"]["name"] == "meshxl-cluster-orders"
    assert secret["metadata"]["namespace"] == "shop"
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {
        "username": "meshxl-cluster-orders", "password": password}
    assert password not in yaml.safe_dump(secret)  # encoded, as the API server holds it
    with pytest.raises(InputError, match="is no Kubernetes Secret name"):
        secret_manifest("meshxl-cluster-my_cluster", password)


def test_the_command_makes_keeps_and_rotates_without_printing_one(tmp_path: Path) -> None:
    model = tmp_path / "model.yaml"
    model.write_text(MODEL)
    directory = tmp_path / "passwords"
    runner = CliRunner()
    result = runner.invoke(main, ["etcd", "passwords", str(model), "--dir", str(directory)])
    assert result.exit_code == 0, result.output
    store = PasswordDir(directory)
    passwords = {u: store.read(u) for u in USERS}
    (line,) = result.stdout.splitlines()
    assert line.startswith("passwords made: ")
    assert sorted(line.removeprefix("passwords made: ").split(", ")) == USERS
    assert not (directory / "root").exists()  # root is your etcd's
    # The Secrets in a file of their own (0600), every user's; names only on the screen.
    out = tmp_path / "secrets.yaml"
    result = runner.invoke(main, ["etcd", "passwords", str(model), "--dir", str(directory),
                                  "--secrets", str(out), "--namespace", "meshxl-system"])
    assert result.exit_code == 0, result.output
    assert _mode(out) == 0o600
    written = {d["metadata"]["name"]: d for d in yaml.safe_load_all(out.read_text())}
    assert set(written) == set(USERS)
    for user, secret in written.items():
        assert base64.b64decode(secret["data"]["password"]).decode() == passwords[user]
        assert secret["metadata"]["namespace"] == "meshxl-system"
    # One user rotated, its Secret alone on standard output; the summary on stderr.
    result = runner.invoke(main, ["etcd", "passwords", str(model), "--dir", str(directory),
                                  "--rotate", "--user", "meshxl-cluster-t01", "--secrets", "-"])
    assert result.exit_code == 0, result.output
    (secret,) = list(yaml.safe_load_all(result.stdout))
    assert secret["metadata"]["name"] == "meshxl-cluster-t01"
    assert result.stderr.strip() == "passwords replaced: meshxl-cluster-t01"
    now = {u: store.read(u) for u in USERS}
    assert now["meshxl-cluster-t01"] != passwords["meshxl-cluster-t01"]
    assert {u: p for u, p in now.items() if u != "meshxl-cluster-t01"} == {
        u: p for u, p in passwords.items() if u != "meshxl-cluster-t01"}
    for password in [*passwords.values(), *now.values()]:
        assert password not in result.stderr
    result = runner.invoke(main, ["etcd", "passwords", str(model), "--dir", str(directory),
                                  "--user", "meshxl-cluster-nope"])
    assert result.exit_code == 1
    assert result.stderr.startswith("meshxl: 'meshxl-cluster-nope' is no etcd user of this "
                                    "installation")


def test_setup_with_passwords_needs_every_users_and_shows_none(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no password for etcd user 'meshxl-cluster-b'"):
        Setup(("a", "b"), passwords={"meshxl-cluster-a": "x", "meshxl-system": "y"})
    setup = Setup(("a",), passwords={"meshxl-cluster-a": "pa55-a", "meshxl-system": "pa55-s"})
    assert "pa55" not in repr(setup)
    lines = setup_commands(setup, tmp_path)
    assert f"etcdctl user add meshxl-cluster-a --interactive=false < " \
           f"{tmp_path}/meshxl-cluster-a/password" in lines
    assert not [line for line in lines if "--no-password" in line or "pa55" in line]
    assert "etcdctl user add meshxl-cluster-a --no-password" in setup_commands(Setup(("a",)))


def test_setup_reads_every_password_before_it_talks_to_etcd(tmp_path: Path) -> None:
    model = tmp_path / "model.yaml"
    model.write_text(MODEL)
    directory = tmp_path / "passwords"
    PasswordDir(directory).ensure([u for u in USERS if u != "meshxl-cluster-web"])
    result = CliRunner().invoke(main, ["etcd", "setup", str(model), "--password-dir",
                                       str(directory), "--etcd", "http://127.0.0.1:9"])
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"meshxl: no password for etcd user 'meshxl-cluster-web': "
        f"{directory}/meshxl-cluster-web/password (meshxl etcd passwords makes them)")
    result = CliRunner().invoke(main, ["etcd", "setup", str(model), "--password-dir",
                                       str(directory), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "--interactive=false <" in result.stdout
