"""What each protocol allows: the checks that refuse a model whose settings cannot work
with what the cluster speaks (pure).

A cookie needs HTTP, a gRPC health check needs HTTP/2, a TCP connection has no headers,
no routes and no retry conditions, and a TCP listener belongs to one cluster: each
problem names the field that cannot work and what would.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from .spec import GRPC_RETRY_CONDITIONS, ClusterSpec, Route
from .traffic import RETRY_ON

__all__ = ["check_protocols", "grpc_health_ready"]

_HTTP2 = ("http2", "grpc")


class Problem(NamedTuple):
    """Where (field path), what, and the value (``meshxl.model.Problem``'s fields)."""

    path: str
    message: str
    value: Any = None


def grpc_health_ready(spec: ClusterSpec) -> bool:
    """A gRPC health check can reach the members: they speak HTTP/2."""
    return spec.protocol in _HTTP2


def _stickiness(base: str, c: ClusterSpec) -> Iterator[Problem]:
    st = c.stickiness
    if st is None:
        return
    if c.protocol == "tcp":
        if st.header is not None:
            yield Problem(f"{base}.stickiness.header", "a TCP connection has no headers: "
                          "hash on source_ip (protocol: tcp)", st.header)
        if st.cookie is not None:
            yield Problem(f"{base}.stickiness.cookie", "a TCP connection has no cookies: "
                          "hash on source_ip (protocol: tcp)")
        if st.pin is not None:
            yield Problem(f"{base}.stickiness.pin", "pins travel in HTTP cookies or "
                          "headers; a TCP connection stays on its member anyway (protocol: "
                          "tcp)")
    elif c.protocol == "grpc":
        if st.cookie is not None:
            yield Problem(f"{base}.stickiness.cookie", "gRPC clients do not keep cookies: "
                          "hash on a metadata header (stickiness.header)")
        if st.pin is not None and st.pin.cookie is not None:
            yield Problem(f"{base}.stickiness.pin", "gRPC clients do not keep cookies: pin "
                          "with a header (pin: {header: NAME}) the client sends back")


def _health_check(base: str, c: ClusterSpec) -> Iterator[Problem]:
    hc = c.health_check
    if hc.enabled and hc.type == "grpc" and not grpc_health_ready(c):
        yield Problem(f"{base}.health_check.type", "a gRPC health check speaks HTTP/2: the "
                      f"members speak {_SPOKEN[c.protocol]} (use protocol: grpc, or an http "
                      "or tcp check)", hc.type)
    if hc.grpc_service and hc.type != "grpc":
        yield Problem(f"{base}.health_check.grpc_service", "only a gRPC health check "
                      "(type: grpc) asks about a service", hc.grpc_service)


def _retries(base: str, c: ClusterSpec) -> Iterator[Problem]:
    r = c.retries
    if c.protocol == "tcp":
        if list(r.retry_on) != list(RETRY_ON):
            yield Problem(f"{base}.retries.retry_on", "a TCP connection is retried only when "
                          "it cannot connect (retries.attempts); there are no requests to "
                          "retry on a condition")
        return
    if c.protocol != "grpc":
        grpc = [x for x in r.retry_on if x in GRPC_RETRY_CONDITIONS]
        if grpc:
            yield Problem(f"{base}.retries.retry_on", f"{', '.join(grpc)}: gRPC statuses, "
                          f"and the members speak {_SPOKEN[c.protocol]} (protocol: grpc)",
                          grpc)


def _http_only(base: str, c: ClusterSpec) -> Iterator[Problem]:
    if c.websocket and c.protocol != "http":
        yield Problem(f"{base}.websocket", "WebSocket upgrades are HTTP/1.1 requests: only "
                      f"protocol: http carries them (this cluster: {c.protocol})", c.websocket)
    if c.protocol == "tcp" and c.route != Route():
        yield Problem(f"{base}.route", "a TCP cluster has no HTTP routes (its listener "
                      "forwards every connection)")


_SPOKEN = {"http": "HTTP/1.1", "http2": "HTTP/2", "grpc": "gRPC", "tcp": "plain TCP"}


def check_protocols(clusters: Sequence[ClusterSpec]) -> Iterator[Problem]:
    """Every combination of a cluster's settings that its protocol cannot carry, and TCP
    listeners shared with another cluster."""
    owners: dict[tuple[str, int], list[int]] = {}
    for i, c in enumerate(clusters):
        base = f"clusters[{i}]"
        yield from _stickiness(base, c)
        yield from _health_check(base, c)
        yield from _retries(base, c)
        yield from _http_only(base, c)
        if c.listener is not None:
            owners.setdefault((c.listener.address, c.listener.port), []).append(i)
    for (address, port), indexes in owners.items():
        tcp = [i for i in indexes if clusters[i].protocol == "tcp"]
        if tcp and len(indexes) > 1:
            others = ", ".join(clusters[i].name for i in indexes if i != tcp[0])
            yield Problem(f"clusters[{tcp[0]}].listener", f"a TCP listener forwards every "
                          f"connection to one cluster, and {others} also listen on "
                          f"{address}:{port}: give each its own port", f"{address}:{port}")
