"""Incremental compilation: the same output as a fresh compile, at the cost of the change.

A one-member change must rebuild and re-encode that cluster's EDS resource only, and
the result must be byte-identical to compiling everything from scratch.
"""

from __future__ import annotations

import copy

from meshxl.model import AdminAction, Registration, RuntimeState, parse_model
from meshxl.xds.cache import Snapshot, stats
from meshxl.xds.compiler import Compiler, Resources, compile_resources
from meshxl.xds.types import ENDPOINT

MODEL = parse_model("""
clusters:
""" + "".join(f"""
  - name: c{i}
    mode: high-availability
    membership: {"registered" if i == 2 else "static"}
    stickiness: {{header: x-session-id}}
    sites: [{{name: dc1}}, {{name: dc2}}]
    members:
      - {{name: a, address: 127.0.0.1, port: {8000 + 10 * i}, site: dc1}}
      - {{name: b, address: 127.0.0.1, port: {8001 + 10 * i}, site: dc1}}
      - {{name: c, address: 127.0.0.1, port: {8002 + 10 * i}, site: dc2}}
    listener: {{address: 127.0.0.1, port: 10000}}
    route: {{domains: ["c{i}.local"]}}
""" for i in range(4)))


def encoded(resources: Resources) -> dict[str, dict[str, bytes]]:
    return {t: {n: m.SerializeToString(deterministic=True) for n, m in by_name.items()}
            for t, by_name in resources.by_type().items()}


STATES = [
    RuntimeState(),
    RuntimeState(members_down={("c1", "a"): AdminAction(reason="x")}),
    RuntimeState(members_down={("c1", "a"): AdminAction(reason="x")},
                 registrations={("c2", "a"): Registration("127.0.0.1", 8020)}),
    RuntimeState(registrations={("c2", "a"): Registration("127.0.0.1", 8020, ready=False),
                                ("c2", "z"): Registration("127.0.0.1", 8029, site="dc2")}),
    RuntimeState(sites_offline={"dc1": AdminAction()}),
    RuntimeState(),
]


def test_incremental_output_equals_a_fresh_compile_through_a_sequence_of_states() -> None:
    compiler = Compiler()
    for state in STATES:
        assert encoded(compiler.compile(MODEL, state)) == encoded(compile_resources(MODEL, state))


def test_one_member_change_rebuilds_only_that_clusters_endpoints() -> None:
    compiler = Compiler()
    before = compiler.compile(MODEL, STATES[0])
    after = compiler.compile(MODEL, STATES[1])
    rebuilt = {name for name in after.endpoints
               if after.endpoints[name] is not before.endpoints[name]}
    assert rebuilt == {"c1"}
    for kind in ("clusters", "listeners", "routes"):
        old, new = getattr(before, kind), getattr(after, kind)
        assert all(new[name] is old[name] for name in new), kind


def test_a_new_model_object_recompiles_everything() -> None:
    compiler = Compiler()
    before = compiler.compile(MODEL, STATES[0])
    same_text = copy.deepcopy(MODEL)
    after = compiler.compile(same_text, STATES[0])
    assert all(after.clusters[n] is not before.clusters[n] for n in after.clusters)
    assert encoded(after) == encoded(before)


def test_snapshot_from_previous_encodes_only_new_messages_and_agrees_on_versions() -> None:
    compiler = Compiler()
    first = Snapshot.build(compiler.compile(MODEL, STATES[0]).by_type())
    changed = compiler.compile(MODEL, STATES[1])
    encodes = stats.resources_encoded
    incremental = Snapshot.build(changed.by_type(), previous=first)
    assert stats.resources_encoded - encodes == 1  # c1's ClusterLoadAssignment
    fresh = Snapshot.build(compile_resources(MODEL, STATES[1]).by_type())
    assert incremental.versions == fresh.versions
    assert incremental.versions[ENDPOINT] != first.versions[ENDPOINT]
    for type_url in fresh.type_urls:
        assert incremental.resources(type_url).response == fresh.resources(type_url).response
    # Unchanged types keep the very same encoded resources.
    unchanged = [t for t in fresh.type_urls if t != ENDPOINT]
    assert all(incremental.resources(t) is first.resources(t) for t in unchanged)
