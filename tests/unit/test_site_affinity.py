"""``site_affinity: local``: each site's Envoys prefer the site's own members.

The model refuses what cannot keep a session on one member; the runtime view puts the
local site's tiers first; the compiler builds one EDS variant per site; the snapshot
encodes a variant's shared resources once and serves it by the node's locality zone,
and the bookkeeping (failover traces, convergence, ``meshxl verify``) expects each node's
own version.
"""

from __future__ import annotations

from textwrap import dedent

import pytest

from meshxl.errors import InputError
from meshxl.model import (
    AdminAction,
    Registration,
    Role,
    RuntimeState,
    cluster_view,
    parse_model,
)
from meshxl.xds import cache
from meshxl.xds.cache import Snapshot
from meshxl.xds.compiler import Compiler, compile_resources
from meshxl.xds.failover import FailoverTracer, Loss
from meshxl.xds.metrics import Convergence, XdsMetrics
from meshxl.xds.types import CLUSTER, ENDPOINT
from tests.unit.test_xds_server import Harness, names, xds  # noqa: F401  (fixture)

LS = """
    clusters:
      - name: shop
        mode: load-sharing
        site_affinity: local
        stickiness: {header: x-session, pin: {header: x-pin}}
        sites: [{name: east, failover_rank: 0}, {name: west, failover_rank: 0}]
        members:
          - {name: e1, address: 10.0.0.1, port: 80, site: east}
          - {name: e2, address: 10.0.0.2, port: 80, site: east}
          - {name: w1, address: 10.0.1.1, port: 80, site: west}
          - {name: w2, address: 10.0.1.2, port: 80, site: west}
      - name: plain
        mode: load-sharing
        sites: [{name: east, failover_rank: 0}, {name: west, failover_rank: 0}]
        members:
          - {name: p1, address: 10.0.2.1, port: 80, site: east}
          - {name: p2, address: 10.0.2.2, port: 80, site: west}
    """


def model(text: str = LS):  # type: ignore[no-untyped-def]
    return parse_model(dedent(text))


def priorities(spec, state=None, site=None) -> dict[str, int]:  # type: ignore[no-untyped-def]
    view = cluster_view(spec, state or RuntimeState(), local_site=site)
    return {m.name: m.priority for m in view.members if m.advertised}


# -- the model ------------------------------------------------------------------------------


@pytest.mark.parametrize(("cluster", "message"), [
    ("{name: c, site_affinity: local, members: []}", "at least two sites"),
    ("{name: c, site_affinity: local, sites: [{name: a}], members: []}", "at least two sites"),
    ("{name: c, site_affinity: local, sites: [{name: a}, {name: b}], "
     "stickiness: {header: x-s}, members: []}", "needs stickiness.pin"),
    ("{name: c, site_affinity: nearest, sites: [{name: a}, {name: b}], members: []}",
     "site_affinity"),
])
def test_the_model_refuses_what_cannot_keep_a_session_on_one_member(
        cluster: str, message: str) -> None:
    with pytest.raises(InputError) as info:
        parse_model(f"clusters: [{cluster}]")
    assert message in str(info.value)


def test_tcp_and_unsticky_clusters_need_no_pin() -> None:
    for extra in ("protocol: tcp, stickiness: {source_ip: true}", "mode: load-sharing"):
        spec = parse_model(f"clusters: [{{name: c, site_affinity: local, {extra}, "
                           "membership: registered, sites: [{name: a}, {name: b}]}]").clusters[0]
        assert spec.site_affinity == "local"


def test_global_is_the_default_and_changes_nothing() -> None:
    spec = model().clusters[1]
    assert spec.site_affinity == "global"
    assert priorities(spec, site="west") == priorities(spec) == {"p1": 0, "p2": 0}


# -- the runtime view ---------------------------------------------------------------------


def test_load_sharing_puts_the_local_site_first_and_the_other_behind() -> None:
    spec = model().clusters[0]
    assert priorities(spec) == {"e1": 0, "e2": 0, "w1": 0, "w2": 0}
    assert priorities(spec, site="east") == {"e1": 0, "e2": 0, "w1": 1, "w2": 1}
    assert priorities(spec, site="west") == {"w1": 0, "w2": 0, "e1": 1, "e2": 1}
    # An Envoy outside both sites gets the global view.
    assert priorities(spec, site="north") == priorities(spec)


def test_a_site_without_serving_members_leaves_no_gap() -> None:
    spec = model().clusters[0]
    down = RuntimeState(members_down={("shop", "w1"): AdminAction(),
                                      ("shop", "w2"): AdminAction()})
    # Drained members stay advertised (DRAINING) in their tier; the east tier serves.
    view = cluster_view(spec, down, local_site="west")
    serving = {m.name: m.priority for m in view.members if m.role is not None
               and m.role.value != "none" and not m.draining}
    assert serving == {"e1": 1, "e2": 1}
    offline = RuntimeState(sites_offline={"west": AdminAction()})
    assert {m.name for m in cluster_view(spec, offline, local_site="west").members
            if not m.draining and m.advertised} == {"e1", "e2"}


def test_high_availability_gets_one_active_per_site_only_when_asked() -> None:
    text = LS.replace("mode: load-sharing\n        site_affinity", "mode: high-availability\n"
                      "        site_affinity")
    spec = model(text).clusters[0]
    assert priorities(spec, site="west") == {"w1": 0, "w2": 1, "e1": 2, "e2": 3}
    view = cluster_view(spec, RuntimeState(), local_site="west")
    assert {m.name: m.role for m in view.members}["w1"] is Role.ACTIVE
    glob = model(text.replace("site_affinity: local", "site_affinity: global")).clusters[0]
    assert priorities(glob, site="west") == priorities(glob) == {
        "e1": 0, "w1": 0, "e2": 1, "w2": 1}


