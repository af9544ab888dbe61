"""What a sidecar reads of the model (``meshxl.model.light``, no pydantic) against the
model itself (``meshxl.model.parse_model``): generated models whose parts a sidecar
reads (names, modes, sites, members, sessions, failover) take valid, coercible and
invalid values: the two accept the same models, read the same values, and compute the
same members' roles, tiers and states for generated registrations."""

from __future__ import annotations

import math
import os
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from meshxl.model import (
    ClusterSpec,
    ModelError,
    ModelSpec,
    Registration,
    RuntimeState,
    cluster_view,
    parse_model,
)
from meshxl.model.light import CLUSTER_FIELDS, MODEL_FIELDS, LightCluster, parse_light
from meshxl.model.spec import Failover, Member, SessionSync, Site
from tests.unit.test_security_fuzz_model import mutated_models

# Examples per property (MESHXL_FUZZ_EXAMPLES=2000 for a campaign).
SETTINGS = settings(max_examples=int(os.environ.get("MESHXL_FUZZ_EXAMPLES", "150")),
                    deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

def maybe(key: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(st.just({}), values.map(lambda v: {key: v}))


@st.composite
def valid_models(draw: st.DrawFn) -> dict[str, Any]:
    """Models the model takes, the parts a sidecar reads varied (also in the forms
    pydantic coerces), with some parts it does not read."""
    out = []
    for name in draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3,
                              unique=True)):
        site_names = draw(st.lists(st.sampled_from(["dc1", "dc2", "dc3"]), max_size=3,
                                   unique=True))
        sites = [{"name": n, **draw(maybe("weight", st.sampled_from([1, 50, "200", 7.0]))),
                  **draw(maybe("failover_rank", st.sampled_from([0, 2, None, "1"])))}
                 for n in site_names]
        members = [{"name": n, "address": draw(st.sampled_from(["127.0.0.1", "db.local"])),
                    "port": draw(st.sampled_from([i + 1, str(i + 1)])),
                    **draw(maybe("site", st.sampled_from(site_names or ["default"]))),
                    **draw(maybe("weight", st.integers(1, 200))),
                    **draw(maybe("priority", st.sampled_from([0, 1, 3, None])))}
                   for i, n in enumerate(draw(st.lists(st.sampled_from(list("abcdxyz")),
                                                       max_size=5, unique=True)))]
        mode = draw(st.sampled_from(["high-availability", "load-sharing"]))
        cluster: dict[str, Any] = {
            "name": name, "mode": mode, "sites": sites, "members": members,
            "membership": "registered" if not members else draw(
                st.sampled_from(["static", "registered"])),
            "failover": {"all_withdrawn": draw(st.sampled_from(["keep-best", "keep-all",
                                                                "withdraw"])),
                         "failback": "manual" if mode == "high-availability" and draw(
                             st.booleans()) else "automatic",
                         **draw(maybe("failback_delay", st.sampled_from(["2s", 0, 1.5])))},
            **draw(maybe("sessions", st.fixed_dictionaries(
                {}, optional={"ttl": st.sampled_from(["30m", 60, "1h", 0.5]),
                              "sync_delay": st.sampled_from(["0s", 2, "250ms"]),
                              "max_bytes": st.sampled_from([1024, "2048", 1_048_576]),
                              "replication": st.sampled_from(["all", "narrow"])}))),
            **draw(maybe("protocol", st.sampled_from(["http", "http2", "grpc"])))}
        if draw(st.booleans()):  # parts a sidecar does not read
            cluster["stickiness"] = {"header": "x-session", "pin": {"header": "x-pin"}}
            cluster["health_check"] = {"path": "/ready", "interval": "1s"}
        if len(sites) >= 2 and draw(st.booleans()):
            cluster["site_affinity"] = "local"
        out.append(cluster)
    return {"clusters": out}


