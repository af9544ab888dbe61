"""OTLP span export to a collector (gRPC or HTTP/protobuf), configured by ``OTEL_*``.

These take the place of opentelemetry-exporter-otlp-proto-grpc/-http, whose generated
modules live at the paths (``opentelemetry/proto/...``) where xds-protos installs an
older, incompatible copy: after a plain ``pip install`` those exporters fail to import.
Here spans are mapped by the SDK's OTLP/JSON encoder and serialized with meshxl's own
descriptors (``otlp.py``), so export works whichever copy is on disk.

Configuration follows the OpenTelemetry variables, per signal first
(``OTEL_EXPORTER_OTLP_TRACES_*``) then general (``OTEL_EXPORTER_OTLP_*``): ``ENDPOINT``,
``HEADERS`` (``k=v,k2=v2``, URL-encoded), ``TIMEOUT`` (seconds, as the Python SDK
reads it), ``COMPRESSION`` (``gzip``), ``CERTIFICATE`` (CA file) and, for gRPC
endpoints without a scheme, ``INSECURE``.
"""

from __future__ import annotations

import abc
import gzip
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from .otlp import EXPORT_METHOD, ExportTraceServiceResponse, encode_spans

log = logging.getLogger(__name__)

_RETRYABLE_GRPC = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                             grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED})
_RETRYABLE_HTTP = frozenset({429, 502, 503, 504})
_ATTEMPTS = 5


def _setting(name: str) -> str | None:
    value = (os.environ.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}")
             or os.environ.get(f"OTEL_EXPORTER_OTLP_{name}"))
    return value.strip() if value and value.strip() else None


def _headers(text: str | None) -> dict[str, str]:
    headers: dict[str, str] = {}
    for item in (text or "").split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            if item.strip():
                raise ValueError(f"OTEL_EXPORTER_OTLP_HEADERS: {item.strip()!r} is not KEY=VALUE")
            continue
        headers[urllib.parse.unquote(key.strip()).lower()] = urllib.parse.unquote(value.strip())
    return headers


@dataclass(frozen=True)
class ExportSettings:
    """Where and how spans go; ``from_env`` reads the ``OTEL_*`` variables."""

    endpoint: str
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float = 10.0
    gzip: bool = False
    certificate: str | None = None
    insecure: bool | None = None

    @classmethod
    def from_env(cls, protocol: str) -> ExportSettings:
        traces_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        endpoint = traces_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        if protocol == "grpc":
            endpoint = endpoint or "http://localhost:4317"
        elif not traces_endpoint:  # the general endpoint is a base: append the signal path
            endpoint = (endpoint or "http://localhost:4318").rstrip("/") + "/v1/traces"
        compression = (_setting("COMPRESSION") or "none").lower()
        if compression not in ("none", "gzip"):
            raise ValueError(f"OTEL_EXPORTER_OTLP_COMPRESSION {compression!r}: use gzip or none")
        insecure = _setting("INSECURE")
        try:
            timeout = float(_setting("TIMEOUT") or 10.0)
        except ValueError:
            raise ValueError(f"OTEL_EXPORTER_OTLP_TIMEOUT {_setting('TIMEOUT')!r} is not a "
                             "number of seconds") from None
        if timeout <= 0:
            raise ValueError(f"OTEL_EXPORTER_OTLP_TIMEOUT must be positive, got {timeout}")
        return cls(endpoint=endpoint, headers=_headers(_setting("HEADERS")), timeout=timeout,
                   gzip=compression == "gzip", certificate=_setting("CERTIFICATE"),
                   insecure=None if insecure is None else insecure.lower() == "true")


