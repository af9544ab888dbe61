"""Dapr's state operations over meshxl's session engine: what the HTTP and gRPC servers
(:mod:`.http`, :mod:`.grpc`) share. Each goes through the member's own API objects, as
the native API does: the cluster's quota guard first, then ``Sessions.write`` (or
``get``), so a Dapr save is acknowledged only once etcd committed it, and fenced as any
write is.

What each Dapr field becomes (docs/dapr.md has the table): the store's name picks the
cluster (:class:`Stores`), the key its session (:mod:`.keys`), ``etag`` an If-Match,
``concurrency: first-write`` without an ETag a create-only write, ``ttlInSeconds`` the
write's own TTL (``-1`` never; 0 or none: the cluster's ``sessions.ttl``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from meshxl.errors import InputError, MeshxlError, NotFound
from meshxl.statesync.quota import QuotaGuard
from meshxl.statesync.record import MAX_TTL, NO_EXPIRY
from meshxl.statesync.store import MAX_TXN_WRITES
from meshxl.statesync.writes import DELETE, PUT, SessionEngine, Stored, Write

from .errors import INTERNAL, DaprError, from_meshxl, malformed, store_not_found
from .keys import KeyMapping, KeyRefused

__all__ = ["FIRST_WRITE", "LAST_WRITE", "Delete", "Item", "Save", "StateOps", "StoreParts",
           "Stores", "parse_ttl", "rfc3339"]

FIRST_WRITE, LAST_WRITE = "first-write", "last-write"
MAX_BULK = 1024
"""Keys of one bulk get, save or delete at most (each is a session read or written
concurrently)."""


def _bounded(count: int, what: str) -> None:
    if count > MAX_BULK:
        raise malformed(f"{count} keys in one {what}; at most {MAX_BULK}")


class StoreParts(Protocol):
    """What a store uses of its cluster's sidecar (:class:`~.api.SidecarParts`)."""

    @property
    def sessions(self) -> SessionEngine: ...

    @property
    def quota(self) -> QuotaGuard: ...


@dataclass(frozen=True)
class Stores:
    """The state stores served: each name's cluster (``lookup``: its sidecar, None for
    a name not served), and how each store's keys map (``keys``)."""

    lookup: Callable[[str], StoreParts | None]
    names: Callable[[], list[str]]
    keys: Callable[[str], KeyMapping]


@dataclass(frozen=True, slots=True)
class Item:
    """A state read: its bytes, ETag, content type, and when its TTL ends (None: no
    TTL)."""

    key: str
    data: bytes
    etag: str
    content_type: str
    expires: float | None


@dataclass(slots=True)
class Save:
    key: str
    value: bytes
    content_type: str
    etag: str | None = None
    concurrency: str = ""
    ttl: int | None = None


@dataclass(slots=True)
class Delete:
    key: str
    etag: str | None = None
    concurrency: str = ""


def parse_ttl(metadata: dict[str, str]) -> int | None:
    """``metadata.ttlInSeconds`` as Dapr reads it: -1 (never expires), 0 or absent (the
    store's default, the cluster's ``sessions.ttl``: None), or seconds."""
    raw = metadata.get("ttlInSeconds")
    if raw is None or raw == "":
        return None
    try:
        ttl = int(str(raw).strip())
    except ValueError:
        raise malformed(f"incorrect value for metadata 'ttlInSeconds': {str(raw)[:40]!r} "
                        "is not a whole number") from None
    if ttl < NO_EXPIRY or ttl > MAX_TTL:
        raise malformed(f"incorrect value for metadata 'ttlInSeconds': must be -1 or from 0 "
                        f"to {MAX_TTL}, got {ttl}")
    return None if ttl == 0 else ttl


def _if_match(etag: str | None) -> str | None:
    """A Dapr ETag as the engine's If-Match (``""`` and None: none)."""
    if not etag:
        return None
    if etag.strip() == "*":
        raise InputError("If-Match: '*' is not an ETag", field="If-Match")
    return f'"{etag}"'


