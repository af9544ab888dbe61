"""The runtime view: tiers (EDS priorities), roles, weights, drains and registrations."""

from __future__ import annotations

from textwrap import dedent

import pytest

from meshxl.model import (
    AdminAction,
    ClusterSpec,
    ClusterView,
    MemberState,
    Registration,
    Role,
    RuntimeState,
    cluster_view,
    parse_model,
)

HA_TWO_SITES = """
    clusters:
      - name: c
        sites: [{name: dc1}, {name: dc2}]
        members:
          - {name: a, address: 127.0.0.1, port: 80, site: dc1}
          - {name: b, address: 127.0.0.2, port: 80, site: dc1}
          - {name: c, address: 127.0.0.3, port: 80, site: dc2}
    """


def cluster(text: str) -> ClusterSpec:
    return parse_model(dedent(text)).clusters[0]


def view(text: str, state: RuntimeState | None = None) -> ClusterView:
    return cluster_view(cluster(text), state or RuntimeState())


def priorities(v: ClusterView) -> dict[str, int]:
    return {m.name: m.priority for m in v.members if m.advertised}


def roles(v: ClusterView) -> dict[str, Role]:
    return {m.name: m.role for m in v.members}


def reg(address: str = "10.9.9.9", port: int = 80, **kw: object) -> Registration:
    return Registration(address=address, port=port, **kw)  # type: ignore[arg-type]


# -- high availability ---------------------------------------------------------------------


def test_ha_priorities_follow_site_order_then_list_order() -> None:
    v = view(HA_TWO_SITES)
    assert [m.name for m in v.members] == ["a", "b", "c"]
    assert priorities(v) == {"a": 0, "b": 1, "c": 2}
    assert roles(v) == {"a": Role.ACTIVE, "b": Role.STANDBY, "c": Role.BACKUP}
    assert all(m.state is MemberState.READY and m.advertised and not m.draining
               for m in v.members)
    assert {m.name: m.site for m in v.members} == {"a": "dc1", "b": "dc1", "c": "dc2"}


def test_ha_members_without_sites_go_to_default_site_in_list_order() -> None:
    v = view("""
        clusters:
          - name: c
            members:
              - {name: z, address: 127.0.0.1, port: 80}
              - {name: y, address: 127.0.0.2, port: 80}
              - {name: x, address: 127.0.0.3, port: 80}
              - {name: w, address: 127.0.0.4, port: 80}
        """)
    assert priorities(v) == {"z": 0, "y": 1, "x": 2, "w": 3}
    assert roles(v) == {"z": Role.ACTIVE, "y": Role.STANDBY, "x": Role.BACKUP,
                        "w": Role.BACKUP}
    assert {m.site for m in v.members} == {"default"}


def test_member_without_site_joins_the_first_site() -> None:
    v = view("""
        clusters:
          - name: c
            sites: [{name: dc1}, {name: dc2}]
            members:
              - {name: a, address: 127.0.0.1, port: 80, site: dc2}
              - {name: b, address: 127.0.0.2, port: 80}
        """)
    assert v.member("b") is not None and v.member("b").site == "dc1"  # type: ignore[union-attr]
    assert priorities(v) == {"b": 0, "a": 1}


def test_failover_rank_overrides_site_list_order() -> None:
    v = view("""
        clusters:
          - name: c
            sites: [{name: dc1, failover_rank: 1}, {name: dc2, failover_rank: 0}]
            members:
              - {name: a, address: 127.0.0.1, port: 80, site: dc1}
              - {name: c, address: 127.0.0.3, port: 80, site: dc2}
        """)
    assert priorities(v) == {"c": 0, "a": 1}
    assert roles(v) == {"c": Role.ACTIVE, "a": Role.STANDBY}


def test_explicit_member_priority_shares_a_tier() -> None:
    v = view("""
        clusters:
          - name: c
            sites: [{name: dc1}, {name: dc2}]
            members:
              - {name: a, address: 127.0.0.1, port: 80, site: dc1, priority: 0}
              - {name: b, address: 127.0.0.2, port: 80, site: dc1, priority: 0}
              - {name: c, address: 127.0.0.3, port: 80, site: dc1, priority: 5}
              - {name: d, address: 127.0.0.4, port: 80, site: dc2}
        """)
    # Dense: explicit tier 5 becomes priority 1, no gap.
    assert priorities(v) == {"a": 0, "b": 0, "c": 1, "d": 2}
    assert roles(v) == {"a": Role.ACTIVE, "b": Role.ACTIVE, "c": Role.STANDBY,
                        "d": Role.BACKUP}


