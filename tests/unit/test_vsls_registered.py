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
    from meshxl.model.load import parse_unexpanded
    from meshxl.model.vsls import vs_roles

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
    sidecar = parse_unexpanded(MODEL, "model")
    assert {vs: vs_roles(sidecar, forged, vs) for vs in roles} == roles


def _pool_values(keys: object, proven: tuple[str, ...], forged: tuple[str, ...] = ()
                 ) -> dict[str, bytes]:
    """etcd's ``mesh/`` values: a registration of every member in t01 and t02, the
    pool-level liveness key of each member in ``proven``, and a registration of each
    member in ``forged`` under t03 (a tenant's credential writes its own VS's keys)."""
    from meshxl.etcd.keys import Keys

    assert isinstance(keys, Keys)
    values = {keys.member(vs, m): b'{"address": "127.0.0.1", "port": 9001}'
              for m in proven for vs in ("t01", "t02")}
    values.update({keys.pool_member("web", m): b'{"address": "127.0.0.1", "port": 9001}'
                   for m in proven})
    values.update({keys.pool_keyed("web", m): b"{}" for m in ("m1", "m2", "m3", "m4")})
    values[keys.pool_liveness("web")] = b"{}"
    values.update({keys.member("t03", m): b'{"address": "127.0.0.1", "port": 9004}'
                   for m in forged})
    return values


def test_once_a_member_proves_itself_in_the_pool_a_tenants_leased_registration_counts_not() -> None:
    """A tenant's credential may grant a lease of its own, keep it alive and register a
    dead member under its VS: the registration is leased, yet the member stays lost.
    Pool liveness comes only from the pool-level key ``pools/POOL/members/MEMBER``,
    which only the member's own (pool) credential may write; the same on the control
    plane, in the sidecar's mirror and in the operator's view (one runtime)."""
    from meshxl.etcd.keys import Keys
    from meshxl.etcd.mesh import runtime_from_values
    from meshxl.model.load import parse_unexpanded
    from meshxl.model.vsls import vs_roles

    model = parse_model(MODEL)
    pool = model.pools[0]
    keys = Keys()
    forged = runtime_from_values(keys, _pool_values(keys, ("m1", "m2", "m3"), ("m4",)))
    assert forged.pool_live_of("web") == {"m1", "m2", "m3"}
    assert ("t03", "m4") in forged.registrations  # shown as the VS's, never live
    assert lost_reasons(pool, forged, VSS) == {"m4": "unregistered"}
    absent = runtime_from_values(keys, _pool_values(keys, ("m1", "m2", "m3")))
    roles = placement_of(model, pool, forged).roles
    assert roles == placement_of(model, pool, absent).roles
    assert all(r.active != "m4" and r.standby != "m4" for r in roles.values())
    sidecar = parse_unexpanded(MODEL, "model")
    assert {vs: vs_roles(sidecar, forged, vs) for vs in roles} == roles
    # A pool key held under no lease proves nothing either.
    bare = _pool_values(keys, ("m1", "m2", "m3"))
    bare[keys.pool_member("web", "m4")] = b'{"address": "127.0.0.1", "port": 9004}'
    unleased = runtime_from_values(keys, bare, {keys.pool_member("web", "m4")})
    assert unleased.pool_live_of("web") == {"m1", "m2", "m3"}
    assert lost_reasons(pool, unleased, VSS) == {"m4": "unregistered"}


def test_a_member_that_never_wrote_a_pool_key_is_live_from_its_registrations() -> None:
    """An upgrade: sidecars older than the pool-level key register in the VSs only, so a
    member that never proved itself with a pool key (no ``keyed`` mark of it) is live
    from its leased VS registrations, and a pool mixing old and new sidecars keeps
    every member during a rolling upgrade. A member marked ``keyed`` (its sidecar wrote
    its pool key once) is live only from its pool key: a tenant's registration of it,
    leased or not, counts for nothing once its pool key has ended."""
    from meshxl.etcd.keys import Keys
    from meshxl.etcd.mesh import runtime_from_values

    pool = parse_model(MODEL).pools[0]
    keys = Keys()
    old = {k: v for k, v in _pool_values(keys, ("m1", "m2", "m3")).items()
           if "/pools/" not in k}
    assert lost_reasons(pool, runtime_from_values(keys, old), VSS) == {"m4": "unregistered"}
    # m1 upgraded (its pool key and its mark); m2 and m3 not yet: live all the same.
    # m4 was upgraded once and died: a tenant's registration of it proves nothing.
    mixed = {**old, keys.pool_member("web", "m1"): b'{"address": "127.0.0.1", "port": 9001}',
             keys.pool_keyed("web", "m1"): b"{}", keys.pool_keyed("web", "m4"): b"{}",
             keys.member("t03", "m4"): b'{"address": "127.0.0.1", "port": 9004}'}
    state = runtime_from_values(keys, mixed)
    assert state.pool_keyed_of("web") == {"m1", "m4"}
    assert lost_reasons(pool, state, VSS) == {"m4": "unregistered"}
    # Once the pool is marked (every member keyed once), no registration counts: a
    # member listed later, which never ran, is not made live by a tenant either.
    closed = runtime_from_values(keys, {**mixed, keys.pool_liveness("web"): b"{}"})
    assert closed.pools_by_key == {"web"}
    assert lost_reasons(pool, closed, VSS) == {m: "unregistered" for m in ("m2", "m3", "m4")}


def test_the_control_plane_warns_of_members_live_only_by_registrations() -> None:
    """Until a pool's upgrade is over, a member live only by its VS registrations (which
    a tenant's credential can write too) is a model warning of the pool, logged once and
    cleared once the pool is marked."""
    from meshxl.etcd.keys import Keys
    from meshxl.etcd.mesh import runtime_from_values
    from meshxl.xds.warnings import ModelWarnings

    model = parse_model(MODEL)
    keys = Keys()
    values = {k: v for k, v in _pool_values(keys, ("m1", "m2")).items()
              if "/pools/" not in k}
    values[keys.pool_member("web", "m1")] = b"{}"
    values[keys.pool_keyed("web", "m1")] = b"{}"
    warnings = ModelWarnings()
    warnings.update(model, runtime_from_values(keys, values))
    (found,) = [w for w in warnings.all() if w.startswith("pool web:")]
    assert "member(s) m2 live only by their virtual systems' registrations" in found
    values[keys.pool_liveness("web")] = b"{}"
    warnings.update(model, runtime_from_values(keys, values))
    assert not [w for w in warnings.all() if w.startswith("pool web:")]
