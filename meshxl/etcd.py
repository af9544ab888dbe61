"""Connecting to etcd: endpoint parsing and one aetcd client for a list of endpoints.

aetcd dials ``f"{host}:{port}"``; gRPC's ``ipv4:``/``ipv6:`` target syntax lists
several addresses in one target, so a multi-member ``--etcd`` list becomes one
channel that fails over between members without any change to aetcd.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

import aetcd


class EtcdEndpointError(ValueError):
    """An ``--etcd`` value that is not a list of http://HOST:PORT URLs."""


def parse_endpoints(urls: str) -> list[tuple[str, int]]:
    """Parse ``http://h1:2379,http://h2:2379`` (scheme optional) into (host, port)."""
    endpoints = []
    for raw in (u.strip() for u in urls.split(",")):
        if not raw:
            continue
        parts = urlsplit(raw if "://" in raw else f"http://{raw}")
        if parts.scheme != "http":
            raise EtcdEndpointError(
                f"unsupported etcd URL scheme {parts.scheme!r} in {raw!r}: use http://HOST:PORT")
        try:
            port = parts.port
        except ValueError:
            raise EtcdEndpointError(f"bad port in etcd URL {raw!r}") from None
        if not parts.hostname or port is None or parts.path not in ("", "/"):
            raise EtcdEndpointError(f"etcd URL must be http://HOST:PORT, got {raw!r}")
        endpoints.append((parts.hostname, port))
    if not endpoints:
        raise EtcdEndpointError("no etcd endpoint given")
    return endpoints


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _literal(host: str, port: int) -> list[tuple[str, int]]:
    """IP literals for a host (several members need them in one gRPC target)."""
    try:
        ipaddress.ip_address(host)
        return [(host, port)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise EtcdEndpointError(f"cannot resolve etcd host {host!r}: {exc}") from None
    return list(dict.fromkeys((str(i[4][0]), port) for i in infos))


def client(urls: str | list[tuple[str, int]], *, timeout: float | None = 5.0) -> aetcd.Client:
    """An (unconnected) aetcd client for one or several etcd endpoints."""
    endpoints = parse_endpoints(urls) if isinstance(urls, str) else urls
    options = {
        "grpc.keepalive_time_ms": 2000,
        "grpc.keepalive_timeout_ms": 2000,
        "grpc.keepalive_permit_without_calls": 1,
        "grpc.initial_reconnect_backoff_ms": 100,
        "grpc.max_reconnect_backoff_ms": 1000,
        # A page of sessions (each up to ~1 MiB) or a watch response can pass gRPC's
        # 4 MiB default; readers also shrink their pages when a response is too large.
        "grpc.max_receive_message_length": 32 * 1024 * 1024,
    }
    if len(endpoints) == 1:
        host, port = endpoints[0]
        return aetcd.Client(host=host, port=port, timeout=timeout, options=options)
    endpoints = [lit for h, p in endpoints for lit in _literal(h, p)]
    v6 = {":" in h for h, _ in endpoints}
    if len(v6) > 1:
        raise EtcdEndpointError("etcd endpoints mix IPv4 and IPv6 addresses: use one family")
    family = "ipv6" if v6 == {True} else "ipv4"
    *rest, (last_host, last_port) = endpoints
    # aetcd appends ":{port}" to host: put every endpoint but the last port in "host".
    head = ",".join(f"{_host(h)}:{p}" for h, p in rest)
    return aetcd.Client(host=f"{family}:{head},{_host(last_host)}", port=last_port,
                        timeout=timeout, options=options)
