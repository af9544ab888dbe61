"""etcd endpoint lists (``--etcd``, a shard's URLs): their syntax, checked without I/O.

The one parser of ``http(s)://HOST:PORT[,...]``: :func:`meshxl.etcd.client` dials what
it returns, and a shard map (:mod:`meshxl.etcd.shards`) is refused at parse when one of
its shards' URLs is not one, so no process ever holds a map it cannot dial.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from meshxl.errors import InputError

__all__ = ["EtcdEndpointError", "parse_urls"]


class EtcdEndpointError(InputError):
    """An ``--etcd`` value that is not a list of http(s)://HOST:PORT URLs."""


def parse_urls(urls: str) -> tuple[bool, list[tuple[str, int]]]:
    """``(tls, [(host, port), ...])`` of ``http(s)://h1:2379,...`` (scheme optional:
    http). All endpoints must use one scheme."""
    endpoints = []
    schemes = set()
    for raw in (u.strip() for u in urls.split(",")):
        if not raw:
            continue
        parts = urlsplit(raw if "://" in raw else f"http://{raw}")
        if parts.scheme not in ("http", "https"):
            raise EtcdEndpointError(f"unsupported etcd URL scheme {parts.scheme!r} in {raw!r}: "
                                    "use http://HOST:PORT or https://HOST:PORT")
        try:
            port = parts.port
        except ValueError:
            raise EtcdEndpointError(f"bad port in etcd URL {raw!r}") from None
        if not parts.hostname or port is None or parts.path not in ("", "/") \
                or parts.query or parts.fragment:
            raise EtcdEndpointError(f"etcd URL must be http(s)://HOST:PORT, got {raw!r}")
        schemes.add(parts.scheme)
        endpoints.append((parts.hostname, port))
    if not endpoints:
        raise EtcdEndpointError("no etcd endpoint given")
    if len(schemes) > 1:
        raise EtcdEndpointError(f"etcd endpoints mix http:// and https:// in {urls!r}: "
                                "use one scheme")
    return schemes == {"https"}, endpoints