def test_registered_members_follow_their_registered_site() -> None:
    text = LS.replace("mode: load-sharing\n        site_affinity",
                      "mode: load-sharing\n        membership: registered\n        site_affinity")
    spec = model(text).clusters[0]
    state = RuntimeState(registrations={("shop", "x9"): Registration(
        address="10.0.1.9", port=80, site="west")})
    got = priorities(spec, state, site="west")
    assert got["x9"] == 0 and all(p == 1 for n, p in got.items() if n.startswith("e"))


# -- compiler and snapshot ------------------------------------------------------------------


def test_one_eds_variant_per_site_for_local_clusters_only() -> None:
    resources = compile_resources(model())
    assert sorted(resources.zones) == ["east", "west"]
    assert all(list(v) == ["shop"] for v in resources.zones.values())
    west = resources.zones["west"]["shop"]
    by_priority = {g.priority: sorted(e.endpoint.hostname for e in g.lb_endpoints)
                   for g in west.endpoints}
    assert by_priority == {0: ["w1", "w2"], 1: ["e1", "e2"]}
    assert {g.priority for g in resources.endpoints["shop"].endpoints} == {0}


def test_the_compiler_reuses_unchanged_variants() -> None:
    compiler = Compiler()
    spec = model()
    first = compiler.compile(spec)
    again = compiler.compile(spec)
    assert again.zones["west"]["shop"] is first.zones["west"]["shop"]
    assert again.endpoints["plain"] is first.endpoints["plain"]


def test_a_zone_is_served_its_variant_and_shares_the_rest() -> None:
    resources = compile_resources(model())
    before = cache.stats.resources_encoded
    snap = Snapshot.build(resources.by_type(), zones=resources.by_zone())
    # Two global EDS + one variant per zone: "plain" is encoded once, not per zone.
    eds = len(resources.endpoints) + len(resources.zones)
    assert cache.stats.resources_encoded - before == eds + len(resources.clusters) + \
        len(resources.listeners) + len(resources.routes)
    assert snap.version(ENDPOINT, "west") != snap.version(ENDPOINT)
    assert snap.version(ENDPOINT, "east") != snap.version(ENDPOINT, "west")
    assert snap.version(ENDPOINT, "north") == snap.version(ENDPOINT)
    assert snap.version(CLUSTER, "west") == snap.version(CLUSTER)
    assert snap.versions_for("west")[ENDPOINT] == snap.version(ENDPOINT, "west")
    assert snap.zones == {z: {ENDPOINT: snap.version(ENDPOINT, z)} for z in ("east", "west")}
    west = snap.resources(ENDPOINT, "west")
    assert west.entries["plain"] is snap.resources(ENDPOINT).entries["plain"]
    # The same input again reuses every entry and keeps every version.
    before = cache.stats.resources_encoded
    again = Snapshot.build(resources.by_type(), previous=snap, zones=resources.by_zone())
    assert cache.stats.resources_encoded == before
    assert again.zones == snap.zones and again.versions == snap.versions


async def test_each_envoy_gets_its_own_sites_view(xds: Harness) -> None:  # noqa: F811
    resources = compile_resources(model())
    snap = Snapshot.build(resources.by_type(), zones=resources.by_zone())
    xds.cache.set(snap)
    west, other = xds.envoy("west-1", zone="west"), xds.envoy("other-1")
    for envoy in (west, other):
        envoy.request(ENDPOINT, ["shop", "plain"])
    got_west, got_other = await west.recv(), await other.recv()
    assert got_west.version_info == snap.version(ENDPOINT, "west")
    assert got_other.version_info == snap.version(ENDPOINT)
    assert names(got_west) == ["plain", "shop"]
    assert xds.ads.zones() == {"west-1": "west"}
    assert xds.ads.node_status()["west-1"]["zone"] == "west"


def test_failover_and_convergence_wait_for_each_nodes_own_version() -> None:
    acked = {"west-1": "old", "other-1": "old"}
    tracer = FailoverTracer(connected=lambda: dict(acked))
    tracer.detected([Loss("shop", "w1", "admin_down", "ready", "admin-down")], 1, None)
    tracer.rebuilding()
    tracer.built("global-v", changed=True, expected={"west-1": "west-v"})
    tracer.answered("other-1", ENDPOINT, "global-v", None)
    tracer.answered("west-1", ENDPOINT, "global-v", None)  # not what west-1 was sent
    assert tracer.open == 1
    tracer.answered("west-1", ENDPOINT, "west-v", None)
    assert tracer.open == 0

    convergence = Convergence(XdsMetrics())
    convergence.published({ENDPOINT: "global-v"}, 1, {"west-1": {ENDPOINT: "old"}},
                          {"west": {ENDPOINT: "west-v"}}, {"west-1": "west"})
    assert convergence.waiting == {"west-1"}
    convergence.node_changed("west-1", {"streams": 1, "zone": "west",
                                        "types": {ENDPOINT: {"acked_version": "global-v"}}})
    assert convergence.waiting == {"west-1"}
    convergence.node_changed("west-1", {"streams": 1, "zone": "west",
                                        "types": {ENDPOINT: {"acked_version": "west-v"}}})
    assert convergence.waiting == frozenset()
