"""Listeners whose addresses overlap on one port are refused by validation (pure): a
wildcard and a specific address of its family, ``::`` and anything, one address written
two ways, whatever the clusters' protocols; listeners that cannot meet (two specific
addresses, another port, ``0.0.0.0`` beside an IPv6 address) stay valid. The refusal
names both listeners, their clusters and the port.

A real Envoy's view of the same models (which are accepted, and that traffic reaches
the right one): tests/integration/test_envoy_accepts_models.py."""

from __future__ import annotations

import ipaddress
import itertools
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from meshxl.model import ModelError, parse_model

PORT = 8080


def cluster(name: str, address: str, port: int = PORT, protocol: str = "http") -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name, "protocol": protocol,
        "members": [{"name": "a", "address": "127.0.0.1", "port": 9001}],
        "listener": {"address": address, "port": port}}
    if protocol == "tcp":
        spec["stickiness"] = {"source_ip": True}
    return spec


def refusals(*clusters: dict[str, Any]) -> list[str]:
    try:
        parse_model(yaml.safe_dump({"clusters": list(clusters)}))
    except ModelError as exc:
        return [str(p) for p in exc.problems]
    return []


OVERLAPPING = [
    ("0.0.0.0", "127.0.0.1"),  # the reported case: wildcard v4 and a specific address
    ("0.0.0.0", "10.1.2.3"),
    ("::", "::1"),  # wildcard v6 and a specific address
    ("::", "0.0.0.0"),  # `::` stands for every address of the port, IPv4 included
    ("::", "127.0.0.1"),
    ("::", "0::0"),  # one address written two ways
    ("::1", "0:0:0:0:0:0:0:1"),
    ("0.0.0.0", "::ffff:127.0.0.1"),  # an IPv4-mapped address is its IPv4 address
    ("127.0.0.1", "::ffff:7f00:1"),
]
DISJOINT = [
    ("127.0.0.1", "127.0.0.2"),
    ("127.0.0.1", "::1"),
    ("0.0.0.0", "::1"),  # the IPv4 wildcard takes no IPv6 client
    ("10.1.2.3", "fd00::1"),
]
PROTOCOLS = [("http", "tcp"), ("tcp", "http"), ("http", "http"), ("grpc", "http2"),
             ("tcp", "tcp")]


@pytest.mark.parametrize(("first", "second"), OVERLAPPING)
@pytest.mark.parametrize(("p1", "p2"), PROTOCOLS)
def test_overlapping_listeners_are_refused_naming_both(first: str, second: str, p1: str,
                                                       p2: str) -> None:
    found = refusals(cluster("front", first, protocol=p1), cluster("back", second, protocol=p2))
    overlaps = [p for p in found if "overlap" in p]
    assert len(overlaps) == 1, found
    text = overlaps[0]
    assert text.startswith("clusters[1].listener")
    for word in (f"{first}", f"{second}", "front", "back", f"port {PORT}", p1, p2):
        assert word in text, (word, text)


@pytest.mark.parametrize(("first", "second"), DISJOINT)
@pytest.mark.parametrize(("p1", "p2"), PROTOCOLS)
def test_listeners_that_cannot_meet_stay_valid(first: str, second: str, p1: str,
                                               p2: str) -> None:
    assert refusals(cluster("front", first, protocol=p1),
                    cluster("back", second, protocol=p2)) == []


def test_another_port_never_overlaps_and_one_listener_stays_shared() -> None:
    assert refusals(cluster("front", "0.0.0.0"), cluster("back", "127.0.0.1", port=PORT + 1),
                    cluster("side", "::", port=PORT + 2)) == []
    # Clusters sharing one listener (the same address, written the same way) are routes
    # of that listener, as before.
    assert refusals(cluster("a", "0.0.0.0"), {**cluster("b", "0.0.0.0"),
                                              "route": {"prefix": "/b"}}) == []


def test_a_wildcard_among_many_is_named_once_per_listener_it_covers() -> None:
    found = refusals(cluster("a", "127.0.0.1"), cluster("b", "127.0.0.2"),
                     cluster("c", "0.0.0.0"))
    overlaps = [p for p in found if "overlap" in p]
    assert len(overlaps) == 2, found
    assert all(p.startswith("clusters[2].listener") for p in overlaps)
    assert {"a", "b"} == {n for n in ("a", "b") for p in overlaps if f"cluster {n!r}" in p}


# -- the rule, as sets of addresses --------------------------------------------------------

POOL = ["0.0.0.0", "127.0.0.1", "127.0.0.2", "10.0.0.1", "::", "::1", "fd00::1",
        "::ffff:127.0.0.1", "0::0", "0:0:0:0:0:0:0:1", "::ffff:10.0.0.1"]


def _covers(address: str) -> set[str]:
    """Which addresses of a small universe a listener on ``address`` takes: a model of
    the rule written apart from the code (a wildcard takes its family, ``::`` both)."""
    universe = {"127.0.0.1", "127.0.0.2", "10.0.0.1", "10.9.9.9", "::1", "fd00::1", "fd00::2"}
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified:
        return universe if ip.version == 6 else {a for a in universe if "." in a}
    return {str(ip)}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(POOL), min_size=2, max_size=4),
       st.lists(st.sampled_from(["http", "tcp", "grpc"]), min_size=4, max_size=4))
def test_refused_exactly_when_two_listeners_take_a_common_address(
        addresses: list[str], protocols: list[str]) -> None:
    clusters = [cluster(f"c{i}", a, protocol=protocols[i]) for i, a in enumerate(addresses)]
    found = [p for p in refusals(*clusters) if "overlap" in p]
    distinct = list(dict.fromkeys(addresses))
    expected = any(_covers(a) & _covers(b) for a, b in itertools.combinations(distinct, 2))
    assert bool(found) == expected, (addresses, found)