class StateOps:
    """The state API over the engines of :class:`Stores`."""

    def __init__(self, stores: Stores):
        self.stores = stores

    def _store(self, name: str) -> tuple[StoreParts, KeyMapping]:
        parts = self.stores.lookup(name)
        if parts is None:
            raise store_not_found(name)
        return parts, self.stores.keys(name)

    @staticmethod
    def _session(keys: KeyMapping, key: str) -> str:
        try:
            return keys.session_id(key)
        except KeyRefused as exc:
            raise malformed(str(exc)) from None

    # -- reads --------------------------------------------------------------------------

    async def get(self, store: str, key: str) -> Item | None:
        parts, keys = self._store(store)
        return await self._get(parts, store, key, self._session(keys, key))

    async def _get(self, parts: StoreParts, store: str, key: str,
                   session_id: str) -> Item | None:
        sessions = parts.sessions
        try:
            stored = await sessions.get(session_id)
        except NotFound:
            return None
        except MeshxlError as exc:
            error = from_meshxl(exc, "ERR_STATE_GET", f"fail to get {key[:100]} from state "
                                                      f"store {store[:100]}")
            if error.status == 409:  # a record that cannot be decoded: a store error
                error.status, error.grpc_code = 500, INTERNAL
            raise error from None
        return self._item(key, stored, sessions.settings.ttl)

    @staticmethod
    def _item(key: str, stored: Stored, cluster_ttl: float) -> Item:
        record = stored.record
        expires = record.expires
        if expires is None and record.ttl is None:  # the cluster's: at the earliest
            expires = record.updated + cluster_ttl
        return Item(key, record.data, stored.etag, record.content_type, expires)

    async def bulk_get(self, store: str, keys_asked: Sequence[str]
                       ) -> list[Item | DaprError | None]:
        """Each key as :meth:`get` answers it (an error per key, not for the request)."""
        parts, keys = self._store(store)
        _bounded(len(keys_asked), "bulk get")
        ids = [self._session(keys, key) for key in keys_asked]
        results = await asyncio.gather(
            *(self._get(parts, store, key, i) for key, i in zip(keys_asked, ids, strict=True)),
            return_exceptions=True)
        out: list[Item | DaprError | None] = []
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, DaprError):
                raise result
            out.append(result)
        return out

    # -- writes -------------------------------------------------------------------------

    async def save(self, store: str, saves: Sequence[Save]) -> None:
        """Every item saved, each on its own (etcd transactions shared): the first
        failure is raised (the others stand, as with a Dapr store's bulk save)."""
        if not saves:
            return
        parts, keys = self._store(store)
        _bounded(len(saves), "save")
        context = f"failed saving state in state store {store[:100]}"
        try:
            writes = [Write(session_id=self._session(keys, s.key), op=PUT, data=s.value,
                            content_type=s.content_type, if_match=_if_match(s.etag),
                            create_only=s.concurrency == FIRST_WRITE and not s.etag,
                            ttl=s.ttl, sync_now=s.ttl is not None) for s in saves]
            parts.quota.admit(writes)
        except MeshxlError as exc:
            raise from_meshxl(exc, "ERR_STATE_SAVE", context) from None
        for outcome in await parts.sessions.write(writes):
            if isinstance(outcome, MeshxlError):
                raise from_meshxl(outcome, "ERR_STATE_SAVE", context) from None
            if isinstance(outcome, BaseException):
                raise outcome

    async def delete(self, store: str, deletes: Sequence[Delete]) -> None:
        """Each key deleted: one that is not there is deleted already (no error) unless
        an ETag was given for it (an ETag mismatch)."""
        if not deletes:
            return
        parts, keys = self._store(store)
        _bounded(len(deletes), "bulk delete")
        context = "failed deleting state with key " + deletes[0].key[:100]
        try:
            writes = [Write(session_id=self._session(keys, d.key), op=DELETE,
                            if_match=_if_match(d.etag)) for d in deletes]
        except MeshxlError as exc:
            raise from_meshxl(exc, "ERR_STATE_DELETE", context) from None
        for d, outcome in zip(deletes, await parts.sessions.write(writes), strict=True):
            if isinstance(outcome, NotFound):
                if not d.etag:
                    continue
                raise DaprError("ERR_STATE_DELETE", f"failed deleting state with key "
                                f"{d.key[:100]}: possible etag mismatch. the key does not "
                                "exist", 409, 10)
            if isinstance(outcome, MeshxlError):
                raise from_meshxl(outcome, "ERR_STATE_DELETE",
                                  f"failed deleting state with key {d.key[:100]}") from None
            if isinstance(outcome, BaseException):
                raise outcome

    async def transact(self, store: str, operations: Sequence[Save | Delete]) -> None:
        """All of ``operations`` or none, in one etcd transaction. Several operations on
        one key: the last is applied, under the first one's ETag (an ETag on a later
        one cannot match: the transaction changed the key before it)."""
        parts, keys = self._store(store)
        context = "error while executing state transaction"
        plan: dict[str, Write] = {}
        try:
            for op in operations:
                session_id = self._session(keys, op.key)
                first = plan.get(session_id)
                if first is not None and (op.etag or (isinstance(op, Save) and first.op == PUT
                                                      and op.concurrency == FIRST_WRITE)):
                    raise DaprError("ERR_STATE_TRANSACTION", f"{context}: possible etag "
                                    f"mismatch: key {op.key[:100]} was written earlier in "
                                    "this transaction", 500, INTERNAL)
                if_match = first.if_match if first is not None else _if_match(op.etag)
                if isinstance(op, Save):
                    create = (first.create_only if first is not None
                              else op.concurrency == FIRST_WRITE and not op.etag)
                    write = Write(session_id=session_id, op=PUT, data=op.value,
                                  content_type=op.content_type, if_match=if_match,
                                  create_only=create, ttl=op.ttl,
                                  sync_now=op.ttl is not None)
                else:
                    write = Write(session_id=session_id, op=DELETE, if_match=if_match)
                plan.pop(session_id, None)  # in the order of each key's last operation
                plan[session_id] = write
            writes = list(plan.values())
            if len(writes) > MAX_TXN_WRITES:  # etcd's operations per transaction
                raise DaprError("ERR_STATE_STORE_TOO_MANY_TRANSACTIONS", f"the transaction "
                                f"contains {len(writes)} operations, which is more than "
                                f"what the state store supports: {MAX_TXN_WRITES}", 400, 3)
            parts.quota.admit(writes)
        except MeshxlError as exc:
            raise _transaction_error(
                from_meshxl(exc, "ERR_STATE_TRANSACTION", context)) from None
        for _ in range(3):
            if not writes:
                return
            try:
                outcome = await parts.sessions.write(writes, atomic=True)
            except MeshxlError as exc:  # refused whole (too many keys with the deletes)
                raise _transaction_error(from_meshxl(exc, "ERR_STATE_TRANSACTION",
                                                     context)) from None
            except ValueError as exc:  # more bytes than one etcd request takes
                raise malformed(f"{context}: {exc}") from None
            if outcome.committed:
                return
            gone = {i for i, e in outcome.errors.items()
                    if isinstance(e, NotFound) and writes[i].op == DELETE
                    and writes[i].if_match is None}
            if len(gone) < len(outcome.errors):
                failure = outcome.errors[min(set(outcome.errors) - gone)]
                raise _transaction_error(from_meshxl(failure, "ERR_STATE_TRANSACTION",
                                                     context))
            writes = [w for i, w in enumerate(writes) if i not in gone]  # deleted already
        raise DaprError("ERR_STATE_TRANSACTION", f"{context}: its keys kept changing; try "
                        "again", 500, INTERNAL)


def _transaction_error(error: DaprError) -> DaprError:
    """daprd answers a failed transaction 500 (INTERNAL), an ETag mismatch included; a
    bad request stays 400, an unavailable etcd 503 (not applied: it may be sent again)."""
    if error.status in (409, 500):
        error.status, error.grpc_code = 500, INTERNAL
    return error


def rfc3339(seconds: float) -> str:
    """A time as Dapr's ``ttlExpireTime`` writes it (RFC 3339, UTC), to the
    millisecond."""
    whole = int(seconds)
    millis = int(round((seconds - whole) * 1000))
    if millis == 1000:
        whole, millis = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"
