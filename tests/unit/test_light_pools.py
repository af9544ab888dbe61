"""The sidecar places virtual systems as the control plane does (model/light_pools.py):
the same model and runtime state give every VS the same roles on both sides."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meshxl.model import parse_model
from meshxl.model.light import parse_light
from meshxl.model.light_pools import read_pools
from meshxl.model.light_roles import vs_roles
from meshxl.model.records import AdminAction, PriorityList, Registration
from meshxl.model.runtime import RuntimeState
from meshxl.model.vsls import placement_of


def model_text(sites: int, members: list[tuple[int, int]], systems: list[tuple[int, str, int]],
               registered: bool) -> str:
    listed = "".join(
        f"\n      - {{name: m{i}, address: 127.0.0.1, port: {9000 + i}, site: s{site}, "
        f"weight: {weight}}}" for i, (site, weight) in enumerate(members))
    entries = "".join(
        f"\n  - {{name: v{i:03d}, pool: web, weight: {weight}, mode: {mode}"
        + (f", backups: {backups}" if mode == "high-availability" else "") + "}"
        for i, (weight, mode, backups) in enumerate(systems)
        for backups in [min(i % 3, len(members) - 2)])
    return f"""pools:
  - name: web
    listener: {{address: 127.0.0.1, port: 10000}}
    membership: {"registered" if registered else "static"}
    sites: [{", ".join(f"{{name: s{k}}}" for k in range(sites))}]
    members:{listed}
virtual_systems:{entries}
"""


@st.composite
def beds(draw: st.DrawFn) -> tuple[str, RuntimeState]:
    sites = draw(st.integers(1, 3))
    count = draw(st.integers(2, 7))
    members = [(draw(st.integers(0, sites - 1)), draw(st.sampled_from([50, 100, 200])))
               for _ in range(count)]
    systems = [(draw(st.integers(1, 4)), draw(st.sampled_from(
        ["high-availability", "high-availability", "load-sharing"])), 0)
        for _ in range(draw(st.integers(1, 40)))]
    registered = draw(st.booleans())
    names = [f"m{i}" for i in range(count)]
    vss = [f"v{i:03d}" for i in range(len(systems))]
    some = st.lists(st.sampled_from(names), max_size=count, unique=True)
    down = draw(some)
    offline = draw(st.lists(st.sampled_from([f"s{k}" for k in range(sites)]), max_size=1))
    present = draw(some) if registered else []
    lists = draw(st.lists(st.tuples(st.sampled_from(vss), some), max_size=4))
    state = RuntimeState(
        members_down={("web", m): AdminAction() for m in down},
        sites_offline={s: AdminAction() for s in offline},
        registrations={(draw(st.sampled_from(vss)), m): Registration("127.0.0.1", 9000)
                       for m in present},
        preferred={(vs, order[0]): PriorityList(order=tuple(order))
                   for vs, order in lists if order})
    return model_text(sites, members, systems, registered), state


@settings(max_examples=150, deadline=None)
@given(beds())
def test_the_sidecar_places_every_virtual_system_as_the_control_plane(
        bed: tuple[str, RuntimeState]) -> None:
    text, state = bed
    model, light = parse_model(text), parse_light(text)
    pool = model.pools[0]
    expected = placement_of(model, pool, state)
    if len(expected.lost) == len(pool.members):
        expected = placement_of(model, pool)  # vsls.expand: nothing live, all listed
    for vs in light.virtual_systems:
        assert vs_roles(light, state, vs.name) == expected.roles.get(vs.name), vs.name
        assert vs_roles(light, None, vs.name) == placement_of(model, pool).roles.get(vs.name)


def test_a_pool_the_control_plane_would_refuse_places_nothing() -> None:
    text = model_text(1, [(0, 100), (0, 100)], [(1, "high-availability", 0)], False)
    assert vs_roles(parse_light(text), None, "v000") is not None
    bad = text.replace("weight: 100}", "weight: lots}", 1)
    light = parse_light(bad)
    assert light.pool_members("web") == ("m0", "m1")  # still hosted
    assert vs_roles(light, None, "v000") is None
    assert vs_roles(light, None, "nope") is None
    assert read_pools([{"name": "web", "members": [{"name": "m0", "site": 3}]}])[1] == ()


def test_a_load_sharing_virtual_system_has_no_roles() -> None:
    text = model_text(1, [(0, 100), (0, 100)], [(1, "load-sharing", 0)], False)
    assert vs_roles(parse_light(text), None, "v000") is None
