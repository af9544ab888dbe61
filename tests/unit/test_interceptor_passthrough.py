"""The gRPC session interceptor leaves the services it is told to alone (resumable
streams keep their own state): no socket, no server, the interceptor called directly."""

from __future__ import annotations

from typing import Any

import grpc

from meshxl.client import AsyncClient
from meshxl.client.interceptor import AsyncSessionInterceptor


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str, metadata: tuple[tuple[str, str], ...]):
        self.method = method
        self.invocation_metadata = metadata


async def test_passthrough_services_are_not_wrapped() -> None:
    async def talk(requests: Any, context: Any) -> None:
        return None

    handler = grpc.stream_stream_rpc_method_handler(talk)

    async def continuation(_: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return handler

    interceptor = AsyncSessionInterceptor(AsyncClient("http://127.0.0.1:9"),
                                          passthrough=("demo.Tally",))
    session = (("x-session-id", "s1"),)
    untouched = await interceptor.intercept_service(
        continuation, _Details("/demo.Tally/Talk", session))
    assert untouched is handler
    wrapped = await interceptor.intercept_service(
        continuation, _Details("/demo.Counter/Watch", session))
    assert wrapped is not handler and wrapped.stream_stream is not talk
    # A service whose name only begins like a passed-through one is still wrapped.
    other = await interceptor.intercept_service(
        continuation, _Details("/demo.TallyMore/Talk", session))
    assert other is not handler
