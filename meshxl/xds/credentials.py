"""Per-node and per-site ADS credentials: which node ids, and which locality zones, a
credential may speak for (``serve xds --credentials FILE``).

A credential is a bearer token (named in the file by its SHA-256, so the control plane
never holds the token itself) or a name of a client certificate (a DNS or URI subject
alternative name, verified against ``--client-ca`` during the handshake). Each says
which node ids it speaks for (shell-style patterns: ``*``, ``?``, ``[...]``), which
zones those nodes may declare (their ``node.locality.zone``; absent: any), and how many
node ids it may hold at once::

    credentials:
      - name: site-east
        token_sha256: 5e88...42d8        # printf %s "$TOKEN" | sha256sum
        nodes: ["edge-east-*"]
        zones: [east]
        max_nodes: 64                     # default: --max-nodes-per-credential
      - name: east-mesh
        san_uri: spiffe://cluster.local/ns/edge/sa/envoy-east
        nodes: ["*.edge"]
        zones: [east]

The file is read again when it changes (checked on new streams, at most once a second);
a file that does not parse keeps the last good one (logged), as the TLS files do.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from meshxl.bounded import load_yaml_all, read_text
from meshxl.errors import InputError
from meshxl.model import limits
from meshxl.nodeid import NODE_ID_MAX

from .nodes import NODE_CLUSTER_MAX, Peer

__all__ = ["ANONYMOUS", "CREDENTIALS_MAX_BYTES", "MAX_NODES", "MAX_NODES_PER_CREDENTIAL",
           "RESERVED_NAMES", "SHARED", "Credential",
           "Credentials", "CredentialsError", "CredentialsFile", "parse_credentials",
           "token_sha256"]

log = logging.getLogger(__name__)

MAX_NODES = 10_000
"""Node ids connected at once, at most, whatever their credentials (``--max-nodes``):
each has a status record in etcd. The only bound of the shared token and of a control
plane without authentication, whose every stream is one credential."""
MAX_NODES_PER_CREDENTIAL = 1_024
"""Node ids one credential speaks for at once, at most, unless its entry says
otherwise (``--max-nodes-per-credential``; a credentials entry's ``max_nodes``)."""
CREDENTIALS_MAX_BYTES = 4 * 1024 * 1024
"""Largest credentials file read (a line per node id for 10,000 nodes fits easily)."""
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FIELDS = ("name", "token_sha256", "san_dns", "san_uri", "nodes", "zones", "max_nodes")
_PROOFS = ("token_sha256", "san_dns", "san_uri")


class CredentialsError(InputError):
    """A credentials file that cannot be used; one line naming the file and the problem."""


def token_sha256(token: str) -> str:
    """How the file names a token: its SHA-256, in hexadecimal."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Credential:
    """What one credential may speak for. ``zones`` None: any zone (or none);
    ``max_nodes`` None: the server's bound for a credential (or, for :data:`SHARED` and
    :data:`ANONYMOUS`, only the bound on all nodes)."""

    name: str
    nodes: tuple[str, ...] = ("*",)
    zones: tuple[str, ...] | None = None
    max_nodes: int | None = None
    token_sha256: str | None = None
    san_dns: str | None = None
    san_uri: str | None = None

    def refusal(self, node_id: str, zone: str) -> str | None:
        """Why a stream under this credential may not claim ``node_id`` in ``zone``."""
        if not any(fnmatchcase(node_id, pattern) for pattern in self.nodes):
            shown = ", ".join(repr(p) for p in self.nodes[:4]) + (
                f" and {len(self.nodes) - 4} more" if len(self.nodes) > 4 else "")
            return (f"credential {self.name!r} may not speak for node id {node_id!r} "
                    f"(it speaks for {shown})")
        if self.zones is not None and zone not in self.zones:
            shown = ", ".join(repr(z) for z in self.zones[:8])
            return (f"credential {self.name!r} may not declare zone {zone!r} for node "
                    f"{node_id!r} (its zones: {shown}): set the node's locality zone "
                    "(meshxl bootstrap --site) to one of them")
        return None


SHARED = Credential("shared")
"""The shared ``--token-file`` token: any node id, any zone."""
ANONYMOUS = Credential("anonymous")
"""A stream the control plane asks nothing of (no token configured, no node binding)."""
RESERVED_NAMES = frozenset({SHARED.name, ANONYMOUS.name})


class Credentials:
    """The entries of a credentials file, indexed by what a stream presents."""

    def __init__(self, entries: Iterable[Credential]) -> None:
        self.entries = tuple(entries)
        self._tokens = {c.token_sha256: c for c in self.entries if c.token_sha256}
        self._dns = {c.san_dns: c for c in self.entries if c.san_dns}
        self._uris = {c.san_uri: c for c in self.entries if c.san_uri}

    @property
    def has_tokens(self) -> bool:
        return bool(self._tokens)

    @property
    def has_names(self) -> bool:
        """Whether some entry is a certificate name (those need ``--client-ca``)."""
        return bool(self._dns or self._uris)

    def for_token(self, token: str) -> Credential | None:
        """The entry of ``token`` (found by its digest), or None."""
        digest = token_sha256(token)
        found = self._tokens.get(digest)
        if found is None or not hmac.compare_digest(found.token_sha256 or "", digest):
            return None
        return found

    def for_peer(self, peer: Peer) -> tuple[Credential, ...]:
        """The entries naming one of the verified certificate's names, exactly."""
        found = [self._dns[n] for n in peer.dns if n in self._dns] + \
            [self._uris[u] for u in peer.uris if u in self._uris]
        return tuple(dict.fromkeys(found))


