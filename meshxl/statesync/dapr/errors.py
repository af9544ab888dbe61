"""Dapr's errors as its sidecar answers them: an ``errorCode``, a message, an HTTP status
and a gRPC status code (:class:`DaprError`), and the answers for the building blocks
meshxl does not serve: those daprd gives for a component that is not configured. Pure
code. The codes and statuses are daprd's own (its ``pkg/messages`` and
``pkg/api/errors``); where meshxl's guarantees make a case Dapr does not have (a fenced
former owner), the nearest one Dapr's SDKs know (an ETag mismatch) is used.
"""

from __future__ import annotations

from typing import Final

from meshxl.errors import (
    Conflict,
    InputError,
    MeshxlError,
    PreconditionFailed,
    TooLarge,
    Unavailable,
    Undecodable,
)

__all__ = ["ABORTED", "FAILED_PRECONDITION", "INTERNAL", "INVALID_ARGUMENT", "NOT_FOUND",
           "RESOURCE_EXHAUSTED", "UNAVAILABLE", "UNIMPLEMENTED", "DaprError", "from_meshxl",
           "not_served", "not_served_method", "store_not_found"]

# gRPC status codes (grpc.StatusCode's values, without importing grpc).
INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ABORTED = 3, 5, 9, 10
RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 8, 12, 13, 14


class DaprError(Exception):
    """An error as Dapr's API answers it: ``{"errorCode", "message"}`` with ``status``
    over HTTP, the gRPC status ``grpc_code`` with the message over gRPC."""

    def __init__(self, code: str, message: str, status: int, grpc_code: int,
                 reason: str | None = None):
        super().__init__(message)
        self.code, self.message, self.status, self.grpc_code = code, message, status, grpc_code
        self.reason = reason
        """The ErrorInfo reason of Dapr's richer errors (``DAPR_STATE_NOT_FOUND``)."""

    def body(self) -> dict[str, object]:
        body: dict[str, object] = {"errorCode": self.code, "message": self.message}
        if self.reason is not None:
            body["details"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                "reason": self.reason, "domain": "dapr.io"}]
        return body


def store_not_found(name: str) -> DaprError:
    return DaprError("ERR_STATE_STORE_NOT_FOUND", f"state store {name[:100]} is not found",
                     400, INVALID_ARGUMENT, "DAPR_STATE_NOT_FOUND")


def malformed(message: str) -> DaprError:
    return DaprError("ERR_MALFORMED_REQUEST", message, 400, INVALID_ARGUMENT)


def from_meshxl(exc: MeshxlError, code: str, context: str) -> DaprError:
    """A session engine's refusal as Dapr answers a store's: an ETag that does not match
    (a 412, or meshxl's 409: another member wrote the session since this one last saw
    it) is Dapr's ETag mismatch, 409 and ABORTED; an ETag that is no ETag, 400 and
    INVALID_ARGUMENT; etcd unavailable, 503 and UNAVAILABLE (the write was not
    acknowledged: Envoy may send it to another member); over the cluster's quota, 429
    and RESOURCE_EXHAUSTED; too large, 400. ``code`` is the operation's
    (``ERR_STATE_SAVE``...), ``context`` what its message starts with."""
    message = f"{context}: {exc}"
    if getattr(exc, "status", None) == 429:  # over the cluster's quota (quota.QuotaRefused)
        return DaprError(code, message, 429, RESOURCE_EXHAUSTED)
    if isinstance(exc, PreconditionFailed | Conflict) and not isinstance(exc, Undecodable):
        return DaprError(code, f"{context}: possible etag mismatch. {exc}", 409, ABORTED)
    if isinstance(exc, TooLarge):
        return DaprError("ERR_MALFORMED_REQUEST", message, 400, INVALID_ARGUMENT)
    if isinstance(exc, InputError):
        if exc.details.get("field") == "If-Match" or str(exc).startswith("If-Match"):
            return DaprError(code, f"{context}: invalid etag value: {exc}", 400,
                             INVALID_ARGUMENT)
        return DaprError("ERR_MALFORMED_REQUEST", message, 400, INVALID_ARGUMENT)
    if isinstance(exc, Unavailable):
        return DaprError(code, message, 503, UNAVAILABLE)
    return DaprError(code, message, 500, INTERNAL)


_ACTORS = ('the state store is not configured to use the actor runtime. Have you set the '
           '- name: actorStateStore value: "true" in your state store component file?')
_NOT_SERVED: Final[dict[str, tuple[str, str, int, int]]] = {
    # building block -> (errorCode, message, HTTP status, gRPC code): daprd's answers
    # when no component of the kind is configured.
    "publish": ("ERR_PUBSUB_NOT_CONFIGURED", "pubsub is not configured", 400,
                FAILED_PRECONDITION),
    "actors": ("ERR_ACTOR_RUNTIME_NOT_FOUND", _ACTORS, 500, INTERNAL),
    "secrets": ("ERR_SECRET_STORES_NOT_CONFIGURED", "secret store is not configured", 500,
                FAILED_PRECONDITION),
    "configuration": ("ERR_CONFIGURATION_STORE_NOT_CONFIGURED",
                      "configuration stores not configured", 500, FAILED_PRECONDITION),
    "lock": ("ERR_LOCK_STORE_NOT_CONFIGURED", "lock store is not configured", 500,
             FAILED_PRECONDITION),
    "unlock": ("ERR_LOCK_STORE_NOT_CONFIGURED", "lock store is not configured", 500,
               FAILED_PRECONDITION),
    "crypto": ("ERR_CRYPTO_PROVIDERS_NOT_CONFIGURED", "crypto providers not configured", 500,
               INTERNAL),
    "bindings": ("ERR_INVOKE_OUTPUT_BINDING", "error invoking output binding: no output "
                 "binding is configured", 500, INTERNAL),
    "invoke": ("ERR_DIRECT_INVOKE", "failed to invoke: service invocation is not served "
               "by meshxl's sidecar (run daprd for it)", 500, INTERNAL),
    "workflows": ("ERR_WORKFLOW_COMPONENT_NOT_FOUND", "workflow component 'dapr' does not "
                  "exist", 400, INVALID_ARGUMENT),
    "query": ("ERR_STATE_STORE_NOT_SUPPORTED", "state store does not support querying", 500,
              INTERNAL),
}
_UNIMPLEMENTED = ("ERR_API_UNIMPLEMENTED", "this API is currently not implemented", 501,
                  UNIMPLEMENTED)


def not_served(block: str) -> DaprError:
    """The answer to a building block meshxl does not serve (daprd's for one without a
    component; this API's ``ERR_API_UNIMPLEMENTED`` for the rest)."""
    code, message, status, grpc_code = _NOT_SERVED.get(block, _UNIMPLEMENTED)
    return DaprError(code, message, status, grpc_code)


_METHOD_BLOCKS: Final = (
    ("QueryState", "query"), ("Publish", "publish"), ("SubscribeTopic", "publish"),
    ("Actor", "actors"), ("Secret", "secrets"), ("Configuration", "configuration"),
    ("TryLock", "lock"), ("Unlock", "unlock"), ("Encrypt", "crypto"), ("Decrypt", "crypto"),
    ("Subtle", "crypto"), ("Workflow", "workflows"), ("InvokeBinding", "bindings"),
    ("InvokeService", "invoke"))


def not_served_method(method: str) -> DaprError:
    """The answer to a gRPC method of ``dapr.proto.runtime.v1.Dapr`` meshxl does not
    serve, by its building block."""
    for part, block in _METHOD_BLOCKS:
        if part in method:
            return not_served(block)
    return not_served("")
