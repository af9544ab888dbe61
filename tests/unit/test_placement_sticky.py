"""The stored (sticky) base placement: one VS's life cycle moves no other VS's active."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshxl.model.placement import BALANCE, PoolMember, VirtualRoles, base_placement
from meshxl.model.sticky import StoredPlacement, sticky_placement
from tests.unit.test_vsls import POOL

Systems = list[tuple[str, int, int]]


def _prev(placed: dict[str, VirtualRoles], members: list[PoolMember],
          systems: Systems) -> StoredPlacement:
    return StoredPlacement.of(placed, members, systems)


@st.composite
def pools(draw: st.DrawFn) -> tuple[list[PoolMember], Systems]:
    n = draw(st.integers(3, 6))
    members = [PoolMember(f"m{i}", draw(st.sampled_from("ab")),
                          draw(st.sampled_from([50, 100, 100, 150, 200]))) for i in range(n)]
    weights = draw(st.lists(st.sampled_from([1, 1, 1, 2, 3]), min_size=8, max_size=14))
    return members, [(f"t{i:02d}", w, 0) for i, w in enumerate(weights)]


def _others_moved(a: dict[str, VirtualRoles], b: dict[str, VirtualRoles], vs: str) -> int:
    return sum(1 for v in a if v in b and v != vs and a[v].active != b[v].active)


def _above(load: float, fair: float, lightest: int) -> bool:
    return load > BALANCE * fair + 1e-9 and load >= fair + lightest - 1e-9


def _balanced(placed: dict[str, VirtualRoles], members: list[PoolMember],
              systems: Systems, before: dict[str, VirtualRoles]) -> None:
    """Every member within BALANCE x its fair share of active weight, or below its
    share plus the lightest VS (what whole VSs need), or at most what it held
    ``before``, or no single move to a member it leaves within that bound would
    help."""
    weight = {n: w for n, w, _ in systems}
    total = sum(weight.values())
    capacity = sum(m.capacity for m in members)
    load = {m.name: 0 for m in members}
    for v, r in placed.items():
        assert r.active is not None
        load[r.active] += weight[v]
    fair = {m.name: total * m.capacity / capacity for m in members}
    for m in members:
        held = sum(weight[v] for v, r in before.items() if r.active == m.name)
        if held < load[m.name] > BALANCE * fair[m.name] + 1e-9:
            assert load[m.name] < fair[m.name] + min(weight.values()) + 1e-9 or all(
                max((load[m.name] - weight[v]) / fair[m.name],
                    (load[o] + weight[v]) / fair[o]) >= load[m.name] / fair[m.name] - 1e-9
                or _above(load[o] + weight[v], fair[o], min(weight.values()))
                for v, r in placed.items() if r.active == m.name for o in fair if o != m.name)


def _on_the_least_loaded(after: dict[str, VirtualRoles], before: dict[str, VirtualRoles],
                         members: list[PoolMember], systems: Systems, vs: str, w: int) -> None:
    """The new VS went to the member it leaves furthest below its fair share."""
    weight = {n: x for n, x, _ in systems}
    capacity = sum(m.capacity for m in members)
    total = sum(weight.values()) + w
    ratio = {m.name: (sum(weight[v] for v, r in before.items() if r.active == m.name) + w)
             / (total * m.capacity / capacity) for m in members}
    assert ratio[after[vs].active or ""] == min(ratio.values())


def _valid(placed: dict[str, VirtualRoles], members: list[PoolMember]) -> None:
    names = [m.name for m in members]
    site = {m.name: m.site for m in members}
    for r in placed.values():
        assert sorted(r.order) == sorted(names)
        assert r.standby is not None and r.standby != r.active
        if any(site[m] != site[r.active] for m in names):
            assert site[r.standby] != site[r.active]


def test_an_empty_previous_is_the_stateless_placement() -> None:
    members = [PoolMember(f"m{i}", "ab"[i % 2], 100) for i in range(4)]
    systems = [(f"t{i:02d}", 1, 0) for i in range(12)]
    assert sticky_placement("web", members, systems, StoredPlacement((), {})) == base_placement(
        "web", members, systems)
    assert sticky_placement("web", members, systems, None) == base_placement(
        "web", members, systems)


def test_the_issue_example_moves_no_other_active() -> None:
    members = [PoolMember(f"m{i}", "ab"[i % 2], 100) for i in range(4)]
    systems = [(f"t{i:02d}", 1, 0) for i in range(12)]
    before = base_placement("web", members, systems)
    stored = _prev(before, members, systems)
    added = sticky_placement("web", members, [*systems, ("t12", 1, 0)], stored)
    removed = sticky_placement("web", members, systems[1:], stored)
    assert _others_moved(before, added, "t12") == 0
    assert _others_moved(before, removed, "t00") == 0


@settings(max_examples=150, deadline=None)
@given(pools())
def test_storing_the_placement_changes_nothing(pool: tuple[list[PoolMember], Systems]) -> None:
    members, systems = pool
    first = base_placement("p", members, systems)
    assert sticky_placement("p", members, systems, _prev(first, members, systems)) == first
    grown = sticky_placement("p", members, [*systems, ("zz", 2, 0)], _prev(first, members, systems))
    more = [*systems, ("zz", 2, 0)]
    assert sticky_placement("p", members, more, _prev(grown, members, more)) == grown


@settings(max_examples=150, deadline=None)
@given(pools(), st.data())
def test_adding_or_removing_a_vs_moves_no_other_active(
        pool: tuple[list[PoolMember], Systems], data: st.DataObject) -> None:
    members, systems = pool
    before = base_placement("p", members, systems)
    w = data.draw(st.sampled_from([1, 2, 3]))
    stored = _prev(before, members, systems)
    added = sticky_placement("p", members, [*systems, ("zz", w, 0)], stored)
    assert _others_moved(before, added, "zz") == 0
    _valid(added, members)
    _on_the_least_loaded(added, before, members, systems, "zz", w)
    k = data.draw(st.integers(0, len(systems) - 1))
    rest = systems[:k] + systems[k + 1:]
    removed = sticky_placement("p", members, rest, _prev(before, members, systems))
    assert _others_moved(before, removed, systems[k][0]) == 0
    _valid(removed, members)


@settings(max_examples=150, deadline=None)
@given(pools(), st.data())
def test_reweighting_a_vs_moves_at_most_what_the_balance_needs(
        pool: tuple[list[PoolMember], Systems], data: st.DataObject) -> None:
    members, systems = pool
    before = base_placement("p", members, systems)
    k = data.draw(st.integers(0, len(systems) - 1))
    name, old, _ = systems[k]
    new = data.draw(st.integers(1, 4))
    changed = [*systems[:k], (name, new, 0), *systems[k + 1:]]
    after = sticky_placement("p", members, changed, _prev(before, members, systems))
    lightest = min(w for _, w, _ in changed)
    assert _others_moved(before, after, name) <= max(0, math.ceil((new - old) / lightest))
    _valid(after, members)
    assert sticky_placement("p", members, changed, _prev(after, members, changed)) == after


@settings(max_examples=150, deadline=None)
@given(pools(), st.sampled_from("ab"), st.sampled_from([50, 100, 200]))
def test_a_member_appended_takes_roles_only_to_itself(
        pool: tuple[list[PoolMember], Systems], site: str, capacity: int) -> None:
    members, systems = pool
    before = base_placement("p", members, systems)
    grown = [*members, PoolMember("joined", site, capacity)]
    after = sticky_placement("p", grown, systems, _prev(before, members, systems))
    moved = [v for v in before if after[v].active != before[v].active]
    assert all(after[v].active == "joined" for v in moved)
    _valid(after, grown)
    assert sticky_placement("p", grown, systems, _prev(after, grown, systems)) == after


@settings(max_examples=150, deadline=None)
@given(pools(), st.data())
def test_a_member_removed_hands_its_actives_to_their_standbys(
        pool: tuple[list[PoolMember], Systems], data: st.DataObject) -> None:
    members, systems = pool
    before = base_placement("p", members, systems)
    gone = data.draw(st.sampled_from(members)).name
    rest = [m for m in members if m.name != gone]
    after = sticky_placement("p", rest, systems, _prev(before, members, systems))
    _valid(after, rest)
    _balanced(after, rest, systems, before)
    assert sticky_placement("p", rest, systems, _prev(after, rest, systems)) == after


STORED_MODEL = POOL + """
virtual_systems:
  - names: [%s]
    pool: web
