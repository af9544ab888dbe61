"""Bearer tokens: what a usable token looks like and where one is read from.

Shared by the two servers that take one (the sidecar's session API, the control
plane's ADS port) and the commands that send one. A token never appears on a command
line (``ps`` would show it): it comes from a file (a Kubernetes Secret volume) or an
environment variable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from meshxl.errors import InputError

__all__ = ["MAX_TOKEN_LENGTH", "MIN_TOKEN_LENGTH", "STATESYNC_TOKEN_ENV",
           "STATESYNC_TOKEN_FILE_ENV", "TokenError",
           "bearer_matches", "read_token", "valid_token"]

# RFC 6750 b64token: what an Authorization header can carry without quoting.
_TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
MIN_TOKEN_LENGTH = 16
MAX_TOKEN_LENGTH = 4096
STATESYNC_TOKEN_ENV = "MESHXL_STATESYNC_TOKEN"
"""The sidecar API's token, read by the sidecar and by whatever calls its API (an app,
``meshxl drill``): here, not in :mod:`meshxl.statesync`, so a caller needs none of the
sidecar's code (importing that package costs an app a quarter of a second of CPU)."""
STATESYNC_TOKEN_FILE_ENV = "MESHXL_STATESYNC_TOKEN_FILE"
"""The file holding that token (a mounted Secret), for those that take a file."""


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


def read_token(token_file: Path | None, environ: Mapping[str, str], variable: str,
               option: str = "--token-file") -> str | None:
    """The token from ``token_file`` (its first line) or the environment ``variable``;
    None when neither is given. Both at once is an error (which one would win?)."""
    from_env = environ.get(variable) or None
    if token_file is None:
        return valid_token(from_env.strip(), variable) if from_env else None
    if from_env:
        raise TokenError(f"give the token once: {option} or {variable}, not both")
    try:
        text = token_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise TokenError(f"cannot read the token file {token_file}: {reason}") from None
    lines = text.strip().splitlines()
    if not lines:
        raise TokenError(f"the token file {token_file} is empty")
    return valid_token(lines[0].strip(), str(token_file))


def bearer_matches(value: str | None, token: str) -> bool:
    """Whether an ``Authorization`` value is ``Bearer <token>`` (the scheme is
    case-insensitive, RFC 7235), compared in constant time."""
    if value is None:
        return False
    scheme, _, given = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    import hmac  # only where tokens are used (it loads OpenSSL's hashes)

    return hmac.compare_digest(given.strip().encode(), token.encode())
