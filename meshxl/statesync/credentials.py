"""Each hosted cluster's own etcd credentials (``--etcd-credentials-dir DIR``).

``DIR/<cluster>/username`` and ``DIR/<cluster>/password`` (first line of each): the
layout of a Kubernetes Secret of type ``kubernetes.io/basic-auth`` mounted at
``DIR/<cluster>`` for each virtual system. A cluster with an entry talks to etcd as
that user (its own etcd client, :meth:`~.hosting.Hosting.client_for`), so etcd itself
refuses it every other cluster's keys (``meshxl etcd grant CLUSTER --user NAME``); a
cluster without one uses the process's ``--etcd-user`` (or none). The entry is read
when the cluster starts: a virtual system added to a pool later picks up its own. Its
files are read again whenever the cluster's client authenticates anew (etcd refused its
token: after a password change, etcd drops the user's tokens), so a rotated password
takes effect without a restart; while etcd refuses the files' new password, the last
one that worked is used (:class:`~meshxl.etcd.auth.TokenAuth`). TLS settings stay the
process's. The injector mounts a pod's cluster's Secret at ``DIR/CLUSTER`` (the
external-etcd overlay, docs/kubernetes.md), so one sidecar's entry is its own.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from meshxl.etcd import EtcdSecurity, EtcdSecurityError
from meshxl.etcd.connect import read_secret_file

__all__ = ["check_credentials_dir", "cluster_security"]


def check_credentials_dir(directory: Path) -> None:
    """A one-line error unless ``directory`` is a readable directory."""
    if not directory.is_dir():
        raise EtcdSecurityError(f"--etcd-credentials-dir {directory}: not a directory")
    try:
        next(directory.iterdir(), None)
    except OSError as exc:
        raise EtcdSecurityError(f"--etcd-credentials-dir {directory}: cannot read it: "
                                f"{exc.strerror or exc}") from None


def cluster_security(directory: Path | None, cluster: str,
                     base: EtcdSecurity | None) -> EtcdSecurity | None:
    """``cluster``'s etcd settings: ``base`` (the process's) with the user and password
    of ``directory/cluster`` if that entry exists; a one-line error naming the cluster
    and the file if the entry is unreadable or incomplete."""
    if directory is None:
        return base
    entry = directory / cluster
    if not entry.exists() and not entry.is_symlink():
        return base
    if not entry.is_dir():
        raise EtcdSecurityError(f"etcd credentials of cluster {cluster}: {entry} is not a "
                                f"directory (want {entry}/username and {entry}/password)")
    user = read_secret_file(entry / "username", f"the etcd user name file of cluster {cluster}")
    password = read_secret_file(entry / "password",
                                f"the etcd password file of cluster {cluster}")
    return dataclasses.replace(base or EtcdSecurity(), user=user, password=password,
                               user_file=entry / "username", password_file=entry / "password")