VALUES = {
    "name": [None, 5, "", "A", "a b", "-a", "a" * 64, "b\n", b"ok", "zz"],
    "integer": [None, "x", "", 1.5, True, 0, -1, 10_001, 65_536, "1_000", " 7 ", "1.0",
                "0x10", 2**70, "+3", b"8", [1]],
    "duration": [None, "abc", True, -1, 31_536_001, 10**400, math.inf, "10 s", " 3m ", "1e3",
                 [], "30m", 0.0001, "0s"],
    "literal": [None, 1, "ALL", "ha", "dynamic", "near", "udp", "narrow", "local",
                "load-sharing", "manual", "withdraw"],
    "address": ["", "1.2.3.4.5", "x" * 254, 7, "fe80::1%eth0", b"10.0.0.9", "a_b", "::1"],
    "object": [None, [], "x", {}, {"bogus": 1}],
}
FIELDS = {
    "name": "name", "mode": "literal", "membership": "literal", "site_affinity": "literal",
    "protocol": "literal", "sites": "object", "members": "object", "sessions": "object",
    "failover": "object", "bogus": "integer",
}
SITE = {"name": "name", "weight": "integer", "failover_rank": "integer", "bogus": "name"}
MEMBER = {"name": "name", "address": "address", "port": "integer", "site": "name",
          "weight": "integer", "priority": "integer", "bogus": "name"}
SESSIONS = {"ttl": "duration", "sync_delay": "duration", "max_bytes": "integer",
            "replication": "literal"}
FAILOVER = {"all_withdrawn": "literal", "failback": "literal", "failback_delay": "duration"}


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    """A valid model with one value a sidecar reads replaced (or one key added)."""
    model = draw(valid_models())
    cluster = draw(st.sampled_from(model["clusters"]))
    where = draw(st.sampled_from(["cluster", "site", "member", "sessions", "failover",
                                  "model"]))
    if where == "model":
        key = draw(st.sampled_from(["allow_empty", "clusters", "bogus"]))
        model[key] = draw(st.sampled_from([None, "x", [], True, "no", 2]))
        return model
    target, fields = {"cluster": (cluster, FIELDS), "sessions": (None, SESSIONS),
                      "failover": (None, FAILOVER), "site": (None, SITE),
                      "member": (None, MEMBER)}[where]
    if where in ("sessions", "failover"):
        target = cluster.setdefault(where, {})
    elif where in ("site", "member"):
        items = cluster["sites" if where == "site" else "members"]
        if not items:
            return model
        target = draw(st.sampled_from(items))
    key = draw(st.sampled_from(sorted(fields)))
    target[key] = draw(st.sampled_from(VALUES[fields[key]]))
    return model


def dumped(value: Any) -> str:
    try:
        return yaml.safe_dump(value)
    except (yaml.YAMLError, ValueError, OverflowError):
        assume(False)
        raise


def both(text: str) -> tuple[ModelSpec | None, Any]:
    try:
        full = parse_model(text, source="t")
    except ModelError:
        full = None
    try:
        light = parse_light(text, source="t")
    except ModelError as exc:
        assert exc.problems and all(str(p) for p in exc.problems)
        light = None
    return full, light


def read(c: ClusterSpec | LightCluster) -> tuple[Any, ...]:
    """Everything a sidecar reads of a cluster."""
    return (c.name, c.protocol, c.mode, c.membership, c.site_affinity,
            [(s.name, s.weight, s.failover_rank) for s in c.sites],
            [(m.name, m.address, m.port, m.site, m.weight, m.priority) for m in c.members],
            (c.sessions.ttl, c.sessions.sync_delay, c.sessions.max_bytes,
             c.sessions.replication),
            (c.failover.all_withdrawn, c.failover.failback, c.failover.failback_delay),
            c.high_availability, c.registered, c.site_names())


@SETTINGS
@given(valid_models())
def test_the_sidecar_reads_what_the_model_says(data: Any) -> None:
    full, light = both(dumped(data))
    assert full is not None and light is not None
    assert [read(c) for c in light.clusters] == [read(c) for c in full.clusters]


