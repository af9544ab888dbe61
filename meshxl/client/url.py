"""The sidecar's address, checked once."""

from __future__ import annotations

from urllib.parse import urlsplit

from meshxl.errors import InputError

__all__ = ["base_url", "split_url"]


def split_url(url: str) -> tuple[str, str, int, str]:
    """``http://127.0.0.1:7070`` -> ``("http", "127.0.0.1", 7070, "")``; InputError for
    anything but an http(s) URL with a host and no query or fragment."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except (AttributeError, ValueError) as exc:
        raise InputError(f"bad sidecar URL {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"bad sidecar URL {url!r}: expected http://HOST:PORT, "
                         "e.g. http://127.0.0.1:7070")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise InputError(f"bad sidecar URL {url!r}: no query, fragment or credentials "
                         "(the token is given apart)")
    default = 443 if parts.scheme == "https" else 80
    return parts.scheme, parts.hostname, port or default, parts.path.rstrip("/")


def base_url(url: str) -> str:
    """The URL requests' paths are appended to (no trailing slash)."""
    scheme, host, port, prefix = split_url(url)
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}{prefix}"