def test_tied_failover_ranks_make_active_active_sites() -> None:
    v = view("""
        clusters:
          - name: c
            sites: [{name: dc1, failover_rank: 0}, {name: dc2, failover_rank: 0}]
            members:
              - {name: a, address: 127.0.0.1, port: 80, site: dc1}
              - {name: b, address: 127.0.0.2, port: 80, site: dc2}
              - {name: c, address: 127.0.0.3, port: 80, site: dc1}
              - {name: d, address: 127.0.0.4, port: 80, site: dc2}
        """)
    assert priorities(v) == {"a": 0, "b": 0, "c": 1, "d": 1}
    assert roles(v) == {"a": Role.ACTIVE, "b": Role.ACTIVE, "c": Role.STANDBY,
                        "d": Role.STANDBY}


# -- load sharing -------------------------------------------------------------------------


def test_load_sharing_first_site_all_at_priority_zero() -> None:
    v = view("""
        clusters:
          - name: c
            mode: load-sharing
            sites: [{name: dc1}, {name: dc2}]
            members:
              - {name: a, address: 127.0.0.1, port: 80, site: dc1}
              - {name: b, address: 127.0.0.2, port: 80, site: dc1}
              - {name: c, address: 127.0.0.3, port: 80, site: dc2}
              - {name: d, address: 127.0.0.4, port: 80, site: dc2}
        """)
    assert priorities(v) == {"a": 0, "b": 0, "c": 1, "d": 1}
    assert roles(v) == {"a": Role.LOAD_SHARING, "b": Role.LOAD_SHARING,
                        "c": Role.BACKUP, "d": Role.BACKUP}


def test_load_sharing_single_site_all_share() -> None:
    v = view("""
        clusters:
          - name: c
            mode: load-sharing
            members:
              - {name: a, address: 127.0.0.1, port: 80}
              - {name: b, address: 127.0.0.2, port: 80}
              - {name: c, address: 127.0.0.3, port: 80}
        """)
    assert set(priorities(v).values()) == {0}
    assert set(roles(v).values()) == {Role.LOAD_SHARING}


# -- admin actions --------------------------------------------------------------------------


def test_member_down_drains_it_and_promotes_the_next() -> None:
    action = AdminAction(reason="maintenance", by="ops", at="2024-01-01T00:00:00Z")
    v = view(HA_TWO_SITES, RuntimeState(members_down={("c", "a"): action}))
    a = v.member("a")
    assert a is not None
    assert a.state is MemberState.ADMIN_DOWN
    assert a.draining and a.advertised  # still sent, marked DRAINING
    assert a.role is Role.NONE
    assert roles(v) == {"a": Role.NONE, "b": Role.ACTIVE, "c": Role.STANDBY}
    # The drained member keeps its tier so live connections finish where they are.
    assert priorities(v) == {"a": 0, "b": 1, "c": 2}


def test_member_down_in_another_cluster_changes_nothing() -> None:
    v = view(HA_TWO_SITES, RuntimeState(members_down={("other", "a"): AdminAction()}))
    assert roles(v) == {"a": Role.ACTIVE, "b": Role.STANDBY, "c": Role.BACKUP}


def test_site_offline_drains_all_its_members() -> None:
    v = view(HA_TWO_SITES, RuntimeState(sites_offline={"dc1": AdminAction(reason="dr")}))
    for name in ("a", "b"):
        m = v.member(name)
        assert m is not None
        assert m.state is MemberState.SITE_OFFLINE and m.draining and m.advertised
        assert m.role is Role.NONE
    c = v.member("c")
    assert c is not None and c.state is MemberState.READY and c.role is Role.ACTIVE


def test_member_down_wins_over_site_offline() -> None:
    v = view(HA_TWO_SITES, RuntimeState(members_down={("c", "a"): AdminAction()},
                                        sites_offline={"dc1": AdminAction()}))
    assert v.member("a").state is MemberState.ADMIN_DOWN  # type: ignore[union-attr]
    assert v.member("b").state is MemberState.SITE_OFFLINE  # type: ignore[union-attr]


def test_admin_action_from_dict() -> None:
    assert AdminAction.from_dict({"reason": "patch", "by": "amy", "at": "t"}) == AdminAction(
        reason="patch", by="amy", at="t")
    assert AdminAction.from_dict({}) == AdminAction()