@SETTINGS
@given(mutated())
def test_the_sidecar_refuses_exactly_what_the_model_refuses_in_what_it_reads(
        data: Any) -> None:
    full, light = both(dumped(data))
    assert (full is None) == (light is None), (full, light)
    if full is not None:
        assert [read(c) for c in light.clusters] == [read(c) for c in full.clusters]


@SETTINGS
@given(mutated_models())
def test_the_sidecar_refuses_no_model_the_control_plane_takes(data: Any) -> None:
    """Anywhere in a model, also in parts a sidecar does not read."""
    full, light = both(dumped(data))
    if full is not None:
        assert light is not None
        assert [read(c) for c in light.clusters] == [read(c) for c in full.clusters]


registrations = st.dictionaries(
    st.sampled_from(["a", "b", "c", "d", "z"]),
    st.builds(Registration, address=st.sampled_from(["127.0.0.1", "10.0.0.5"]),
              port=st.integers(1, 3), site=st.sampled_from([None, "dc1", "dc2", "dc9"]),
              weight=st.sampled_from([None, 1, 50]), ready=st.booleans(),
              problems=st.sampled_from([(), ("disk",)]), overloaded=st.booleans(),
              returning=st.sampled_from([None, "2026-01-01T00:00:00Z"]),
              behind=st.sampled_from([(), ("a",), ("b", "c")])),
    max_size=4)


@SETTINGS
@given(valid_models(), registrations, st.sampled_from([None, "dc1", "dc2"]), st.data())
def test_roles_are_the_same_from_either_reading(data: Any, registered: dict[str, Any],
                                                local: str | None, draw: Any) -> None:
    full, light = both(dumped(data))
    assume(full is not None and full.clusters)
    assert light is not None
    cluster = draw.draw(st.sampled_from([c.name for c in full.clusters]))
    spec, mine = full.cluster(cluster), light.cluster(cluster)
    assert spec is not None and mine is not None
    down = draw.draw(st.sampled_from([{}, {(cluster, "a"): None}]))
    offline = draw.draw(st.sampled_from([{}, {"dc2": None}]))
    state = RuntimeState(registrations={(cluster, m): r for m, r in registered.items()},
                         members_down=down, sites_offline=offline)  # type: ignore[arg-type]
    assert (cluster_view(mine, state, local).members
            == cluster_view(spec, state, local).members)


def test_the_fields_are_the_models() -> None:
    assert CLUSTER_FIELDS == set(ClusterSpec.__struct_fields__)
    assert MODEL_FIELDS == set(ModelSpec.__struct_fields__)
    plain = parse_light("clusters: [{name: a, members: [{name: m, address: '::1', port: 1}], "
                        "sites: [{name: s}]}]").clusters[0]
    spec = parse_model("clusters: [{name: a, members: [{name: m, address: '::1', port: 1}], "
                       "sites: [{name: s}]}]").clusters[0]
    assert read(plain) == read(spec)  # the defaults, every one
    for light_type, model_type in ((type(plain.sessions), SessionSync),
                                   (type(plain.failover), Failover),
                                   (type(plain.sites[0]), Site),
                                   (type(plain.members[0]), Member)):
        assert set(light_type.__dataclass_fields__) == set(model_type.__struct_fields__)


@pytest.mark.parametrize("text", [
    "clusters: [{name: a, sessions: {ttl: 1" + "0" * 400 + "}, members: "
    "[{name: m, address: '::1', port: 1}]}]",
])
def test_a_duration_beyond_any_float_is_a_model_error(text: str) -> None:
    """Not an OverflowError out of the model's parser (the control plane's, the CLI's)."""
    with pytest.raises(ModelError, match="365 days"):
        parse_model(text)
    with pytest.raises(ModelError, match="365 days"):
        parse_light(text)
