"""Streams that outlive their member: WebSocket, Server-Sent Events and gRPC streams
resumed on the member that takes their session over, every message exactly once and in
order (docs/streams.md).

Server side: a :class:`StreamHost` per process (over the statesync sidecar's client),
and a route per stream kind: :func:`websocket` (aiohttp); a handler is a coroutine of a
:class:`ServerStream`; :func:`server_sent_events` (aiohttp); gRPC in
:mod:`meshxl.streams.grpcio` (``unary_stream``, ``stream_stream``, ``connect_grpc``,
imported on demand: it needs grpcio). Client side:
:func:`connect_websocket` and :func:`connect_sse` give a :class:`ClientStream`; in a
browser, the ES module :func:`static_route` serves (:mod:`meshxl.streams.browser`). The
protocol: :mod:`meshxl.streams.protocol`.
"""

from .browser import static_route
from .client import ClientStream, StreamLost, StreamRefused, connect_websocket
from .host import Refused, StreamHost
from .protocol import SUBPROTOCOL, Limits, Refusal
from .server import ServerStream, StreamClosed
from .sse import server_sent_events
from .sse_client import connect_sse
from .websocket import websocket

__all__ = ["SUBPROTOCOL", "ClientStream", "Limits", "Refusal", "Refused", "ServerStream",
           "StreamClosed", "StreamHost", "StreamLost", "StreamRefused", "connect_sse",
           "connect_websocket", "server_sent_events", "static_route", "websocket"]
