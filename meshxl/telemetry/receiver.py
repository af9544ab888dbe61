"""A local OTLP/gRPC trace receiver that appends OTLP JSON lines to a file.

Envoy's OpenTelemetry tracer can only export over OTLP (gRPC or HTTP); for local runs
and tests this receiver takes the place of a collector and writes the spans in the
same format as the SDK's ``FileSpanExporter`` (``--trace-file``), so Envoy's request
spans and meshxl's failover spans can be read side by side by the same tools.

Requests are decoded with OTLP descriptors meshxl owns (``otlp.py``), not with whichever
copy of ``opentelemetry/proto`` the installer left on disk. A request that cannot be
decoded or written is logged as an error with its reason and answered with a gRPC error,
never dropped quietly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import IO, Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError

from meshxl.addr import GRPC_SERVER_OPTIONS, bind_grpc

from .otlp import (
    TRACE_SERVICE,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

log = logging.getLogger(__name__)

_MAX_MESSAGE = 32 * 1024 * 1024
"""Envoy and the SDK batch spans; allow batches well above gRPC's 4 MiB default."""


def proto_to_otlp_json(request: Any) -> dict[str, Any]:
    """The request as OTLP/JSON: protobuf's JSON mapping, except ids in hex.

    OTLP/JSON follows the proto3 JSON mapping (lowerCamelCase names, 64-bit integers as
    strings) but with integer enums and trace/span ids as hex instead of base64.
    """
    data = MessageToDict(request, use_integers_for_enums=True)
    for rs, rs_json in zip(request.resource_spans, data.get("resourceSpans", ()),
                           strict=True):
        for ss, ss_json in zip(rs.scope_spans, rs_json.get("scopeSpans", ()), strict=True):
            for span, span_json in zip(ss.spans, ss_json.get("spans", ()), strict=True):
                _hex_ids(span, span_json, ("trace_id", "span_id", "parent_span_id"))
                for link, link_json in zip(span.links, span_json.get("links", ()),
                                           strict=True):
                    _hex_ids(link, link_json, ("trace_id", "span_id"))
    return data


def _hex_ids(message: Any, data: dict[str, Any], fields: tuple[str, ...]) -> None:
    for field in fields:
        value: bytes = getattr(message, field)
        if value:
            data[_camel(field)] = value.hex()


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _span_count(request: Any) -> int:
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


def _handler(receiver: TraceReceiver) -> grpc.GenericRpcHandler:
    """``TraceService/Export`` over the raw request bytes, decoded here so that a request
    that cannot be decoded is reported (logged and answered) like any other failure."""

    async def export(body: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        try:
            request = ExportTraceServiceRequest.FromString(body)
        except DecodeError as exc:
            receiver.failures += 1
            log.error("OTLP export request of %d bytes could not be decoded: %s",
                      len(body), exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"not an ExportTraceServiceRequest: {exc}")
        try:
            receiver._write(request)
        except Exception as exc:
            receiver.failures += 1
            log.exception("could not write an OTLP export request to %s", receiver.path)
            await context.abort(grpc.StatusCode.INTERNAL, f"could not write the spans: {exc}")
        return bytes(ExportTraceServiceResponse().SerializeToString())

    method = grpc.unary_unary_rpc_method_handler(export)
    return grpc.method_handlers_generic_handler(TRACE_SERVICE, {"Export": method})


class TraceReceiver:
    """An OTLP/gRPC ``TraceService`` that appends one JSON line per export request."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.exports = 0
        """Export requests written (empty ones are not)."""
        self.spans = 0
        self.failures = 0
        """Export requests that could not be decoded or written (each logged as an error)."""
        self.port: int | None = None
        """The bound port while started."""
        self._server: grpc.aio.Server | None = None
        self._file: IO[str] | None = None

    async def start(self, listen: str = "127.0.0.1:0") -> int:
        """Listen on ``HOST:PORT`` (port 0: any free one) and return the bound port."""
        if self._server is not None:
            raise RuntimeError("the receiver is already started")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", _MAX_MESSAGE),
                                          *GRPC_SERVER_OPTIONS])
        server.add_generic_rpc_handlers((_handler(self),))
        try:
            port = bind_grpc(server, listen)  # ListenError: busy port, bad address
            await server.start()
        except BaseException:
            self._file.close()
            self._file = None
            raise
        self._server, self.port = server, port
        log.info("OTLP/gRPC trace receiver on %s (port %d) writing %s", listen, port, self.path)
        return port

    async def stop(self, grace: float | None = 1.0) -> None:
        """Finish in-flight exports (up to ``grace`` seconds), then close the file."""
        server, self._server, self.port = self._server, None, None
        if server is not None:
            await server.stop(grace)
        if self._file is not None:
            self._file.close()
            self._file = None

    async def wait_closed(self) -> None:
        """Return when the server has stopped."""
        if self._server is not None:
            await self._server.wait_for_termination()

    def _write(self, request: Any) -> None:
        # One short append per request, flushed so readers see it while we run; the
        # FileSpanExporter writes its lines in the same compact form.
        count = _span_count(request)
        if count == 0 or self._file is None:
            return
        line = json.dumps(proto_to_otlp_json(request), separators=(",", ":"))
        self._file.write(line + "\n")
        self._file.flush()
        self.exports += 1
        self.spans += count


async def serve_receiver(listen: str, path: str) -> None:
    """Run a receiver on ``listen`` writing ``path`` until cancelled."""
    receiver = TraceReceiver(path)
    await receiver.start(listen)
    try:
        await receiver.wait_closed()
    finally:
        await receiver.stop()
