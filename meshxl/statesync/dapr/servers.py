"""Dapr's two ports of one sidecar process: HTTP (its own server, :mod:`.http`) and
gRPC (its own HTTP/2 server, :mod:`.h2`, under :mod:`.grpc`), bound before the member
registers (a port in use stops the start, as ``--listen``'s does), answering "starting"
until the sidecar has started, then the state API over its clusters.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

from meshxl.addr import bind_tcp, bound_port, grpc_target
from meshxl.statesync.config import DaprConfig
from meshxl.statesync.http import HttpServer, Request, Response

from .errors import DaprError
from .grpc import TOKEN_HEADER, DaprService
from .h2 import Connections, serve_on
from .http import DaprRoutes, error_response, waiting_router
from .keys import KeyMapping
from .metadata import Metadata
from .state import StateOps, StoreParts, Stores

__all__ = ["DaprServers", "key_mapping"]

PUBLIC = ("/v1.0/healthz", "/v1.0/healthz/outbound", "/v1.0/metadata")
"""Answered without a token, as daprd's public endpoints are."""


def key_mapping(config: DaprConfig, app_id: str) -> Callable[[str], KeyMapping]:
    """Each store's keys (:mod:`.keys`), by its ``keyPrefix`` (``--dapr-key-prefix``)."""
    strategy = config.key_prefix
    if strategy == "name":
        return lambda store: KeyMapping(store)
    fixed = KeyMapping(None if strategy == "none" else
                       app_id if strategy == "appid" else strategy)
    return lambda store: fixed


def _token_check(token: str) -> Callable[[Request], Response | None]:
    import hmac

    expected = token.encode("ascii")

    def check(request: Request) -> Response | None:
        if request.path in PUBLIC:
            return None
        given = request.headers.get(TOKEN_HEADER, "").encode("latin-1")
        if not hmac.compare_digest(given, expected):
            return error_response(DaprError("ERR_UNAUTHORIZED", "missing or wrong "
                                            "dapr-api-token", 401, 16))
        return None

    return check


class DaprServers:
    """Dapr's HTTP and gRPC servers on ``host``."""

    def __init__(self, config: DaprConfig, host: str, token: str | None,
                 reason: Callable[[], str], max_connections: int | None = None):
        self.config = config
        self.host = host
        self.http = HttpServer(waiting_router(reason),
                               authorize=_token_check(token) if token is not None else None,
                               max_connections=max_connections)
        self.service = DaprService(token, reason)
        self._sock: socket.socket | None = None
        self._grpc: asyncio.AbstractServer | None = None
        self._grpc_connections = Connections()
        self.http_port = 0
        self.grpc_port = 0

    async def start(self) -> None:
        """Bind both ports (ListenError: in use, or a bad address) and serve."""
        self._sock = bind_tcp(grpc_target(self.host, self.config.http_port),
                              "--dapr-http-port")
        try:
            grpc_sock = bind_tcp(grpc_target(self.host, self.config.grpc_port),
                                 "--dapr-grpc-port")
        except BaseException:
            self._sock.close()
            raise
        self.http_port, self.grpc_port = bound_port(self._sock), bound_port(grpc_sock)
        await self.http.listen(self._sock)
        factory, self._grpc_connections = serve_on(self.service.handle, self.service.early)
        self._grpc = await asyncio.get_running_loop().create_server(factory, sock=grpc_sock)

    def serve(self, lookup: Callable[[str], StoreParts | None],
              names: Callable[[], list[str]], app_id: str, version: str) -> None:
        """The state API from now on, over the stores ``lookup`` finds."""
        ops = StateOps(Stores(lookup, names, key_mapping(self.config, app_id)))
        metadata = Metadata(app_id, names, version)
        self.http.site.router = DaprRoutes(ops, metadata).router()
        self.service.metadata = metadata
        self.service.ops = ops

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting; the calls under way are answered (at most ``grace``)."""
        await self.http.close(grace)
        if self._grpc is not None:
            self._grpc.close()
            for connection in list(self._grpc_connections.live):
                connection.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._grpc_connections.none.wait()
            for connection in list(self._grpc_connections.live):
                if connection.transport is not None:
                    connection.transport.abort()
