"""Bearer-token authentication of the sidecar's HTTP API.

The API listens on loopback, so it is reachable by every process of the pod (or host)
and by anything the application can be tricked into requesting (SSRF). With a token,
every request but the health checks (``/healthz``, ``/readyz``: probes carry no
secrets) must say ``Authorization: Bearer TOKEN``; otherwise 401 with a JSON body and
``WWW-Authenticate: Bearer``. The token never appears on a command line (``ps`` would
show it): it comes from a file (a Kubernetes Secret volume) or an environment variable.
"""

from __future__ import annotations

from pathlib import Path

from meshxl import bearer
from meshxl import headers as hdr
from meshxl.addr import is_loopback
from meshxl.bearer import TokenError, valid_token

from .http import Authorize, Request, Response, error

__all__ = ["OPEN_PATHS", "TOKEN_ENV", "TokenError", "check_exposure", "read_token",
           "token_check", "valid_token"]

TOKEN_ENV = bearer.STATESYNC_TOKEN_ENV
"""The environment variable holding the token (the alternative to ``--token-file``)."""
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
"""Paths answered without a token: liveness and readiness probes."""

_REALM = 'Bearer realm="meshxl-statesync"'
_AUTHORIZATION = hdr.AUTHORIZATION.lower()


def read_token(token_file: Path | None, environ: dict[str, str]) -> str | None:
    """The token from ``token_file`` (its first line) or ``$MESHXL_STATESYNC_TOKEN``;
    None when neither is given. Both at once is an error (which one would win?)."""
    return bearer.read_token(token_file, environ, TOKEN_ENV)


def check_exposure(host: str, token: str | None) -> None:
    """Refuse an API reachable from other machines without a token."""
    if token is None and not is_loopback(host):
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
    import hmac  # only with a token (it loads OpenSSL's hashes)

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
