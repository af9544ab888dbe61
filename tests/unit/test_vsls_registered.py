"""Pools with ``membership: registered``: a listed member is in the placement only while
its sidecar holds a registration in a virtual system of the pool (docs/vsls.md)."""

from __future__ import annotations

import pytest

from meshxl.model import AdminAction, ModelError, RuntimeState, parse_model
from meshxl.model.runtime import Registration
from meshxl.model.vsls import lost_reasons, placed, placement_of
from meshxl.xds.compiler import Compiler

MODEL = """
pools:
  - name: web
    membership: registered
    listener: {address: 127.0.0.1, port: 10000}
    sites: [{name: a}, {name: b}]
    members:
      - {name: m1, address: 127.0.0.1, port: 9001, site: a}
      - {name: m2, address: 127.0.0.1, port: 9002, site: b}
      - {name: m3, address: 127.0.0.1, port: 9003, site: a}
      - {name: m4, address: 127.0.0.1, port: 9004, site: b}
virtual_systems:
  - names: [t01, t02, t03, t04, t05, t06, t07, t08]
    pool: web
  - {name: shared, pool: web, mode: load-sharing}
"""
VSS = ["t01", "t02", "t03", "t04", "t05", "t06", "t07", "t08", "shared"]


def registered(members: dict[str, list[str]]) -> RuntimeState:
    """A state where each member is registered in the listed virtual systems."""
    return RuntimeState(registrations={
        (vs, m): Registration(address="127.0.0.1", port=9000 + int(m[1:]), ready=False)
        for m, systems in members.items() for vs in systems})


def test_membership_defaults_to_static_and_takes_only_its_two_values() -> None:
    model = parse_model(MODEL.replace("    membership: registered\n", ""))
    assert model.pools[0].membership == "static"
    assert lost_reasons(model.pools[0], RuntimeState(), VSS) == {}
    with pytest.raises(ModelError) as caught:
        parse_model(MODEL.replace("membership: registered", "membership: leased"))
    assert "pools[0].membership" in str(caught.value)


def test_a_member_is_live_while_registered_in_any_virtual_system_of_the_pool() -> None:
    pool = parse_model(MODEL).pools[0]
    state = registered({"m1": VSS, "m2": ["shared"], "m3": ["t05"]})
    assert lost_reasons(pool, state, VSS) == {"m4": "unregistered"}
    # A registration in a cluster that is not one of the pool's counts for nothing.
    assert lost_reasons(pool, registered({"m4": ["other"]}), VSS)["m4"] == "unregistered"
    # An operator's action is the reason shown first.
    down = RuntimeState(registrations=state.registrations,
                        members_down={("web", "m1"): AdminAction()},
                        sites_offline={"b": AdminAction()})
    assert lost_reasons(pool, down, VSS) == {"m1": "admin-down", "m2": "site-offline",
                                             "m4": "site-offline"}


def test_an_unregistered_member_leaves_like_member_down_and_comes_back_to_its_roles() -> None:
    model = parse_model(MODEL)
    pool = model.pools[0]
    every = registered({m: VSS for m in ("m1", "m2", "m3", "m4")})
    base = placement_of(model, pool, every)
    assert base.lost == frozenset() and base.roles == placement_of(model, pool).roles
    assert placed(model, every) is model
    gone = registered({m: VSS for m in ("m1", "m2", "m3")})
    after = placement_of(model, pool, gone)
    down = placement_of(model, pool, RuntimeState(
        registrations=every.registrations, members_down={("web", "m4"): AdminAction()}))
    assert after.lost == {"m4"} and after.why == {"m4": "unregistered"}
    assert after.roles == down.roles
    for vs, roles in base.roles.items():
        expected = roles.standby if roles.active == "m4" else roles.active
        assert after.roles[vs].active == expected
        assert "m4" not in after.roles[vs].order
    now = placed(model, gone)
    for vs in VSS:
        spec = now.cluster(vs)
        assert spec is not None and "m4" not in {m.name for m in spec.members}
    resources = Compiler().compile(model, gone)
    ports = {e.lb_endpoints[0].endpoint.address.socket_address.port_value
             for vs in VSS for e in resources.endpoints[vs].endpoints}
    assert 9004 not in ports
    # Registered again: exactly the roles it had.
    assert placement_of(model, pool, every).roles == base.roles
    assert placed(now, every) is model


def test_with_no_member_registered_every_member_stays_listed() -> None:
    model = parse_model(MODEL)
    state = registered({})
    assert placement_of(model, model.pools[0], state).lost == {"m1", "m2", "m3", "m4"}
    spec = placed(model, state).cluster("t01")
    assert spec is not None and len(spec.members) == 4


def test_an_unleased_registration_keeps_no_member_live_here_or_on_the_sidecar() -> None:
    """Only what a member's own lease proves makes it live: a registration etcd holds
    under no lease (a tenant's role wrote it under its VS) counts for no VS, on the
    control plane and in the sidecar's mirror (the same runtime, the same roles)."""
    from meshxl.etcd.keys import Keys
    from meshxl.etcd.mesh import runtime_from_values
    from meshxl.model.light import parse_light
    from meshxl.model.light_roles import pool_roles

    model = parse_model(MODEL)
    pool = model.pools[0]
    keys = Keys()
    values = {keys.member(vs, m): b'{"address": "127.0.0.1", "port": 9001}'
              for m in ("m1", "m2", "m3") for vs in ("t01", "t02")}
    values[keys.member("t03", "m4")] = b'{"address": "127.0.0.1", "port": 9004}'
    forged = runtime_from_values(keys, values, {keys.member("t03", "m4")})
    assert forged.unleased == {("t03", "m4")}
    assert ("t03", "m4") in forged.registrations  # still shown, never counted live
    assert lost_reasons(pool, forged, VSS) == {"m4": "unregistered"}
    honest = runtime_from_values(keys, values)
    assert lost_reasons(pool, honest, VSS) == {}
    absent = runtime_from_values(keys, {k: v for k, v in values.items() if "m4" not in k})
    roles = placement_of(model, pool, forged).roles
    assert roles == placement_of(model, pool, absent).roles
    assert all(r.active != "m4" and r.standby != "m4" for r in roles.values())
    light = parse_light(MODEL, "model")
    assert dict(pool_roles(light, forged, light.placed_pools[0])) == roles