def _strings(value: Any, what: str, *, longest: int, empty: bool) -> tuple[str, ...]:
    if not isinstance(value, list) or (not value and not empty):
        raise ValueError(f"{what} must be a list of strings"
                         + ("" if empty else " (at least one)"))
    for item in value:
        if not isinstance(item, str) or len(item) > longest or \
                (item and not item.isprintable()) or (not item and not empty):
            raise ValueError(f"{what} holds {str(item)[:40]!r}: each must be printable text "
                             f"of at most {longest} characters")
    return tuple(value)


def _entry(raw: Any) -> Credential:
    if not isinstance(raw, dict):
        raise ValueError("must be a mapping")
    unknown = [k for k in raw if k not in _FIELDS]
    if unknown:
        raise ValueError(f"unknown field {str(unknown[0])[:40]!r} (fields: "
                         f"{', '.join(_FIELDS)})")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"name {str(name)[:40]!r}: lowercase letters, digits and '-', "
                         "1 to 63 characters")
    if name in RESERVED_NAMES:
        raise ValueError(f"name {name!r} is reserved (the shared token, no authentication)")
    proofs = [k for k in _PROOFS if raw.get(k) is not None]
    if len(proofs) != 1:
        raise ValueError("give exactly one of token_sha256, san_dns, san_uri")
    proof = raw[proofs[0]]
    if not isinstance(proof, str) or not proof or len(proof) > 1024 or \
            not proof.isprintable():
        raise ValueError(f"{proofs[0]} must be printable text of 1 to 1024 characters")
    if proofs[0] == "token_sha256" and not _SHA256.match(proof):
        raise ValueError("token_sha256 must be 64 hexadecimal digits, lowercase (printf %s "
                         "\"$TOKEN\" | sha256sum)")
    if "nodes" not in raw:
        raise ValueError("nodes is required: the node ids (patterns) it speaks for")
    nodes = _strings(raw["nodes"], "nodes", longest=NODE_ID_MAX, empty=False)
    zones = None if raw.get("zones") is None else _strings(
        raw["zones"], "zones", longest=NODE_CLUSTER_MAX, empty=True)
    max_nodes = raw.get("max_nodes")
    if max_nodes is not None:  # the range of --max-nodes-per-credential
        limits.MAX_NODES.check(max_nodes, "max_nodes")
    return Credential(name=name, nodes=nodes, zones=zones, max_nodes=max_nodes,
                      **{proofs[0]: proof})


def parse_credentials(text: str, source: str) -> Credentials:
    """The credentials of a file's ``text``; :class:`CredentialsError` (one line, naming
    ``source``, the entry and the field) for anything else."""
    try:
        documents = load_yaml_all(text, source, max_depth=8, max_values=1_000_000)
    except InputError as exc:
        detail = (str(exc).splitlines() or ["?"])[0]
        raise CredentialsError(f"{source}: not YAML ({detail})") from None
    data = documents[0] if len(documents) == 1 else None if not documents else documents
    if data is None or (isinstance(data, dict) and not data.get("credentials")):
        raise CredentialsError(f"{source}: no credentials (a list under 'credentials:')")
    if not isinstance(data, dict) or set(data) != {"credentials"}:
        raise CredentialsError(f"{source}: must be a mapping with one key, 'credentials'")
    raw = data["credentials"]
    if not isinstance(raw, list):
        raise CredentialsError(f"{source}: 'credentials' must be a list of entries")
    entries: list[Credential] = []
    seen: dict[tuple[str, str], str] = {}
    for index, item in enumerate(raw):
        where = f"{source}: credentials[{index}]"
        try:
            entry = _entry(item)
        except ValueError as exc:
            raise CredentialsError(f"{where}: {exc}") from None
        for key, what in ((("name", entry.name), "name"),
                          (("token", entry.token_sha256 or ""), "token"),
                          (("dns", entry.san_dns or ""), "certificate name"),
                          (("uri", entry.san_uri or ""), "certificate name")):
            if not key[1]:
                continue
            if key in seen:
                raise CredentialsError(
                    f"{where}: duplicate name {entry.name!r}" if what == "name" else
                    f"{where} ({entry.name}): the same {what} as {seen[key]!r}")
            seen[key] = entry.name
        entries.append(entry)
    return Credentials(tuple(entries))


def _stamp(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


class CredentialsFile:
    """A credentials file, read when made (:class:`CredentialsError` if it cannot be)
    and again when it changes (at most every ``recheck`` seconds)."""

    def __init__(self, path: Path, *, recheck: float = 1.0) -> None:
        self.path = path
        self.recheck = recheck
        self.reloads = 0
        self.error: str | None = None
        """Why the file's latest version is not in use (None: it is)."""
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        try:
            self._stamp = _stamp(path)
        except OSError as exc:
            raise CredentialsError(f"cannot read {path}: {exc.strerror or exc}") from None
        self._current = self._load()

    def _load(self) -> Credentials:
        text = read_text(str(self.path), CREDENTIALS_MAX_BYTES, "credentials file")
        return parse_credentials(text, str(self.path))

    def current(self) -> Credentials:
        """The credentials in use (the file read again first if it changed)."""
        now = time.monotonic()
        with self._lock:
            if now - self._checked < self.recheck:
                return self._current
            self._checked = now
            try:
                stamp = _stamp(self.path)
                if stamp == self._stamp:
                    return self._current
                self._stamp = stamp
                self._current = self._load()
            except (OSError, InputError) as exc:
                if str(exc) != self.error:
                    log.error("credentials file changed but cannot be used (still using "
                              "the last good one): %s", exc)
                self.error = str(exc)
                return self._current
            self.error = None
            self.reloads += 1
            log.info("credentials reloaded from %s (%d entries)", self.path,
                     len(self._current.entries))
            return self._current
