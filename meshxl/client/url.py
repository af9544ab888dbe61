"""The sidecar's address, checked once: ``http://HOST:PORT`` or ``unix:/PATH`` (the
sidecar's ``--listen unix:PATH``)."""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

from meshxl.errors import InputError

__all__ = ["MAX_UNIX_PATH", "base_url", "check_cluster", "cluster_path", "split_url",
           "unix_path"]

MAX_UNIX_PATH = 107
"""Bytes of a Unix socket's path at most: ``sun_path`` is 108 bytes with its NUL (Linux)."""


def unix_path(url: str) -> str | None:
    """The socket path of ``unix:/run/meshxl/statesync.sock`` (None for any other URL);
    InputError for a path no socket can have: relative, with a NUL, or too long."""
    text = url.strip()
    if text[:5].lower() != "unix:":
        return None
    path = text[5:]
    example = "e.g. unix:/run/meshxl/statesync.sock"
    if not path.startswith("/"):
        raise InputError(f"bad sidecar URL {url!r}: a Unix socket's path must be absolute, "
                         f"{example}")
    if "\0" in path:
        raise InputError(f"bad sidecar URL {url!r}: a Unix socket's path cannot hold a NUL")
    try:
        size = len(os.fsencode(path))
    except UnicodeError as exc:
        raise InputError(f"bad sidecar URL {url!r}: {exc}") from None
    if size > MAX_UNIX_PATH:
        raise InputError(f"bad sidecar URL {url[:60]!r}...: a Unix socket's path is at most "
                         f"{MAX_UNIX_PATH} bytes, this one {size}")
    return path


def split_url(url: str) -> tuple[str, str, int, str]:
    """``http://127.0.0.1:7070`` -> ``("http", "127.0.0.1", 7070, "")``; InputError for
    anything but an http(s) URL with a host and no query or fragment (a ``unix:`` URL
    is :func:`unix_path`'s)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except (AttributeError, ValueError) as exc:
        raise InputError(f"bad sidecar URL {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"bad sidecar URL {url!r}: expected http://HOST:PORT, "
                         "e.g. http://127.0.0.1:7070, or unix:/PATH")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise InputError(f"bad sidecar URL {url!r}: no query, fragment or credentials "
                         "(the token is given apart)")
    if not parts.path.isprintable() or " " in parts.path:
        raise InputError(f"bad sidecar URL {url!r}: its path holds a space or a control "
                         "character")
    default = 443 if parts.scheme == "https" else 80
    return parts.scheme, parts.hostname, port or default, parts.path.rstrip("/")


def base_url(url: str) -> str:
    """The URL requests' paths are appended to (no trailing slash); ``unix:/PATH`` as
    given."""
    path = unix_path(url)
    if path is not None:
        return f"unix:{path}"
    scheme, host, port, prefix = split_url(url)
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}{prefix}"


_CLUSTER = re.compile(r"[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?")
"""A cluster's (or virtual system's) name, as the model spells it."""


def check_cluster(cluster: str | None) -> str | None:
    """``cluster`` if it is a cluster's name (or None), else InputError naming it."""
    if cluster is not None and not _CLUSTER.fullmatch(cluster):
        raise InputError(f"invalid cluster name {cluster[:80]!r}: 1-63 lowercase letters, "
                         "digits, '.', '_' or '-', starting and ending with a letter or digit")
    return cluster


def cluster_path(cluster: str | None, path: str) -> str:
    """A request's path on a sidecar hosting several clusters: the cluster's API is the
    single-cluster API under ``/v1/clusters/{cluster}`` (``/v1/sessions/s1`` ->
    ``/v1/clusters/web/sessions/s1``, ``/readyz`` -> ``/v1/clusters/web/readyz``). Without
    a cluster, ``path`` as it is."""
    if cluster is None:
        return path
    if path.startswith("/v1/"):
        return f"/v1/clusters/{cluster}/{path[4:]}"
    return f"/v1/clusters/{cluster}{path}"