class _RetryingExporter(SpanExporter, abc.ABC):
    """Encode once, send with bounded retries on transient failures (with jittered
    exponential backoff, all within ``timeout``); the batch processor calls ``export``
    from its own thread."""

    def __init__(self, settings: ExportSettings) -> None:
        self.settings = settings
        self._stopped = threading.Event()

    @abc.abstractmethod
    def _send(self, body: bytes, timeout: float) -> bool | None:
        """True: sent; False: failed for good; None: transient, try again."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._stopped.is_set():
            return SpanExportResult.FAILURE
        body = encode_spans(spans)
        deadline = _now() + self.settings.timeout
        for attempt in range(_ATTEMPTS):
            remaining = deadline - _now()
            if remaining <= 0:
                break
            outcome = self._send(body, remaining)
            if outcome is not None:
                return SpanExportResult.SUCCESS if outcome else SpanExportResult.FAILURE
            pause = min(2.0 ** attempt * random.uniform(0.8, 1.2), deadline - _now())
            if pause <= 0 or self._stopped.wait(pause):
                break
        log.error("OTLP export of %d spans to %s failed: retries or time used up", len(spans),
                  self.settings.endpoint)
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self._stopped.set()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _now() -> float:
    return time.monotonic()


class GrpcSpanExporter(_RetryingExporter):
    """OTLP/gRPC ``TraceService/Export``."""

    def __init__(self, settings: ExportSettings) -> None:
        super().__init__(settings)
        parsed = urllib.parse.urlparse(settings.endpoint)
        if parsed.scheme in ("http", "https"):
            target, secure = parsed.netloc, parsed.scheme == "https"
        else:
            target, secure = settings.endpoint, not settings.insecure
        options = [("grpc.max_send_message_length", 32 * 1024 * 1024)]
        compression = grpc.Compression.Gzip if settings.gzip else None
        if secure:
            roots = None
            if settings.certificate:
                try:
                    with open(settings.certificate, "rb") as f:
                        roots = f.read()
                except OSError as exc:
                    raise ValueError(f"OTEL_EXPORTER_OTLP_CERTIFICATE {settings.certificate}: "
                                     f"{exc.strerror}") from None
            self._channel = grpc.secure_channel(
                target, grpc.ssl_channel_credentials(roots), options, compression)
        else:
            self._channel = grpc.insecure_channel(target, options, compression)
        self._export = self._channel.unary_unary(
            EXPORT_METHOD, response_deserializer=ExportTraceServiceResponse.FromString)

    def _send(self, body: bytes, timeout: float) -> bool | None:
        try:
            self._export(body, timeout=timeout, metadata=tuple(self.settings.headers.items()))
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if code in _RETRYABLE_GRPC:
                log.warning("OTLP export to %s: %s, retrying", self.settings.endpoint, code)
                return None
            log.error("OTLP export to %s failed: %s", self.settings.endpoint, exc)
            return False
        return True

    def shutdown(self) -> None:
        super().shutdown()
        self._channel.close()


class HttpSpanExporter(_RetryingExporter):
    """OTLP/HTTP with a binary protobuf body (``application/x-protobuf``)."""

    def _send(self, body: bytes, timeout: float) -> bool | None:
        headers = {"content-type": "application/x-protobuf", **self.settings.headers}
        if self.settings.gzip:
            body, headers["content-encoding"] = gzip.compress(body), "gzip"
        request = urllib.request.Request(self.settings.endpoint, data=body, headers=headers,
                                         method="POST")
        context = None
        if self.settings.certificate:
            import ssl

            context = ssl.create_default_context(cafile=self.settings.certificate)
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=context) as answer:
                answer.read()
        except urllib.error.HTTPError as exc:
            if exc.code in _RETRYABLE_HTTP:
                log.warning("OTLP export to %s: HTTP %d, retrying", self.settings.endpoint,
                            exc.code)
                return None
            log.error("OTLP export to %s failed: HTTP %d", self.settings.endpoint, exc.code)
            return False
        except (urllib.error.URLError, OSError) as exc:
            log.warning("OTLP export to %s: %s, retrying", self.settings.endpoint, exc)
            return None
        return True


def otlp_exporter(protocol: str) -> SpanExporter:
    """The exporter for ``OTEL_EXPORTER_OTLP_PROTOCOL`` (``grpc`` or ``http/protobuf``)."""
    if protocol == "grpc":
        return GrpcSpanExporter(ExportSettings.from_env("grpc"))
    if protocol in ("http/protobuf", "http"):
        return HttpSpanExporter(ExportSettings.from_env("http/protobuf"))
    raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL {protocol!r} is not supported: "
                     "use grpc or http/protobuf")
