"""The etcd users' passwords, for an etcd that cannot tell meshxl's clients apart by
their certificates: one reached through a bridge that presents one certificate for
all (the external-etcd overlay, docs/security.md, "etcd: passwords behind a bridge").

A password is made at random (:func:`new_password`) and kept in a directory, one entry
per etcd user (:class:`PasswordDir`: ``DIR/USER/username`` and ``DIR/USER/password``,
the first line of each, which is how a ``kubernetes.io/basic-auth`` Secret is mounted),
read by ``meshxl etcd setup --password-dir DIR`` and written as those Secrets
(:func:`secret_manifest`), each named after its user. Nothing here logs or prints a
password: callers say which users they made, kept or replaced, by name.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import secrets
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshxl.errors import InputError

from .connect import EtcdSecurityError, read_secret_file

__all__ = ["PASSWORD_BYTES", "Made", "PasswordDir", "new_password", "secret_manifest"]

PASSWORD_BYTES = 32
"""Random bytes in a password made here (43 URL-safe characters, 256 bits)."""
_ENTRY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def new_password() -> str:
    """A random password: :data:`PASSWORD_BYTES` from the system's CSPRNG, URL-safe
    base64 (no character a shell, YAML or etcdctl's ``--interactive=false`` reads
    specially)."""
    return secrets.token_urlsafe(PASSWORD_BYTES)


@dataclass
class Made:
    """What :meth:`PasswordDir.ensure` did, user by user (names only)."""

    made: list[str] = field(default_factory=list)
    """Users that had no password: one was made."""
    replaced: list[str] = field(default_factory=list)
    """Users whose password was replaced by a new one (rotated)."""
    kept: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"made": self.made, "replaced": self.replaced, "kept": self.kept}


@dataclass(frozen=True)
class PasswordDir:
    """``DIR/USER/password`` (and ``DIR/USER/username``) for each etcd user."""

    root: Path

    def entry(self, user: str) -> Path:
        """The directory of ``user``'s files; an InputError for a name that cannot be one
        (a ``/``, a leading dot)."""
        if not _ENTRY.match(user):
            raise InputError(f"etcd user {user!r} cannot name a password entry (letters, "
                             "digits, '.', '_', '@', '-'; not starting with '.')")
        return self.root / user

    def file(self, user: str) -> Path:
        return self.entry(user) / "password"

    def read(self, user: str) -> str:
        """``user``'s password, or a one-line error naming the file (and, if the entry
        has a ``username`` file, one naming another user)."""
        entry = self.entry(user)
        name = entry / "username"
        if name.exists() and read_secret_file(name, "etcd user name file") != user:
            raise EtcdSecurityError(f"{name} names another etcd user than {user!r}")
        if not (entry / "password").exists():
            raise EtcdSecurityError(f"no password for etcd user {user!r}: {entry}/password "
                                    "(meshxl etcd passwords makes them)")
        return read_secret_file(entry / "password", f"the password file of etcd user {user!r}")

    def read_all(self, users: Iterable[str]) -> dict[str, str]:
        return {user: self.read(user) for user in users}

    def ensure(self, users: Iterable[str], rotate: Collection[str] = ()) -> Made:
        """A password for each of ``users``: kept if its file has one, made otherwise;
        those in ``rotate`` replaced by a new one. The directory and its entries are
        its owner's alone (0700), each file written whole (0600, renamed into place)."""
        done = Made()
        _private_dir(self.root)
        for user in users:
            entry = self.entry(user)
            present = (entry / "password").exists()
            if present and user not in rotate:
                self.read(user)  # readable, not empty, its own
                done.kept.append(user)
                continue
            _private_dir(entry)
            _write_private(entry / "username", user)
            _write_private(entry / "password", new_password())
            (done.replaced if present else done.made).append(user)
        return done


def secret_manifest(user: str, password: str, namespace: str | None = None) -> dict[str, Any]:
    """The ``kubernetes.io/basic-auth`` Secret of ``user``, named after it: what the
    injector mounts into a cluster's sidecars (``meshxl-cluster-CLUSTER``) and the
    control plane reads (``meshxl-system``)."""
    if len(user) > 253 or not _DNS_SUBDOMAIN.match(user):
        raise InputError(f"etcd user {user!r} is no Kubernetes Secret name (lowercase "
                         "letters, digits, '-' and '.'): name its cluster so")
    metadata: dict[str, Any] = {"name": user,
                                "labels": {"app.kubernetes.io/part-of": "meshxl"}}
    if namespace:
        metadata["namespace"] = namespace

    def encoded(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/basic-auth",
            "metadata": metadata,
            "data": {"username": encoded(user), "password": encoded(password)}}


def _private_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.chmod(0o700)
    except OSError as exc:
        raise EtcdSecurityError(f"cannot make {path}: {exc.strerror or exc}") from None


def _write_private(path: Path, text: str) -> None:
    """``text`` and a newline into ``path``, mode 0600, replaced in one rename."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text + "\n")
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise EtcdSecurityError(f"cannot write {path}: {exc.strerror or exc}") from None
