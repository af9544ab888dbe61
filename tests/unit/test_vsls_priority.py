"""A virtual system's priority list set by the operator (``meshxl vs priority``; ``vs
move`` is its one-member case): the placement with a list (property tests on generated
pools), its record in etcd, its checks and the command's one-line errors."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from meshxl.cli.root import main
from meshxl.etcd.keys import Keys
from meshxl.etcd.mesh import runtime_from_values
from meshxl.model import AdminAction, RuntimeState, parse_model
from meshxl.model.placement import (
    PoolMember,
    VirtualRoles,
    base_placement,
    live_placement,
    priority_placement,
    site_rule_broken,
)
from meshxl.model.records import PriorityList
from meshxl.model.vsls import check_priority, placed, placement_of, site_rule_warnings
from meshxl.xds.compiler import Compiler
from tests.unit.test_vsls import POOL

MODEL = POOL + """virtual_systems:
  - names: [t01, t02, t03, t04, t05, t06, t07, t08]
    pool: web
  - {name: big, pool: web, backups: 1}
  - {name: shared, pool: web, mode: load-sharing}
"""
SITE = {"m1": "a", "m2": "b", "m3": "a", "m4": "b"}


def listed(vs: str, *order: str, reason: str = "") -> RuntimeState:
    return RuntimeState(preferred={(vs, order[0]): PriorityList(reason=reason, order=order)})


# -- the placement with a list: properties on generated pools ------------------------------


@st.composite
def ordered_pools(draw: st.DrawFn) -> tuple[list[PoolMember], list[tuple[str, int, int]],
                                            set[str], dict[str, list[str]]]:
    """A pool, its VSs, the members lost (never all) and priority lists of some VSs."""
    count = draw(st.integers(2, 7))
    sites = draw(st.integers(1, 3))
    members = [PoolMember(f"m{i}", f"s{draw(st.integers(0, sites - 1))}",
                          draw(st.sampled_from([50, 100, 200]))) for i in range(count)]
    systems = [(f"v{i:02d}", draw(st.integers(1, 3)), draw(st.integers(0, min(2, count - 2))))
               for i in range(draw(st.integers(1, 30)))]
    names = [m.name for m in members]
    lost = set(draw(st.lists(st.sampled_from(names), max_size=count - 1, unique=True)))
    chosen = draw(st.lists(st.sampled_from([s[0] for s in systems]), unique=True,
                           max_size=len(systems)))
    lists = {vs: list(draw(st.permutations(names)))[:draw(st.integers(1, count))]
             for vs in chosen}
    return members, systems, lost, lists


@settings(max_examples=300, deadline=None)
@given(ordered_pools())
def test_a_priority_list_orders_its_vs_alone_and_keeps_the_placements_order_after_it(
        case: tuple[list[PoolMember], list[tuple[str, int, int]], set[str],
                    dict[str, list[str]]]) -> None:
    members, systems, lost, lists = case
    live = [m for m in members if m.name not in lost]
    site = {m.name: m.site for m in members}
    before = live_placement(base_placement("web", members, systems), members, lost)
    after = priority_placement(before, live, lists)
    # Deterministic: the same inputs in another order give the same placement.
    again = priority_placement(dict(reversed(before.items())), list(reversed(live)),
                               dict(reversed(lists.items())))
    assert again == after
    for vs, roles in after.items():
        old = before[vs]
        assert sorted(roles.order) == sorted(old.order) and roles.backups == old.backups
        if vs not in lists:
            assert roles == old  # no other VS moves
            continue
        head = [m for m in lists[vs] if m not in lost]
        if not head:  # nothing listed is live: the placement's order serves
            assert roles == old
            continue
        # The list's first live member is the active, the next live ones follow in order.
        assert roles.active == head[0]
        rest = [m for m in old.order if m not in head]
        if len(head) >= 2:
            assert list(roles.order) == [*head, *rest]
        elif old.active == head[0]:
            assert roles == old  # the list agrees with the placement: nothing moves
        elif rest:
            # The list names the active alone: the standby is the placement's pick, the
            # first other member on another site than the active's, else the first.
            away = [m for m in rest if site[m] != site[head[0]]]
            standby = (away or rest)[0]
            assert roles.standby == standby
            assert list(roles.order) == [head[0], standby, *(m for m in rest if m != standby)]
        # The rule a list may break, named only where another site has a live member.
        if site_rule_broken(roles, live):
            assert roles.standby is not None and len(head) >= 2
            assert site[roles.standby] == site[roles.active]
            assert any(m.site != site[head[0]] for m in live)


def test_a_one_member_list_is_vs_move_and_a_bare_record_is_the_same() -> None:
    model = parse_model(MODEL)
    pool = model.pools[0]
    before = placement_of(model, pool).roles["t05"]
    other = next(m for m in before.order[1:] if SITE[m] != SITE[before.active])
    bare = placement_of(model, pool, RuntimeState(preferred={("t05", other): AdminAction()}))
    one = placement_of(model, pool, listed("t05", other))
    assert bare.roles == one.roles and one.preferred == {"t05": other}
    assert one.roles["t05"].order[:2] == (other, before.active)


def test_the_list_is_compiled_into_the_vs_priorities_and_a_dead_head_gives_the_next() -> None:
    model = parse_model(MODEL)
    pool = model.pools[0]
    state = listed("big", "m3", "m1", "m4", reason="rack 2 maintenance")
    placement = placement_of(model, pool, state)
    roles = placement.roles["big"]
    assert roles.order[:3] == ("m3", "m1", "m4") and roles.backup == ("m4",)
    assert placement.listed == {"big": ("m3", "m1", "m4")}
    others = placement_of(model, pool).roles
    assert all(placement.roles[v] == others[v] for v in others if v != "big")
    # Compiled: one member per EDS priority, in the list's order, then m2.
    resources = Compiler().compile(model, state)
    by_priority = sorted((e.priority, e.lb_endpoints[0].endpoint.address.socket_address
                          .port_value) for e in resources.endpoints["big"].endpoints)
    assert [port for _, port in by_priority] == [9003, 9001, 9004, 9002]
    # m3 and m1 on site a: the operator's order is honoured, and warned about.
    warnings = site_rule_warnings(model, state)
    assert len(warnings) == 1 and warnings[0].startswith("virtual system big: its priority "
                                                         "list puts the standby m1 on site a")
    # The head down on the pool: the next listed member is the active; back, failback.
    down = RuntimeState(preferred=state.preferred,
                        members_down={("web", "m3"): AdminAction()})
    assert placement_of(model, pool, down).roles["big"].order[:2] == ("m1", "m4")
    assert site_rule_warnings(model, down) == []
    # Every listed member lost: the placement's order, the list kept for later.
    gone = RuntimeState(preferred=state.preferred, sites_offline={"a": AdminAction()},
                        members_down={("web", "m4"): AdminAction()})
    lost = placement_of(model, pool, gone)
    assert "big" not in lost.preferred and lost.listed == {"big": ("m3", "m1", "m4")}
    assert lost.roles["big"].active == "m2"
    # placed(): one copy per list, a changed order is a new placement.
    first = placed(model, state)
    assert first is placed(model, state)
    swapped = placed(model, listed("big", "m3", "m4"))
    assert swapped is not first and placed(swapped, RuntimeState()) is model


def test_a_list_is_checked_against_the_model_on_one_line() -> None:
    model = parse_model(MODEL)
    for vs, order, expected in (
            ("nope", ["m1"], "unknown virtual system 'nope' (virtual systems: big, shared, "),
            ("t01", [], "give at least one MEMBER"),
            ("t01", ["m1", "m2", "m1"], "member 'm1' is listed twice"),
            ("t01", ["m1", "zz"], "unknown member 'zz' in pool 'web' of virtual system 't01' "
                                  "(members: m1, m2, m3, m4)"),
            ("shared", ["m1"], "virtual system 'shared' is load-sharing")):
        with pytest.raises(ValueError) as caught:
            check_priority(model, vs, order)
        assert str(caught.value).startswith(expected), caught.value
        assert "\n" not in str(caught.value)
    assert check_priority(model, "t01", ["m2", "m1"])[2] == ("m2", "m1")
    assert check_priority(model, "shared", None)[1].name == "web"  # --clear: the VS only


def test_the_record_in_etcd_is_read_not_trusted() -> None:
    keys = Keys("/x")
    head = keys.preferred("t05", "m2")
    state = runtime_from_values(keys, {
        head: b'{"reason": "r", "by": "u@h", "at": "t", "order": ["m2", "m4"]}',
        # Each refused, logged and skipped: another head, a member twice, not a list.
        keys.preferred("t06", "m1"): b'{"order": ["m2", "m1"]}',
        keys.preferred("t07", "m1"): b'{"order": ["m1", "m1"]}',
        keys.preferred("t08", "m1"): b'{"order": "m1"}',
        keys.preferred("t09", "m1"): b'{"order": []}',
    })
    assert state.preferred == {("t05", "m2"): PriorityList(reason="r", by="u@h", at="t",
                                                            order=("m2", "m4"))}


@pytest.mark.parametrize("args, expected", [
    (["t01"], "give the MEMBERs in order (the active first), or --clear"),
    (["t01", "m1", "--clear"], "give the MEMBERs in order (the active first), or --clear"),
    (["t01", "m1", "m2", "m1"], "member 'm1' is listed twice"),
])
def test_the_command_refuses_a_bad_list_before_reaching_etcd(args: list[str],
                                                              expected: str) -> None:
    # An etcd URL nothing listens on: these fail before any connection.
    result = CliRunner().invoke(main, ["vs", "priority", *args, "--etcd",
                                       "http://127.0.0.1:9"])
    assert result.exit_code != 0
    assert result.output.strip() == f"meshxl: {expected}" or expected in result.output, \
        result.output
    assert len(result.output.strip().splitlines()) == 1


def test_vs_roles_placed_by_a_list_keep_their_backups_count() -> None:
    roles = VirtualRoles("v", ("a", "b", "c", "d"), backups=1)
    members = [PoolMember(n, s, 100) for n, s in (("a", "x"), ("b", "y"), ("c", "x"),
                                                  ("d", "y"))]
    out = priority_placement({"v": roles}, members, {"v": ["c", "a"]})["v"]
    assert out.order == ("c", "a", "b", "d") and out.backup == ("b",)
    assert site_rule_broken(out, members)
    assert not site_rule_broken(out, [m for m in members if m.site == "x"])
