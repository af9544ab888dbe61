"""When every member reports trouble, and when one comes back: ``failover.all_withdrawn``
(ClusterXL's Active Attention) and the failback hold (``failover.failback``,
``failback_delay``), decided by the one runtime view every part shares."""

from __future__ import annotations

from textwrap import dedent
from typing import Any

import pytest
from envoy.config.core.v3 import health_check_pb2
from msgspec.structs import replace

from meshxl.model import (
    AdminAction,
    ClusterView,
    MemberState,
    ModelError,
    Registration,
    Role,
    RuntimeState,
    cluster_view,
    parse_model,
)
from meshxl.operator.views.status import _shares
from meshxl.xds.compiler import compile_resources
from meshxl.xds.history import Transition, reason

ATTENTION, PROBLEM, READY = (MemberState.ATTENTION, MemberState.PROBLEM, MemberState.READY)


def model(mode: str = "high-availability", failover: str = "", sites: int = 2) -> Any:
    members = [("a", "dc1"), ("b", "dc1"), ("c", "dc2" if sites == 2 else "dc1")]
    text = dedent(f"""\
        clusters:
          - name: web
            mode: {mode}
            sites: [{", ".join(f"{{name: dc{i + 1}}}" for i in range(sites))}]
            stickiness: {{header: x-s}}
            listener: {{port: 10000}}
            members:
        """)
    text += "".join(f"      - {{name: {n}, address: 10.0.0.{i + 1}, port: 80, site: {s}}}\n"
                    for i, (n, s) in enumerate(members))
    if failover:
        text += f"    failover: {failover}\n"
    return parse_model(text)


def state(**regs: dict[str, Any]) -> RuntimeState:
    """Registrations by member: ``a={"problems": ("db",)}``; unnamed members have none."""
    return RuntimeState(registrations={
        ("web", name): Registration(address=f"10.0.0.{ord(name) - 96}", port=80, **fields)
        for name, fields in regs.items()})


def view(m: Any, st: RuntimeState) -> ClusterView:
    return cluster_view(m.clusters[0], st)


def states(v: ClusterView) -> dict[str, MemberState]:
    return {m.name: m.state for m in v.members}


def eds(m: Any, st: RuntimeState) -> dict[str, tuple[int, int]]:
    """member -> (priority, health status) as Envoy gets them."""
    out = compile_resources(m, st)
    return {ep.endpoint.hostname: (group.priority, ep.health_status)
            for group in out.endpoints["web"].endpoints for ep in group.lb_endpoints}


ALL_DB = {"a": {"problems": ("db",)}, "b": {"problems": ("db",)}, "c": {"problems": ("db",)}}


# -- every member reports a problem ---------------------------------------------------------


def test_every_member_with_a_problem_keeps_the_best_one_serving() -> None:
    """The defect: every member reporting the shared database down withdrew all of them
    (503 for every request). The best member keeps serving, as ClusterXL keeps one
    member Active Attention."""
    v = view(model(), state(**ALL_DB))
    assert states(v) == {"a": ATTENTION, "b": PROBLEM, "c": PROBLEM}
    a = v.member("a")
    assert a is not None and a.role == Role.ACTIVE and a.problems == ("db",)
    assert eds(model(), state(**ALL_DB)) == {"a": (0, health_check_pb2.UNKNOWN)}
    assert _shares(v.members) == {"a": 1.0}
    assert "active with problems (db)" in reason(a, "web", state(**ALL_DB))


def test_best_is_fewest_problems_then_the_operators_order_then_the_list() -> None:
    fewer = state(a={"problems": ("db", "disk")}, b={"problems": ("db", "disk")},
                  c={"problems": ("db",)})
    assert states(view(model(), fewer))["c"] == ATTENTION  # one problem beats site order
    # Equal problems: the site failover rank, then the tier, then the list decides.
    assert states(view(model(), state(**ALL_DB)))["a"] == ATTENTION
    ls = model("load-sharing", sites=1)
    assert [n for n, s in states(view(ls, state(**ALL_DB))).items() if s == ATTENTION] == ["a"]
    # An explicit member priority is the operator's preference too.
    m = model()
    spec = m.clusters[0]
    first = replace(spec.members[0], priority=5)
    m = replace(m, clusters=[replace(spec, members=[first, *spec.members[1:]])])
    assert states(view(m, state(**ALL_DB)))["b"] == ATTENTION
    # Stable: the same input always picks the same member.
    assert {tuple(states(view(model(), state(**ALL_DB))).items()) for _ in range(5)} == {
        tuple(states(view(model(), state(**ALL_DB))).items())}


