"""Dapr's HTTP API (``/v1.0/state/...``, health, metadata) on the sidecar's own HTTP
server (:mod:`meshxl.statesync.http`), as daprd answers it: a save or delete 204, a
missing key 204 with no body, errors ``{"errorCode", "message"}`` with daprd's
statuses (:mod:`.errors`), every building block meshxl does not serve answered as
daprd answers one without a component.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

import orjson

from meshxl import httpbase
from meshxl.statesync.http import READ, WRITE, Request, Response, Router
from meshxl.statesync.record import JSON_TYPE, served_content_type, valid_content_type

from .errors import DaprError, malformed, not_served
from .metadata import Metadata
from .state import FIRST_WRITE, LAST_WRITE, Delete, Item, Save, StateOps, parse_ttl, rfc3339

__all__ = ["MAX_BODY", "DaprRoutes", "error_response", "not_served_answer", "waiting_router"]

MAX_BODY = 16 << 20
"""Bytes of a save, bulk get or transaction request at most (each state is bounded by
its cluster's ``max_bytes`` as a PUT is)."""
_METADATA = "metadata."
_BLOCKS = (("/v1.0/publish", "publish"), ("/v1.0-alpha1/publish", "publish"),
           ("/v1.0/actors", "actors"), ("/v1.0/secrets", "secrets"),
           ("/v1.0/configuration", "configuration"),
           ("/v1.0-alpha1/configuration", "configuration"), ("/v1.0-alpha1/lock", "lock"),
           ("/v1.0-alpha1/unlock", "unlock"), ("/v1.0-alpha1/crypto", "crypto"),
           ("/v1.0-alpha1/subtlecrypto", "crypto"), ("/v1.0/bindings", "bindings"),
           ("/v1.0/invoke", "invoke"), ("/v1.0-alpha1/workflows", "workflows"),
           ("/v1.0-beta1/workflows", "workflows"), ("/v1.0/workflows", "workflows"),
           ("/v1.0-alpha1/state", "query"))


def error_response(error: DaprError) -> Response:
    return Response(error.status, orjson.dumps(error.body()),
                    [("Content-Type", JSON_TYPE)])


def _json(value: Any, status: int = 200) -> Response:
    return Response(status, orjson.dumps(value), [("Content-Type", JSON_TYPE)])


def _query(request: Request) -> tuple[dict[str, str], dict[str, str]]:
    """The query's ``metadata.*`` parameters (without the prefix) and the others."""
    metadata: dict[str, str] = {}
    other: dict[str, str] = {}
    if request.query:
        for name, value in parse_qsl(request.query, keep_blank_values=True):
            if name.startswith(_METADATA):
                metadata[name[len(_METADATA):]] = value
            else:
                other[name] = value
    return metadata, other


def _body(request: Request) -> Any:
    """The request's JSON (ERR_MALFORMED_REQUEST for anything else, or nesting deeper
    than the API takes)."""
    raw = request.body
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:  # numbers orjson does not take (beyond 64 bits), or a better message
            value = httpbase.loads(raw, what="body")
        except httpbase.BadJson as exc:
            raise malformed(f"failed deserializing HTTP body: {exc}") from None
    if raw.count(b"[") + raw.count(b"{") > httpbase.MAX_JSON_DEPTH and \
            httpbase.json_depth(value) > httpbase.MAX_JSON_DEPTH:
        raise malformed(f"failed deserializing HTTP body: nests deeper than "
                        f"{httpbase.MAX_JSON_DEPTH} levels")
    return value


def _encode(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:  # an integer beyond 64 bits
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _string(raw: dict[str, Any], name: str, where: str) -> str | None:
    value = raw.get(name)
    if value is None or isinstance(value, str):
        return value
    raise malformed(f"{where}: {name!r} must be a string")


def _metadata(raw: dict[str, Any], where: str, query: dict[str, str]) -> dict[str, str]:
    value = raw.get("metadata")
    if value is None:
        return query
    if not isinstance(value, dict) or not all(isinstance(v, str | int) for v in value.values()):
        raise malformed(f"{where}: 'metadata' must be an object of strings")
    return {**{k: str(v) for k, v in value.items()}, **query}


def _concurrency(raw: dict[str, Any], where: str) -> str:
    options = raw.get("options")
    if options is None:
        return ""
    if not isinstance(options, dict):
        raise malformed(f"{where}: 'options' must be an object")
    concurrency = options.get("concurrency") or ""
    if concurrency not in ("", FIRST_WRITE, LAST_WRITE):
        raise malformed(f"{where}: options.concurrency must be first-write or last-write, "
                        f"got {str(concurrency)[:40]!r}")
    consistency = options.get("consistency") or ""
    if consistency not in ("", "eventual", "strong"):
        raise malformed(f"{where}: options.consistency must be eventual or strong, got "
                        f"{str(consistency)[:40]!r}")
    return str(concurrency)


def _key(raw: Any, where: str) -> str:
    if not isinstance(raw, dict):
        raise malformed(f"{where} must be an object")
    key = raw.get("key")
    if not isinstance(key, str) or not key:
        raise malformed(f'{where}: "key" is a required field')
    return key


def _save(raw: Any, where: str, query: dict[str, str]) -> Save:
    key = _key(raw, where)
    metadata = _metadata(raw, where, query)
    content_type = metadata.get("contentType") or JSON_TYPE
    if not valid_content_type(content_type):
        raise malformed(f"{where}: metadata.contentType must be a media type")
    return Save(key=key, value=_encode(raw.get("value")), content_type=content_type,
                etag=_string(raw, "etag", where), concurrency=_concurrency(raw, where),
                ttl=parse_ttl(metadata))


def _delete(raw: Any, where: str) -> Delete:
    return Delete(key=_key(raw, where), etag=_string(raw, "etag", where),
                  concurrency=_concurrency(raw, where))


def _item_answer(key: str, item: Item | DaprError | None) -> dict[str, Any]:
    if isinstance(item, DaprError):
        return {"key": key, "error": item.message}
    if item is None:
        return {"key": key}
    answer: dict[str, Any] = {"key": key, "etag": item.etag}
    try:  # JSON as it is (Dapr's json.RawMessage); anything else as a JSON string
        answer["data"] = orjson.Fragment(item.data) if _is_json(item) else \
            item.data.decode("utf-8")
    except UnicodeDecodeError:
        answer["data"] = item.data.decode("latin-1")
    if item.expires is not None:
        answer["metadata"] = {"ttlExpireTime": rfc3339(item.expires)}
    return answer


def _is_json(item: Item) -> bool:
    """Whether the stored bytes are JSON (put into the answer as they are)."""
    try:
        orjson.loads(item.data)
    except orjson.JSONDecodeError:
        return False
    return True


class DaprRoutes:
    """The handlers of Dapr's HTTP API over :class:`.state.StateOps`."""

    def __init__(self, ops: StateOps, metadata: Metadata):
        self.ops = ops
        self.metadata = metadata

    def router(self) -> Router:
        r = Router()
        r.add("GET", "/v1.0/healthz", self.healthz)
        r.add("GET", "/v1.0/healthz/outbound", self.healthz)
        r.add("GET", "/v1.0/metadata", self.get_metadata)
        r.add("PUT", "/v1.0/metadata/{name}", self.set_metadata, max_body=4096,
              what="metadata value")
        for method in ("POST", "PUT"):
            r.add(method, "/v1.0/state/{store}/bulk", self.bulk_get, max_body=MAX_BODY,
                  what="bulk get request", access=READ)
            r.add(method, "/v1.0/state/{store}/transaction", self.transaction,
                  max_body=MAX_BODY, what="transaction request", access=WRITE)
            r.add(method, "/v1.0/state/{store}", self.save, max_body=MAX_BODY,
                  what="state save request", access=WRITE)
        r.add("GET", "/v1.0/state/{store}/{key}", self.get, access=READ, key="key")
        r.add("DELETE", "/v1.0/state/{store}/{key}", self.delete, access=WRITE, key="key")
        r.set_fallback(not_served_answer)
        return r

    async def healthz(self, request: Request) -> Response:
        return Response(204)

    async def get_metadata(self, request: Request) -> Response:
        return _json(self.metadata.document())

    async def set_metadata(self, request: Request) -> Response:
        try:
            self.metadata.set(request.params["name"], request.body.decode())
        except (ValueError, UnicodeDecodeError) as exc:
            return error_response(malformed(str(exc)))
        return Response(204)

    async def get(self, request: Request) -> Response:
        store, key = request.params["store"], request.params["key"]
        try:
            _query(request)
            item = await self.ops.get(store, key)
        except DaprError as exc:
            return error_response(exc)
        if item is None:
            return Response(204)
        headers = [("ETag", item.etag), ("Content-Type", served_content_type(
            item.content_type))]
        if item.expires is not None:
            headers.append(("metadata.ttlExpireTime", rfc3339(item.expires)))
        return Response(200, item.data, headers)

    async def bulk_get(self, request: Request) -> Response:
        try:
            body = _body(request)
            if not isinstance(body, dict) or not isinstance(body.get("keys", []), list) \
                    or not all(isinstance(k, str) for k in body.get("keys", [])):
                raise malformed('failed deserializing HTTP body: {"keys": [strings], '
                                '"parallelism": n} expected')
            keys: list[str] = body.get("keys", [])
            items = await self.ops.bulk_get(request.params["store"], keys)
        except DaprError as exc:
            return error_response(exc)
        return _json([_item_answer(k, i) for k, i in zip(keys, items, strict=True)])

    async def save(self, request: Request) -> Response:
        try:
            metadata, _ = _query(request)
            body = _body(request)
            if not isinstance(body, list):
                raise malformed("failed deserializing HTTP body: an array of states "
                                "expected")
            saves = [_save(raw, f"states[{i}]", metadata) for i, raw in enumerate(body)]
            await self.ops.save(request.params["store"], saves)
        except DaprError as exc:
            return error_response(exc)
        return Response(204)

    async def delete(self, request: Request) -> Response:
        try:
            _, query = _query(request)
            concurrency = query.get("concurrency", "")
            if concurrency not in ("", FIRST_WRITE, LAST_WRITE):
                raise malformed("concurrency must be first-write or last-write")
            etag = request.headers.get("if-match")
            await self.ops.delete(request.params["store"], [
                Delete(key=request.params["key"], etag=etag, concurrency=concurrency)])
        except DaprError as exc:
            return error_response(exc)
        return Response(204)

    async def transaction(self, request: Request) -> Response:
        try:
            metadata, _ = _query(request)
            body = _body(request)
            operations = body.get("operations") if isinstance(body, dict) else None
            if not isinstance(operations, list):
                raise malformed('failed deserializing HTTP body: {"operations": [...]} '
                                "expected")
            ops: list[Save | Delete] = []
            for i, raw in enumerate(operations):
                where = f"operations[{i}]"
                kind = raw.get("operation") if isinstance(raw, dict) else None
                if kind == "upsert":
                    ops.append(_save(raw.get("request"), f"{where}.request", metadata))
                elif kind == "delete":
                    ops.append(_delete(raw.get("request"), f"{where}.request"))
                else:
                    raise DaprError("ERR_NOT_SUPPORTED_STATE_OPERATION",
                                    f"operation type {str(kind)[:40]} not supported", 400, 3)
            await self.ops.transact(request.params["store"], ops)
        except DaprError as exc:
            return error_response(exc)
        return Response(204)


async def not_served_answer(request: Request) -> Response:
    """A path of Dapr's API meshxl does not serve: daprd's answer for its building block
    without a component; anything else 404."""
    path = request.path
    for prefix, block in _BLOCKS:
        if path == prefix or path.startswith(prefix + "/"):
            return error_response(not_served(block))
    if path in ("/v1.0/shutdown",):
        return error_response(not_served(""))
    return error_response(DaprError("ERR_NOT_FOUND", f"{request.method} {path[:200]} is "
                                    "not part of Dapr's API served here", 404, 5))


def waiting_router(reason: Callable[[], str]) -> Router:
    """Dapr's port before the sidecar has started (etcd not answered yet): its health
    says not ready (500, as daprd's before it is), every other request 503."""
    async def not_ready(request: Request) -> Response:
        if request.path.startswith("/v1.0/healthz"):
            code = "ERR_OUTBOUND_HEALTH_NOT_READY" if request.path.endswith("outbound") \
                else "ERR_HEALTH_NOT_READY"
            return error_response(DaprError(code, f"dapr is not ready: {reason()}", 500, 13))
        return error_response(DaprError("ERR_NOT_READY", f"the sidecar is starting: "
                                        f"{reason()}", 503, 14))

    r = Router()
    r.set_fallback(not_ready)
    return r

