"""Listeners that would share a port's clients (pure).

Clusters naming one listener address (the same text) share one Envoy listener: they
are routes of it. Two *different* listener addresses on one port are two Envoy
listeners, and when a client address reaches both, which one takes a connection is
up to the kernel, not the model: a TCP listener on ``0.0.0.0:P`` beside an HTTP
listener on ``127.0.0.1:P`` splits the loopback clients between them. So the model
refuses every pair of listeners on one port whose addresses overlap:

* a wildcard (``0.0.0.0``, ``::``) and any address of its family;
* ``::`` and anything at all: it stands for every address of the port, as a
  dual-stack socket does (Envoy binds it IPv6-only, so an IPv4 listener beside it
  would split the port's clients by address family);
* one address written two ways (``::`` and ``0::0``; an IPv4-mapped IPv6 address
  ``::ffff:A.B.C.D`` and ``A.B.C.D``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from .spec import ClusterSpec

__all__ = ["check_listeners", "overlap"]

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


class Problem(NamedTuple):
    """Where (field path), what, and the value (``meshxl.model.Problem``'s fields)."""

    path: str
    message: str
    value: str | None = None


def _address(text: str) -> IP:
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def overlap(first: str, second: str) -> str | None:
    """Why listeners on ``first`` and ``second`` (one port, two different texts) would
    take the same clients, or None when no client address reaches both."""
    a, b = _address(first), _address(second)
    if a == b:
        return "the same address written two ways"
    for wide, other in ((a, b), (b, a)):
        if not wide.is_unspecified:
            continue
        if wide.version == 6:
            return f"{wide} takes every address of the port, IPv4 ones too"
        if other.version == 4:
            return f"{wide} takes every IPv4 address of the port"
    return None


def check_listeners(clusters: Sequence[ClusterSpec]) -> Iterator[Problem]:
    """One problem per pair of listeners on one port whose addresses overlap, on the
    later listener's field, naming both listeners and their clusters."""
    by_port: dict[int, dict[str, int]] = {}  # port -> listener address -> first cluster
    for i, c in enumerate(clusters):
        if c.listener is None:
            continue
        listeners = by_port.setdefault(c.listener.port, {})
        address = c.listener.address
        if address in listeners:
            continue  # the same listener: a route of it
        for other, j in listeners.items():
            why = overlap(other, address)
            if why is None:
                continue
            first = clusters[j]
            port = c.listener.port
            yield Problem(
                f"clusters[{i}].listener",
                f"listener {_shown(address, port)} of cluster {c.name!r} ({c.protocol}) "
                f"overlaps listener {_shown(other, port)} of cluster {first.name!r} "
                f"({first.protocol}) on port {port}: {why}, so Envoy would split "
                "their clients between two listeners; give one of them another port, "
                "or both the same address",
                _shown(address, port))
        listeners[address] = i


def _shown(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