"""


def test_the_stored_placement_is_kept_by_the_control_plane_and_the_sidecar() -> None:
    """The record the control plane stores (``pools/POOL/placement``), read back from
    etcd's values, places the control plane's and the sidecar's virtual systems alike:
    with one VS added, no other VS's active moves, where the stateless placement moves
    several."""
    from meshxl.etcd.keys import Keys
    from meshxl.etcd.mesh import runtime_from_values
    from meshxl.model import parse_model
    from meshxl.model.load import parse_unexpanded
    from meshxl.model.vsls import placement_of, stored_placements, vs_roles

    names = [f"t{i:02d}" for i in range(12)]
    before = parse_model(STORED_MODEL % ", ".join(names))
    keys = Keys()
    records = stored_placements(before, None)
    assert set(records) == {"web"}
    values = {keys.pool_placement("web"): json.dumps(records["web"].to_record()).encode()}
    state = runtime_from_values(keys, values)
    assert state.placements == records
    assert stored_placements(before, state) == {}  # stored: nothing to write
    old = placement_of(before, before.pools[0], state).roles
    text = STORED_MODEL % ", ".join([*names, "t12"])
    after = parse_model(text)
    new = placement_of(after, after.pools[0], state).roles
    assert _others_moved(dict(old), dict(new), "t12") == 0
    stateless = placement_of(after, after.pools[0]).roles
    assert _others_moved(dict(old), dict(stateless), "t12") > 0  # what the record avoids
    sidecar = parse_unexpanded(text)
    for vs in [*names, "t12"]:
        assert vs_roles(sidecar, state, vs) == new[vs], vs
    assert set(stored_placements(after, state)) == {"web"}  # the new VS to store


def test_a_bad_stored_placement_is_refused_by_name() -> None:
    for bad in ({"members": "m1", "roles": {}}, {"members": ["m1"], "roles": []},
                {"members": ["m1"], "roles": {"t01": ["m1", None, 0]}},
                {"members": ["m1"], "roles": {"t01": ["m1"]}}):
        with pytest.raises(ValueError, match="stored placement"):
            StoredPlacement.from_record(bad)
