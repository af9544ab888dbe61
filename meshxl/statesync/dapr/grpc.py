"""Dapr's gRPC API (``dapr.proto.runtime.v1.Dapr``) on grpcio's asyncio server, its
messages read and written by :mod:`.wire`: GetState, GetBulkState, SaveState,
DeleteState, DeleteBulkState, ExecuteStateTransaction, GetMetadata and SetMetadata,
with daprd's status codes (:mod:`.errors`); and grpc.health.v1's Check, which Envoy's
gRPC health check of the member calls. Every other method of the service answers at
once, without reading a message, as daprd answers for a building block without a
component (a stream too: never a hang); another service is UNIMPLEMENTED.

Loaded only when the Dapr API is on: grpcio's server, and this, stay out of the idle
sidecar otherwise.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

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

log = logging.getLogger(__name__)

__all__ = ["SERVICE", "DaprService"]

SERVICE = "dapr.proto.runtime.v1.Dapr"
_PREFIX = f"/{SERVICE}/"
TOKEN_HEADER = "dapr-api-token"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"

Unary = Callable[[bytes], Awaitable[bytes]]


def _identity(data: bytes) -> bytes:
    return data


def _save(item: StateItem) -> Save:
    content_type = item.metadata.get("contentType") or "application/octet-stream"
    return Save(key=item.key, value=item.value, content_type=content_type, etag=item.etag,
                concurrency=item.concurrency, ttl=parse_ttl(item.metadata))


def _ttl_metadata(item: Item) -> dict[str, str]:
    return {"ttlExpireTime": rfc3339(item.expires)} if item.expires is not None else {}


class DaprService(grpc.GenericRpcHandler):  # type: ignore[misc]
    """The service's methods over :class:`.state.StateOps` (None while the sidecar
    starts: every call then UNAVAILABLE, ``reason`` saying why)."""

    def __init__(self, token: str | None, reason: Callable[[], str]):
        self.ops: StateOps | None = None
        self.metadata: Metadata | None = None
        self.token = token
        self.reason = reason
        self._methods: dict[str, Unary] = {
            "GetState": self.get_state, "GetBulkState": self.get_bulk_state,
            "SaveState": self.save_state, "DeleteState": self.delete_state,
            "DeleteBulkState": self.delete_bulk_state,
            "ExecuteStateTransaction": self.transaction, "GetMetadata": self.get_metadata,
            "SetMetadata": self.set_metadata}

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        if method == HEALTH_CHECK:
            return grpc.unary_unary_rpc_method_handler(self.health, _identity, _identity)
        if not method.startswith(_PREFIX):
            return None
        name = method[len(_PREFIX):]
        unary = self._methods.get(name)
        if unary is None:
            refusal = not_served_method(name)

            async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
                await context.abort(_code(refusal.grpc_code), refusal.message)

            return grpc.stream_stream_rpc_method_handler(refuse, _identity, _identity)
        return grpc.unary_unary_rpc_method_handler(self._call(unary), _identity, _identity)

    def _call(self, unary: Unary) -> Callable[[bytes, grpc.aio.ServicerContext],
                                              Awaitable[bytes]]:
        async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            error: DaprError
            if self.token is not None and not self._authorized(context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    "missing or wrong dapr-api-token")
            try:
                return await unary(request)
            except DaprError as exc:
                error = exc
            except BadMessage as exc:
                error = DaprError("ERR_MALFORMED_REQUEST", f"the request is not the "
                                  f"method's message: {exc}", 400, INVALID_ARGUMENT)
            await context.abort(_code(error.grpc_code), error.message)
            raise AssertionError("abort raises")

        return call

    async def health(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """grpc.health.v1's Check (Envoy's gRPC health check of the member):
        ``HealthCheckResponse.status`` SERVING (1) once the API serves, else
        NOT_SERVING (2)."""
        return b"\x08\x01" if self.ops is not None else b"\x08\x02"

    def _authorized(self, context: grpc.aio.ServicerContext) -> bool:
        assert self.token is not None
        for key, value in context.invocation_metadata() or ():
            if key == TOKEN_HEADER:
                given = value if isinstance(value, str) else value.decode("latin-1")
                return hmac.compare_digest(given.encode(), self.token.encode())
        return False

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


def _code(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN
