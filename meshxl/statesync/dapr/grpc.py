"""Dapr's gRPC API (``dapr.proto.runtime.v1.Dapr``) over :mod:`.h2`, its messages read
and written by :mod:`.wire`: GetState, GetBulkState, SaveState, DeleteState,
DeleteBulkState, ExecuteStateTransaction, GetMetadata and SetMetadata, with daprd's
status codes (:mod:`.errors`); and grpc.health.v1's Check, which Envoy's gRPC health
check of the member calls. Every other method of the service answers at once as daprd
answers for a building block without a component (a stream too: never a hang);
another service is UNIMPLEMENTED.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from .errors import INVALID_ARGUMENT, UNAVAILABLE, DaprError, malformed, not_served_method
from .metadata import Metadata
from .state import Delete, Item, Save, StateOps, parse_ttl, rfc3339
from .wire import (
    BadMessage,
    ItemAnswer,
    StateItem,
    bulk_answer,
    get_answer,
    metadata_answer,
    read_delete,
    read_get,
    read_get_bulk,
    read_items,
    read_set_metadata,
    read_transaction,
)

__all__ = ["HEALTH_CHECK", "SERVICE", "TOKEN_HEADER", "DaprService"]

SERVICE = "dapr.proto.runtime.v1.Dapr"
_PREFIX = f"/{SERVICE}/"
TOKEN_HEADER = "dapr-api-token"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
UNAUTHENTICATED, UNIMPLEMENTED = 16, 12

Unary = Callable[[bytes], Awaitable[bytes]]


def _save(item: StateItem) -> Save:
    content_type = item.metadata.get("contentType") or "application/octet-stream"
    return Save(key=item.key, value=item.value, content_type=content_type, etag=item.etag,
                concurrency=item.concurrency, ttl=parse_ttl(item.metadata))


def _ttl_metadata(item: Item) -> dict[str, str]:
    return {"ttlExpireTime": rfc3339(item.expires)} if item.expires is not None else {}


class DaprService:
    """The service's methods over :class:`.state.StateOps` (None while the sidecar
    starts: every call then UNAVAILABLE, ``reason`` saying why)."""

    def __init__(self, token: str | None, reason: Callable[[], str]):
        self.ops: StateOps | None = None
        self.metadata: Metadata | None = None
        self.token = token.encode() if token is not None else None
        self.reason = reason
        self._methods: dict[str, Unary] = {
            "GetState": self.get_state, "GetBulkState": self.get_bulk_state,
            "SaveState": self.save_state, "DeleteState": self.delete_state,
            "DeleteBulkState": self.delete_bulk_state,
            "ExecuteStateTransaction": self.transaction, "GetMetadata": self.get_metadata,
            "SetMetadata": self.set_metadata}

    def early(self, path: str, headers: dict[str, str]) -> tuple[int, str] | None:
        """A call refused from its headers (:data:`.h2.Early`): another service, a
        method not served (a stream too, at once), no or a wrong token."""
        if path == HEALTH_CHECK:
            return None
        if not path.startswith(_PREFIX):
            return UNIMPLEMENTED, f"unknown service of {path[:200]!r}"
        name = path[len(_PREFIX):]
        if name not in self._methods:
            refusal = not_served_method(name)
            return refusal.grpc_code, refusal.message
        if self.token is not None and not hmac.compare_digest(
                headers.get(TOKEN_HEADER, "").encode(), self.token):
            return UNAUTHENTICATED, "missing or wrong dapr-api-token"
        return None

    async def handle(self, path: str, message: bytes,
                     headers: dict[str, str]) -> tuple[int, str, bytes]:
        """One call (:data:`.h2.Handler`), :meth:`early` passed: (gRPC status, its
        message, the answer)."""
        if path == HEALTH_CHECK:  # SERVING (1) once the API serves, else NOT_SERVING (2)
            return 0, "", b"\x08\x01" if self.ops is not None else b"\x08\x02"
        refusal = self.early(path, headers)
        if refusal is not None:
            return refusal[0], refusal[1], b""
        unary = self._methods[path[len(_PREFIX):]]
        try:
            return 0, "", await unary(message)
        except DaprError as exc:
            return exc.grpc_code, exc.message, b""
        except BadMessage as exc:
            return INVALID_ARGUMENT, f"the request is not the method's message: {exc}", b""

    def _ops(self) -> StateOps:
        if self.ops is None:
            raise DaprError("ERR_NOT_READY", f"the sidecar is starting: {self.reason()}",
                            503, UNAVAILABLE)
        return self.ops

    async def get_state(self, raw: bytes) -> bytes:
        request = read_get(raw)
        item = await self._ops().get(request.store, request.key)
        if item is None:
            return b""
        return get_answer(item.data, item.etag, _ttl_metadata(item))

    async def get_bulk_state(self, raw: bytes) -> bytes:
        request = read_get_bulk(raw)
        items = await self._ops().bulk_get(request.store, request.keys)
        answers = []
        for key, item in zip(request.keys, items, strict=True):
            if isinstance(item, DaprError):
                answers.append(ItemAnswer(key, error=item.message))
            elif item is None:
                answers.append(ItemAnswer(key))
            else:
                answers.append(ItemAnswer(key, item.data, item.etag,
                                          metadata=_ttl_metadata(item)))
        return bulk_answer(answers)

    async def save_state(self, raw: bytes) -> bytes:
        store, items = read_items(raw)
        for item in items:
            if not item.key:
                raise malformed("state key cannot be empty")
        await self._ops().save(store, [_save(item) for item in items])
        return b""

    async def delete_state(self, raw: bytes) -> bytes:
        store, item = read_delete(raw)
        await self._ops().delete(store, [Delete(item.key, item.etag, item.concurrency)])
        return b""

    async def delete_bulk_state(self, raw: bytes) -> bytes:
        store, items = read_items(raw)
        await self._ops().delete(store, [Delete(i.key, i.etag, i.concurrency) for i in items])
        return b""

    async def transaction(self, raw: bytes) -> bytes:
        request = read_transaction(raw)
        operations: list[Save | Delete] = []
        for kind, item in request.operations:
            if kind == "upsert":
                operations.append(_save(item))
            elif kind == "delete":
                operations.append(Delete(item.key, item.etag, item.concurrency))
            else:
                raise DaprError("ERR_NOT_SUPPORTED_STATE_OPERATION", f"operation type "
                                f"{kind[:40]} not supported", 501, 12)
        await self._ops().transact(request.store, operations)
        return b""

    async def get_metadata(self, raw: bytes) -> bytes:
        self._ops()
        metadata = self.metadata
        assert metadata is not None
        return metadata_answer(metadata.app_id, metadata.components(),
                               dict(metadata.extended), f"meshxl-{metadata.version}")

    async def set_metadata(self, raw: bytes) -> bytes:
        self._ops()
        assert self.metadata is not None
        try:
            self.metadata.set(*read_set_metadata(raw))
        except ValueError as exc:
            raise malformed(str(exc)) from None
        return b""