def test_keep_all_and_withdraw() -> None:
    keep_all = model("load-sharing", "{all_withdrawn: keep-all}", sites=1)
    v = view(keep_all, state(**ALL_DB))
    assert set(states(v).values()) == {ATTENTION}
    assert _shares(v.members) == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    withdraw = model(failover="{all_withdrawn: withdraw}")
    assert set(states(view(withdraw, state(**ALL_DB))).values()) == {PROBLEM}
    assert eds(withdraw, state(**ALL_DB)) == {}


def test_the_fallback_only_applies_when_nobody_else_serves() -> None:
    # One member well: it serves, the others stay withdrawn.
    st = state(a={"problems": ("db",)}, b={"problems": ("db",)}, c={})
    assert states(view(model(), st)) == {"a": PROBLEM, "b": PROBLEM, "c": READY}
    # A member that is not caught up is no candidate: it could not serve its sessions.
    st = state(a={"problems": ("db",), "ready": False}, b={"problems": ("db",)},
               c={"problems": ("db",)})
    assert states(view(model(), st))["b"] == ATTENTION
    # Drained members are the operator's choice: the problem members take over.
    st = RuntimeState(registrations=state(**ALL_DB).registrations,
                      members_down={("web", "a"): AdminAction(reason="maintenance")})
    v = view(model(), st)
    assert states(v)["a"] == MemberState.ADMIN_DOWN and states(v)["b"] == ATTENTION
    # Nothing reported, nothing registered: no fallback to decide.
    assert ATTENTION not in states(view(model(), RuntimeState())).values()


def test_attention_is_no_failover_but_leaving_it_is() -> None:
    assert not Transition("web", "a", "problem", "active-attention", "").failover
    assert Transition("web", "a", "active-attention", "problem", "").failover
    assert not Transition("web", "a", "ready", "returning", "").failover


# -- a member that comes back ---------------------------------------------------------------


def back(*behind: str) -> dict[str, Any]:
    return {"returning": "t", "behind": behind}


def test_a_returning_member_is_held_behind_the_members_that_took_over() -> None:
    held = state(a=back("b"), b={}, c={})
    v = view(model(), held)
    assert states(v)["a"] == MemberState.RETURNING
    # Right behind b: next in line, ahead of the other site's backup (a member that
    # comes back is a standby, as under ClusterXL's Active Up).
    assert {m.name: (m.priority, m.role) for m in v.members} == {
        "b": (0, Role.ACTIVE), "a": (1, Role.STANDBY), "c": (2, Role.BACKUP)}
    assert _shares(v.members) == {"b": 1.0}
    # b fails (or is drained): a takes over, not c; it is held no more.
    for gone in ({"b": {"problems": ("db",)}},
                 {"b": {"ready": False}}):
        v = view(model(), state(a=back("b"), c={}, **gone))
        assert states(v)["a"] == READY and v.member("a").role == Role.ACTIVE  # type: ignore[union-attr]
    drained = RuntimeState(registrations=held.registrations,
                           members_down={("web", "b"): AdminAction(reason="failback")})
    assert view(model(), drained).member("a").role == Role.ACTIVE  # type: ignore[union-attr]
    # Load sharing: it takes no new sessions while a member it stands behind serves.
    ls = model("load-sharing", sites=1)
    v = view(ls, state(a={}, b={}, c=back("a", "b")))
    assert _shares(v.members) == {"a": 0.5, "b": 0.5}
    assert v.member("c").role == Role.BACKUP  # type: ignore[union-attr]
    # Several held behind the same member keep their own order among themselves.
    v = view(model(), state(a=back("c"), b=back("c"), c={}))
    assert {m.name: m.priority for m in v.members} == {"c": 0, "a": 1, "b": 2}


def test_a_registration_reads_returning() -> None:
    doc = {"address": "10.0.0.1", "port": 80}
    assert Registration.from_dict(doc).returning is None
    reg = Registration.from_dict({**doc, "returning": {"since": "2025-01-01T00:00:00Z",
                                                       "behind": ["b", 3]}})
    assert reg.returning == "2025-01-01T00:00:00Z" and reg.behind == ("b", "3")
    assert Registration.from_dict({**doc, "returning": "yes"}).returning is None


def test_manual_failback_needs_high_availability() -> None:
    with pytest.raises(ModelError, match=r"failover\.failback.*high-availability"):
        model("load-sharing", "{failback: manual}")
    assert model(failover="{failback: manual, failback_delay: 0}").clusters[0].failover \
        .failback == "manual"
    with pytest.raises(ModelError, match="all_withdrawn"):
        model(failover="{all_withdrawn: panic}")
