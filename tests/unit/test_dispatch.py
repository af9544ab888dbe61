"""Every dispatch on a model enumeration covers every value and raises on an unknown one.

Adding a stickiness algorithm touches: the ``Algorithm`` literal (meshxl/model/spec.py),
the compiler's ``_LB_POLICIES`` (meshxl/xds/resources.py), the Istio renderer's
``_ISTIO_ALGORITHMS`` and ``_ALGORITHM_PATCHES`` (meshxl/istio/render.py), docs/model.md
and a test; this file fails until each table has the new value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from msgspec.structs import replace

from meshxl.istio import pins, render
from meshxl.model import spec as model_spec
from meshxl.model.decode import decode
from meshxl.model.spec import (
    ALGORITHMS,
    HASH_KEYS,
    HEALTH_CHECK_TYPES,
    MEMBERSHIPS,
    MODES,
    PIN_CARRIERS,
    PROTOCOLS,
    REPLICATIONS,
    ClusterSpec,
    Stickiness,
    UnknownChoice,
    choose,
)
from meshxl.statesync import sidecar as statesync_sidecar
from meshxl.xds import protocols, resources

TABLES: list[tuple[str, Mapping[Any, Any], tuple[str, ...]]] = [
    ("xds _LB_POLICIES", resources._LB_POLICIES, ALGORITHMS),
    ("xds _HASH_POLICIES", resources._HASH_POLICIES, HASH_KEYS),
    ("xds _PIN_STATES", resources._PIN_STATES, PIN_CARRIERS),
    ("statesync _HOLDS_ONLY_WHAT_IT_USES", statesync_sidecar._HOLDS_ONLY_WHAT_IT_USES,
     REPLICATIONS),
    ("istio _ISTIO_ALGORITHMS", render._ISTIO_ALGORITHMS, ALGORITHMS),
    ("istio _ALGORITHM_PATCHES", render._ALGORITHM_PATCHES, ALGORITHMS),
    ("istio _ISTIO_HASH_KEYS", render._ISTIO_HASH_KEYS, HASH_KEYS),
    ("istio _PIN_STATES", pins._PIN_STATES, PIN_CARRIERS),
    ("model _HEALTH_CHECK_OF", model_spec._HEALTH_CHECK_OF, PROTOCOLS),
    ("xds protocols _UPSTREAM", protocols._UPSTREAM, PROTOCOLS),
    ("xds protocols _HEALTH_CHECKS", protocols._HEALTH_CHECKS, HEALTH_CHECK_TYPES),
]


@pytest.mark.parametrize(("name", "table", "values"), TABLES, ids=[t[0] for t in TABLES])
def test_every_table_covers_every_value(name: str, table: Mapping[Any, Any],
                                        values: tuple[str, ...]) -> None:
    assert set(table) == set(values), name


def test_choose_raises_on_an_unknown_value() -> None:
    with pytest.raises(UnknownChoice, match="unknown stickiness algorithm 'chord'"):
        choose(resources._LB_POLICIES, "chord", "stickiness algorithm")


def unchecked_stickiness(**fields: Any) -> Stickiness:
    """A Stickiness as if validation had let an unknown value through."""
    return Stickiness(**{"header": "x-session-id", **fields})


def cluster(**fields: Any) -> ClusterSpec:
    return decode({"name": "c", "members": [
        {"name": "a", "address": "127.0.0.1", "port": 8080}], **fields}, ClusterSpec)


def test_an_unknown_algorithm_is_not_compiled_as_ring_hash() -> None:
    spec = replace(cluster(), stickiness=unchecked_stickiness(algorithm="chord"))
    with pytest.raises(UnknownChoice, match="chord"):
        resources.build_cluster(spec)
    with pytest.raises(UnknownChoice, match="chord"):
        render._load_balancer(spec)


def test_an_unknown_mode_or_membership_raises() -> None:
    assert cluster(mode="load-sharing").high_availability is False
    assert cluster().high_availability is True
    assert {cluster(membership=m).registered for m in MEMBERSHIPS} == {True, False}
    assert len(MODES) == 2
    with pytest.raises(UnknownChoice, match="unknown mode"):
        _ = replace(cluster(), mode="active-active").high_availability
    with pytest.raises(UnknownChoice, match="unknown membership"):
        _ = replace(cluster(), membership="dynamic").registered


def test_member_state_tables_cover_every_state() -> None:
    from meshxl.model import MemberState
    from meshxl.operator import tables
    from meshxl.xds import failover

    assert set(tables._STATE_STYLE) == set(MemberState)
    from meshxl.model.runtime import SERVING

    # Every state a member can fail over to has a cause; a serving state is no failover
    # (an overloaded member keeps its sessions), but for a degraded one (sessions move
    # from it, all of them or a share).
    assert set(failover._CAUSES) == set(MemberState) - SERVING | {MemberState.DEGRADED}
    with pytest.raises(UnknownChoice, match="member state"):
        choose(failover._CAUSES, MemberState.READY, "member state")


def test_every_member_state_has_a_reason() -> None:
    from meshxl.model import MemberState
    from meshxl.xds import history

    assert set(history._REASONS) == set(MemberState)