# -- registered membership ---------------------------------------------------------------

REGISTERED = """
    clusters:
      - name: c
        membership: registered
        sites: [{name: dc1}, {name: dc2}]
        members:
          - {name: a, address: 127.0.0.1, port: 80, site: dc1}
          - {name: b, address: 127.0.0.2, port: 80, site: dc1}
          - {name: c, address: 127.0.0.3, port: 80, site: dc2}
    """


def registered(**regs: Registration) -> RuntimeState:
    return RuntimeState(registrations={("c", name): r for name, r in regs.items()})


def test_registered_member_without_registration_is_lost() -> None:
    v = view(REGISTERED, registered(b=reg("127.0.0.2"), c=reg("127.0.0.3")))
    a = v.member("a")
    assert a is not None and a.state is MemberState.LOST
    assert not a.advertised and a.role is Role.NONE
    # Priorities are re-densified: the next member takes priority 0.
    assert priorities(v) == {"b": 0, "c": 1}
    assert roles(v) == {"a": Role.NONE, "b": Role.ACTIVE, "c": Role.STANDBY}


def test_static_member_without_registration_is_ready() -> None:
    v = view(HA_TWO_SITES, RuntimeState())
    assert {m.state for m in v.members} == {MemberState.READY}


def test_registration_not_ready_is_syncing() -> None:
    v = view(REGISTERED, registered(a=reg(ready=False), b=reg("127.0.0.2"), c=reg("127.0.0.3")))
    a = v.member("a")
    assert a is not None and a.state is MemberState.SYNCING and not a.advertised
    assert priorities(v) == {"b": 0, "c": 1}
    assert roles(v)["b"] is Role.ACTIVE


def test_registration_with_problems_is_not_advertised() -> None:
    v = view(REGISTERED, registered(a=reg("127.0.0.1"), b=reg(problems=("disk full",)),
                                    c=reg("127.0.0.3")))
    b = v.member("b")
    assert b is not None and b.state is MemberState.PROBLEM and not b.advertised
    assert b.problems == ("disk full",)
    assert priorities(v) == {"a": 0, "c": 1}
    assert roles(v) == {"a": Role.ACTIVE, "b": Role.NONE, "c": Role.STANDBY}


def test_problems_outrank_not_ready() -> None:
    v = view(REGISTERED, registered(a=reg(ready=False, problems=("x",))))
    assert v.member("a").state is MemberState.PROBLEM  # type: ignore[union-attr]


def test_registration_overrides_address_port_site_and_weight() -> None:
    v = view(REGISTERED, registered(
        a=reg("127.0.1.5", 9090, site="dc2", weight=40),
        b=reg("127.0.0.2"), c=reg("127.0.0.3")))
    a = v.member("a")
    assert a is not None
    assert (a.address, a.port, a.site, a.weight) == ("127.0.1.5", 9090, "dc2", 40)
    # a moved to dc2 (listed before c, so ahead of it there); b is now first in dc1.
    assert priorities(v) == {"b": 0, "a": 1, "c": 2}


def test_registration_without_overrides_keeps_spec_values() -> None:
    v = view("""
        clusters:
          - name: c
            membership: registered
            sites: [{name: dc1}, {name: dc2}]
            members: [{name: a, address: 127.0.0.1, port: 80, site: dc2, weight: 7}]
        """, registered(a=reg("127.0.0.1", 80)))
    a = v.member("a")
    assert a is not None and (a.site, a.weight) == ("dc2", 7)


def test_unlisted_registered_member_is_added_after_listed_ones() -> None:
    state = RuntimeState(registrations={
        ("c", "zz"): reg("127.0.0.26", 81),
        ("c", "a"): reg("127.0.0.1"),
        ("c", "new"): reg("127.0.0.14", 82, site="dc2", weight=5),
        ("other", "x"): reg("127.0.0.99"),
    })
    v = view(REGISTERED, state)
    assert [m.name for m in v.members] == ["a", "b", "c", "new", "zz"]
    zz = v.member("zz")
    assert zz is not None and zz.state is MemberState.READY
    assert (zz.address, zz.port, zz.site, zz.weight) == ("127.0.0.26", 81, "dc1", 100)
    assert v.member("new").site == "dc2"  # type: ignore[union-attr]
    assert v.member("x") is None
    # a (dc1), zz (dc1, second), new (dc2) are advertised; b and c are lost.
    assert priorities(v) == {"a": 0, "zz": 1, "new": 2}


