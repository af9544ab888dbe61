"""The sidecar server's answers: a response, the JSON error answers, and the head of an
answer as sent (checked, so no header can split it)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

from meshxl.errors import InputError
from meshxl.httpbase import REASONS, error_body

__all__ = ["JSON", "RequestRefused", "Response", "encode_head", "error", "json_response"]

JSON = "application/json"
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class RequestRefused(InputError):
    """A request refused with a status the error family does not name (415, 418...):
    ``status`` with a JSON error body and ``headers``."""

    def __init__(self, status: int, message: str, headers: Sequence[tuple[str, str]] = (),
                 **details: Any):
        super().__init__(message, **details)
        self.status, self.headers = status, list(headers)


class Response:
    """An answer: status, body, headers (``Content-Length`` and ``Date`` are added)."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int = 200, body: bytes = b"",
                 headers: list[tuple[str, str]] | None = None):
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else []

    def header(self, name: str) -> str | None:
        lower = name.lower()
        return next((v for n, v in self.headers if n.lower() == lower), None)


def json_response(data: Any, status: int = 200,
                  headers: Iterable[tuple[str, str]] = ()) -> Response:
    body = json.dumps(data, default=str).encode()
    return Response(status, body, [("Content-Type", JSON), *headers])


def error(status: int, message: str, headers: Iterable[tuple[str, str]] = (),
          **details: Any) -> Response:
    """The JSON error answer every meshxl server gives: ``{"error", "status", ...}``."""
    return json_response(error_body(status, message, **details), status, headers)


_SENDABLE_NAMES: set[str] = set()
"""Header names already checked (the few the API sends, checked once each)."""


def encode_head(response: Response, date: bytes, keep_alive: bool, http10: bool) -> bytes:
    """The status line and header block, checked: a value with a line break (or any
    other control character) would split the answer."""
    status = response.status
    lines = []
    for name, value in response.headers:
        if name not in _SENDABLE_NAMES:
            if not _TOKEN.match(name):
                raise ValueError(f"header name {name[:60]!r} cannot be sent")
            if len(_SENDABLE_NAMES) < 256:
                _SENDABLE_NAMES.add(name)
        if not value.isprintable():
            raise ValueError(f"header {name[:60]!r} has a value that cannot be sent")
        lines.append(f"{name}: {value}\r\n")
    if status != 204 and not 100 <= status < 200:
        lines.append(f"Content-Length: {len(response.body)}\r\n")
    if not keep_alive:
        lines.append("Connection: close\r\n")
    elif http10:
        lines.append("Connection: keep-alive\r\n")
    return (b"HTTP/1.1 %d %s\r\nDate: %s\r\n" % (status, REASONS.get(status, b"Unknown"), date)
            + "".join(lines).encode("latin-1") + b"\r\n")
