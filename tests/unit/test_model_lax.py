"""The model's one declaration read from data (``meshxl.model.decode``): the lax forms a
model file may write, each read as it was when the model was declared with pydantic
(none that loaded then is refused now), the forms refused, every problem named by its
path, and generated models that round-trip through the declaration."""

from __future__ import annotations

import math
import os
from typing import Any

import msgspec
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshxl.model import ModelError, parse_model
from meshxl.model.decode import decode, problems_of
from meshxl.model.document import ModelSpec
from meshxl.model.load import parse_unexpanded
from meshxl.model.spec import ClusterSpec
from meshxl.model.text import ModelForm

SETTINGS = settings(max_examples=int(os.environ.get("MESHXL_FUZZ_EXAMPLES", "150")),
                    deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def cluster(**fields: Any) -> dict[str, Any]:
    return {"name": "c", "members": [{"name": "a", "address": "127.0.0.1", "port": 8080}],
            **fields}


def member(**fields: Any) -> dict[str, Any]:
    return cluster(members=[{"name": "a", "address": "127.0.0.1", "port": 8080, **fields}])


# (as written, as read): text of a whole number, a whole float, a bool, UTF-8 bytes...
INTEGERS = [("8080", 8080), (" 7 ", 7), ("1_000", 1000), ("+3", 3), ("1.0", 1), ("7.00", 7),
            (7.0, 7), (True, 1), (b"80", 80), (bytearray(b"81"), 81)]
NUMBERS = [("1.5", 1.5), ("1e1", 10.0), (" 2 ", 2.0), (True, 1.0), (b"3", 3.0), (4, 4.0),
           ("5.", 5.0), (".5", 0.5)]
BOOLEANS = [("yes", True), ("no", False), ("on", True), ("off", False), ("y", True),
            ("n", False), ("t", True), ("f", False), ("TRUE", True), ("False", False),
            ("1", True), ("0", False), (1, True), (0, False), (1.0, True), (b"true", True)]
DURATIONS = [("250ms", 0.25), ("1.5s", 1.5), ("2m", 120.0), ("1h", 3600.0), (" 3m ", 180.0),
             (30, 30.0), ("30", 30.0), (0.5, 0.5), ("0s", 0.0)]


@pytest.mark.parametrize(("written", "read"), INTEGERS)
def test_an_integer_may_be_written_as_pydantic_read_one(written: Any, read: int) -> None:
    spec = decode(member(port=written, weight=written if read >= 1 else 1), ClusterSpec)
    assert spec.members[0].port == read and type(spec.members[0].port) is int
    assert spec.members[0].weight == read


@pytest.mark.parametrize(("written", "read"), NUMBERS)
def test_a_number_may_be_written_as_pydantic_read_one(written: Any, read: float) -> None:
    spec = decode(cluster(degradation={"latency_factor": written if read >= 1.2 else 2,
                                       "min_share": written if read <= 1 else 0}),
                  ClusterSpec)
    if read >= 1.2:
        assert spec.degradation.latency_factor == read
    if read <= 1:
        assert spec.degradation.min_share == read


@pytest.mark.parametrize(("written", "read"), BOOLEANS)
def test_a_bool_may_be_written_as_pydantic_read_one(written: Any, read: bool) -> None:
    spec = decode(cluster(health_check={"enabled": written}), ClusterSpec)
    assert spec.health_check.enabled is read


@pytest.mark.parametrize(("written", "read"), DURATIONS)
def test_a_duration_may_be_written_with_a_unit(written: Any, read: float) -> None:
    spec = decode(cluster(sessions={"ttl": written if read else 1, "sync_delay": written}),
                  ClusterSpec)
    assert spec.sessions.sync_delay == read and type(spec.sessions.sync_delay) is float


def test_text_may_be_utf8_bytes_and_off_is_a_word() -> None:
    """YAML's ``!!binary`` gives bytes; YAML 1.1 reads an unquoted ``off`` as false."""
    spec = parse_model("clusters: [{name: c, degradation: {action: off}, members: "
                       "[{name: a, address: !!binary MTI3LjAuMC4x, port: 1}]}]")
    assert spec.clusters[0].members[0].address == "127.0.0.1"
    assert spec.clusters[0].degradation.action == "off"


@pytest.mark.parametrize(("field", "written"), [
    ("port", "x"), ("port", ""), ("port", 1.5), ("port", "0x10"), ("port", "1e3"),
    ("port", [1]), ("port", None), ("port", 2**70), ("port", "1.5"), ("port", b"\xff"),
    ("port", 0), ("port", 65536), ("weight", 10_001), ("weight", "10001"),
    ("address", 5), ("address", 1.5), ("address", True), ("address", "1.2.3.4.5"),
    ("address", ""), ("name", "b\n"), ("name", "A"), ("name", b"\xff"), ("site", 5),
    ("priority", 101), ("priority", "nan"),
])
def test_what_the_model_never_read_is_refused_at_its_path(field: str, written: Any) -> None:
    problems = problems_of(member(**{field: written}), ClusterSpec)
    assert [p.path for p in problems] == [f"members[0].{field}"], problems


@pytest.mark.parametrize("written", ["nan", "inf", "-inf", ".inf", math.nan, math.inf,
                                     "Infinity", 10**400, "maybe", [], {}])
def test_a_number_is_finite(written: Any) -> None:
    problems = problems_of(cluster(degradation={"latency_factor": written}), ClusterSpec)
    assert [p.path for p in problems] == ["degradation.latency_factor"], problems


@pytest.mark.parametrize("written", [2, -1, "maybe", "", None, [], 0.5, "nope"])
def test_a_bool_is_one_of_its_words(written: Any) -> None:
    problems = problems_of(cluster(health_check={"enabled": written}), ClusterSpec)
    assert [p.path for p in problems] == ["health_check.enabled"], problems


def test_every_problem_is_named_not_only_the_first() -> None:
    data = {"clusters": [
        member(port=0, bogus=1, weight="heavy"),
        {"name": "B", "mode": "ha", "sessions": {"ttl": -1, "quota": {"writes_burst": 5}},
         "stickiness": {"header": "x", "cookie": {}}},
        {"members": []}]}
    problems = {(p.path, p.message) for p in problems_of(data, ModelSpec)}
    paths = {path for path, _ in problems}
    assert paths == {
        "clusters[0].members[0].port", "clusters[0].members[0].bogus",
        "clusters[0].members[0].weight", "clusters[1].name", "clusters[1].mode",
        "clusters[1].sessions.ttl", "clusters[1].sessions.quota",
        "clusters[1].stickiness", "clusters[2].name"}, problems
    assert ("clusters[0].members[0].bogus", "unknown field") in problems
    assert ("clusters[2].name", "field required") in problems
    assert ("clusters[1].mode", "expected one of high-availability, load-sharing") in problems


def test_a_class_rule_names_its_field() -> None:
    """A rule of a class that is about one of its fields (``FIELD: why``) is that field's
    problem."""
    names = ", ".join(f"v{i}" for i in range(5_001))
    with pytest.raises(ModelError) as refused:
        parse_model("pools: [{name: p, members: [{name: a, address: '::1', port: 1}]}]\n"
                    f"virtual_systems: [{{names: [{names}], pool: p}}]")
    assert [p.path for p in refused.value.problems] == ["virtual_systems"]


def test_a_protocols_defaults_are_what_it_does_not_write() -> None:
    grpc = decode(cluster(protocol="grpc"), ClusterSpec)
    assert grpc.retries.retry_on == ["connect-failure", "refused-stream", "reset",
                                     "unavailable"]
    assert grpc.route.timeout == 0 and grpc.health_check.type == "grpc"
    written = decode(cluster(protocol="grpc", retries={"retry_on": ["reset"]},
                             route={"timeout": "2s"}), ClusterSpec)
    assert written.retries.retry_on == ["reset"] and written.route.timeout == 2
    assert decode(cluster(protocol="tcp"), ClusterSpec).retries.attempts == 6
    assert decode(cluster(protocol="tcp", retries={"attempts": 2}),
                  ClusterSpec).retries.attempts == 2
    assert decode(cluster(), ClusterSpec).retries.attempts == 3
    # Written or not, a TCP cluster's route and retry conditions are the defaults: it has
    # no requests (the model written back as data reads the same).
    assert parse_model(ModelForm({"clusters": [cluster(protocol="tcp", route={})]}))


# -- generated models -----------------------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "c", "web-1", "db.2"])
DURATION = st.one_of(st.sampled_from(["250ms", "1s", "2m", "1h", 0, 30, 0.5]))


@st.composite
def models(draw: st.DrawFn) -> dict[str, Any]:
    """Valid models in canonical and lax forms alike."""
    clusters = []
    for i, name in enumerate(draw(st.lists(NAMES, min_size=1, max_size=3, unique=True))):
        sites = draw(st.lists(st.sampled_from(["dc1", "dc2", "dc3"]), max_size=3, unique=True))
        members = [{"name": n, "address": draw(st.sampled_from(["127.0.0.1", "::1", "db.local"])),
                    "port": draw(st.sampled_from([1000 * i + j + 1, str(1000 * i + j + 1)])),
                    **({"site": draw(st.sampled_from(sites))} if sites and draw(st.booleans())
                       else {}),
                    "weight": draw(st.sampled_from([1, 100, "200", 7.0]))}
                   for j, n in enumerate(draw(st.lists(NAMES, min_size=1, max_size=4,
                                                       unique=True)))]
        spec: dict[str, Any] = {
            "name": name, "members": members, "sites": [{"name": s} for s in sites],
            "mode": draw(st.sampled_from(["high-availability", "load-sharing"])),
            "protocol": draw(st.sampled_from(["http", "http2", "grpc", "tcp"])),
            "sessions": {"ttl": draw(DURATION.filter(lambda d: d not in (0, "0s"))),
                         "sync_delay": draw(DURATION),
                         "replication": draw(st.sampled_from(["all", "narrow"])),
                         "quota": draw(st.sampled_from([{}, {"sessions": "5"},
                                                        {"writes_per_second": "2.5",
                                                         "writes_burst": 3}]))},
            "health_check": {"enabled": draw(st.sampled_from([True, "yes", "off", 0])),
                             "interval": draw(st.sampled_from(["1s", 0.25, "500ms"]))},
            "degradation": {"action": draw(st.sampled_from(["move", "report", False]))},
        }
        if spec["protocol"] != "tcp":
            spec["stickiness"] = draw(st.sampled_from([
                {"header": "x-session"}, {"cookie": {"name": "s", "ttl": "1h"}},
                {"header": "x-s", "pin": {"header": "x-pin"}}]))
        clusters.append(spec)
    return {"clusters": clusters}


@SETTINGS
@given(models())
def test_a_generated_model_round_trips_through_the_declaration(data: dict[str, Any]) -> None:
    """What the declaration reads, written back as plain data (JSON, YAML), reads the
    same; and the control plane's reading and the sidecar's agree on every cluster."""
    text = yaml.safe_dump(data)
    try:
        model = parse_model(text)
    except ModelError as exc:  # a generated model may break a cross-cluster rule
        assert all(p.path.startswith("clusters") for p in exc.problems), exc
        return
    plain = msgspec.to_builtins(model)
    again = decode(plain, ModelSpec)
    assert again == model
    assert decode(msgspec.json.decode(msgspec.json.encode(model)), ModelSpec) == model
    assert parse_unexpanded(text).clusters == model.clusters
    assert parse_model(yaml.safe_dump(plain)) == model
