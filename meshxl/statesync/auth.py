"""Bearer-token authentication of the sidecar's HTTP API.

The API listens on loopback, so it is reachable by every process of the pod (or host)
and by anything the application can be tricked into requesting (SSRF). With a token,
every request but the health checks (``/healthz``, ``/readyz``: probes carry no
secrets) must say ``Authorization: Bearer TOKEN``; otherwise 401 with a JSON body and
``WWW-Authenticate: Bearer``. The token never appears on a command line (``ps`` would
show it): it comes from a file (a Kubernetes Secret volume) or an environment variable.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from pathlib import Path

from meshxl import headers as hdr
from meshxl.errors import InputError

from .server import Authorize, Request, Response, error

__all__ = ["OPEN_PATHS", "TOKEN_ENV", "TokenError", "check_exposure", "read_token",
           "token_check", "valid_token"]

TOKEN_ENV = "MESHXL_STATESYNC_TOKEN"
"""The environment variable holding the token (the alternative to ``--token-file``)."""
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
"""Paths answered without a token: liveness and readiness probes."""

_REALM = 'Bearer realm="meshxl-statesync"'
# RFC 6750 b64token: what an Authorization header can carry without quoting.
_TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
MIN_TOKEN_LENGTH = 16
MAX_TOKEN_LENGTH = 4096
_AUTHORIZATION = hdr.AUTHORIZATION.lower()


class TokenError(InputError):
    """A token (or token file) that cannot be used; the message says why."""


def valid_token(token: str, source: str) -> str:
    """``token`` if it is usable as a bearer token, else :class:`TokenError`."""
    if not MIN_TOKEN_LENGTH <= len(token) <= MAX_TOKEN_LENGTH:
        raise TokenError(f"the token from {source} must be {MIN_TOKEN_LENGTH} to "
                         f"{MAX_TOKEN_LENGTH} characters long (got {len(token)})")
    if not _TOKEN.match(token):
        raise TokenError(f"the token from {source} may hold only letters, digits and "
                         "- . _ ~ + / (then = padding), e.g. `openssl rand -hex 32`")
    return token


def read_token(token_file: Path | None, environ: dict[str, str]) -> str | None:
    """The token from ``token_file`` (its first line) or ``$MESHXL_STATESYNC_TOKEN``;
    None when neither is given. Both at once is an error (which one would win?)."""
    from_env = environ.get(TOKEN_ENV) or None
    if token_file is None:
        return valid_token(from_env.strip(), TOKEN_ENV) if from_env else None
    if from_env:
        raise TokenError(f"give the token once: --token-file or {TOKEN_ENV}, not both")
    try:
        text = token_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise TokenError(f"cannot read the token file {token_file}: {reason}") from None
    lines = text.strip().splitlines()
    if not lines:
        raise TokenError(f"the token file {token_file} is empty")
    return valid_token(lines[0].strip(), str(token_file))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None) -> None:
    """Refuse an API reachable from other machines without a token."""
    if token is None and not _is_loopback(host):
        raise TokenError(f"the sidecar API would listen on {host}, which is not a loopback "
                         f"address, without authentication: give --token-file (or "
                         f"{TOKEN_ENV}), or listen on 127.0.0.1")


def _unauthorized(message: str) -> Response:
    return error(401, message, [(hdr.WWW_AUTHENTICATE, _REALM)])


def token_check(token: str) -> Authorize:
    """The server's check of every request's head: ``Authorization: Bearer <token>``
    (a 401 refusal), before any routing or body.

    The comparison takes the same time wherever the tokens differ (hmac.compare_digest
    on bytes), so response times do not leak the token a character at a time.
    """
    expected = token.encode("ascii")

    def check(request: Request) -> Response | None:
        if request.path in OPEN_PATHS:
            return None
        header = request.headers.get(_AUTHORIZATION)
        if header is None:
            return _unauthorized("this API needs a token: Authorization: Bearer <token>")
        scheme, _, presented = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return _unauthorized("the Authorization header must be 'Bearer <token>'")
        given = presented.strip().encode("latin-1")  # the header's bytes, as received
        if not hmac.compare_digest(given, expected):
            return _unauthorized("invalid token")
        return None

    return check