def test_registration_in_an_unknown_site_ranks_last() -> None:
    v = view(REGISTERED, registered(a=reg("127.0.0.1", site="dc9"), b=reg("127.0.0.2"),
                                    c=reg("127.0.0.3")))
    assert v.member("a").site == "dc9"  # type: ignore[union-attr]
    assert priorities(v) == {"b": 0, "c": 1, "a": 2}


def test_registration_from_dict() -> None:
    r = Registration.from_dict({"address": "127.0.0.1", "port": "8080", "site": "",
                                "weight": "30", "ready": False, "problems": ["z", "a"]})
    assert r == Registration(address="127.0.0.1", port=8080, site=None, weight=30,
                             ready=False, problems=("a", "z"))
    assert Registration.from_dict({"address": "h", "port": 1}) == Registration("h", 1)


@pytest.mark.parametrize("data", [{"port": 80}, {"address": "h"},
                                  {"address": "h", "port": "eighty"},
                                  {"address": "h", "port": 0}, {"address": "h", "port": 65536}])
def test_registration_from_dict_rejects_bad_address_or_port(data: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="registration"):
        Registration.from_dict(data)


@pytest.mark.parametrize("weight", [-100, 20_000])
def test_registration_from_dict_rejects_bad_weight(weight: int) -> None:
    with pytest.raises(ValueError, match="weight"):
        Registration.from_dict({"address": "h", "port": 80, "weight": weight})


def test_bad_registration_weights_do_not_crash_the_view() -> None:
    spec = cluster("clusters: [{name: c, mode: load-sharing, membership: registered}]")
    try:  # rejecting the weight when reading the registration is an acceptable fix too
        bad = Registration.from_dict({"address": "127.0.0.2", "port": 80, "weight": -100})
    except ValueError:
        return
    state = RuntimeState(registrations={("c", "a"): reg("127.0.0.1", weight=100),
                                        ("c", "b"): bad})
    v = cluster_view(spec, state)
    assert all(m.lb_weight >= 1 for m in v.members if m.advertised)


# -- weights ----------------------------------------------------------------------------------


def test_site_weights_split_a_tier_regardless_of_member_count() -> None:
    v = view("""
        clusters:
          - name: c
            mode: load-sharing
            sites: [{name: dc1, weight: 70, failover_rank: 0},
                    {name: dc2, weight: 30, failover_rank: 0}]
            members:
              - {name: a, address: 127.0.0.1, port: 80, site: dc1}
              - {name: b, address: 127.0.0.2, port: 80, site: dc1}
              - {name: c, address: 127.0.0.3, port: 80, site: dc2}
        """)
    assert set(priorities(v).values()) == {0}
    w = {m.name: m.lb_weight for m in v.members}
    assert w["a"] == w["b"]
    assert (w["a"] + w["b"]) * 30 == w["c"] * 70


def test_member_weights_split_their_site_share() -> None:
    v = view("""
        clusters:
          - name: c
            mode: load-sharing
            members:
              - {name: a, address: 127.0.0.1, port: 80, weight: 100}
              - {name: b, address: 127.0.0.2, port: 80, weight: 300}
        """)
    w = {m.name: m.lb_weight for m in v.members}
    assert w["b"] == 3 * w["a"] and w["a"] > 1


def test_weights_are_per_tier() -> None:
    # Each HA tier holds one member: every member carries its site's full share.
    v = view("""
        clusters:
          - name: c
            sites: [{name: dc1, weight: 50}]
            members:
              - {name: a, address: 127.0.0.1, port: 80, weight: 10}
              - {name: b, address: 127.0.0.2, port: 80, weight: 1000}
        """)
    assert v.member("a").lb_weight == v.member("b").lb_weight  # type: ignore[union-attr]


def test_weights_stay_positive_for_tiny_shares() -> None:
    v = view("""
        clusters:
          - name: c
            mode: load-sharing
            sites: [{name: dc1, weight: 1}]
            members:
              - {name: a, address: 127.0.0.1, port: 80, weight: 1}
              - {name: b, address: 127.0.0.2, port: 80, weight: 10000}
        """)
    assert all(m.lb_weight >= 1 for m in v.members)
    assert v.member("b").lb_weight > v.member("a").lb_weight  # type: ignore[union-attr]
