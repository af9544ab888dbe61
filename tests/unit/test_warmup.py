"""Warm-up (slow start) for hashed clusters: the pure ramp, the tracker that starts and
ends ramps, and what the compiler and the operator's status make of them."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from meshxl.model import ModelError, Registration, RuntimeState, parse_model
from meshxl.model.runtime import AdminAction
from meshxl.operator.views.read import MeshRead, warming_of
from meshxl.operator.views.status import status_report
from meshxl.operator.views.verify import expected_endpoints
from meshxl.xds.compiler import Compiler, compile_resources
from meshxl.xds.warmup import (
    MAX_STEPS,
    MIN_FRACTION,
    WarmUp,
    fraction,
    next_change,
    ramped,
    steps,
)

T0 = 1_700_000_040.0  # in the past; a multiple of every step length used below


def model(warmup: str = "5s", stickiness: str = "{header: x-session-id}",
          members: int = 3) -> str:
    listed = "".join(f"\n      - {{name: m{i}, address: 127.0.0.1, port: {8000 + i}}}"
                     for i in range(members))
    return f"""
clusters:
  - name: web
    mode: load-sharing
    membership: registered
    warmup: {warmup}
    stickiness: {stickiness}
    members:{listed}
"""


def registered(*names: str, weight: int | None = None) -> RuntimeState:
    return RuntimeState(registrations={
        ("web", n): Registration("127.0.0.1", 8000 + int(n[1:]),
                                 weight=weight if n == "m2" else None) for n in names})


# -- the ramp -----------------------------------------------------------------------------


@pytest.mark.parametrize(("window", "expected"), [
    (0.3, 1), (1.0, 1), (2.0, 2), (5.0, 5), (6.4, 6), (10.0, 10), (60.0, 10), (600.0, 10)])
def test_steps_last_a_second_or_more_and_are_at_most_ten(window: float, expected: int) -> None:
    assert steps(window) == expected
    assert window / steps(window) >= min(window, 1.0) * 0.5  # never a storm of tiny steps


def test_a_five_second_ramp_weight_at_each_step() -> None:
    expected = [0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    got = [fraction(5.0, T0, T0 + k + 0.5) for k in range(7)]
    assert got == pytest.approx(expected)
    # Step boundaries: the new weight from the boundary on, not a moment later.
    assert fraction(5.0, T0, T0 + 0.999) == pytest.approx(0.1)
    assert fraction(5.0, T0, T0 + 1.0) == pytest.approx(0.2)
    assert fraction(5.0, T0, T0 + 4.999) == pytest.approx(0.8)
    assert fraction(5.0, T0, T0 + 5.0) == 1.0


def test_the_ramp_follows_envoys_linear_slow_start_within_one_step() -> None:
    window = 8.0
    for tenth in range(0, 100):
        now = T0 + window * tenth / 100
        linear = max(MIN_FRACTION, (now - T0) / window)
        assert 0 <= linear - fraction(window, T0, now) <= 1 / steps(window) + 1e-9


def test_steps_are_on_a_shared_clock_so_joins_in_one_step_change_together() -> None:
    # Two members that start 0.2 s and 0.9 s into the same step change weight together.
    a, b = T0 + 0.2, T0 + 0.9
    for now in (T0 + 0.95, T0 + 1.0, T0 + 2.5, T0 + 4.99):
        assert fraction(5.0, a, now) == fraction(5.0, b, now)
    assert next_change(5.0, a, T0 + 0.95) == next_change(5.0, b, T0 + 0.95) == T0 + 1.0


def test_window_zero_is_off_and_the_ramp_ends_at_full_weight() -> None:
    assert fraction(0.0, T0, T0) == 1.0
    assert next_change(0.0, T0, T0) is None
    assert next_change(5.0, T0, T0 + 5.0) is None
    assert next_change(5.0, T0, T0 + 4.2) == T0 + 5.0
    assert fraction(600.0, T0, T0) == MIN_FRACTION
    assert fraction(600.0, T0, T0 + 600.0) == 1.0


def test_the_ramp_composes_with_the_member_weight_and_never_reaches_zero() -> None:
    assert ramped(50_000, 0.1) == 5_000
    assert ramped(3, 0.1) == 1  # Envoy refuses a weight of 0
    assert ramped(1, 0.5) == 1


# -- the model ---------------------------------------------------------------------------


def test_warmup_defaults_to_five_seconds_and_zero_is_off() -> None:
    spec = parse_model("clusters: [{name: a, members: [{name: m, address: 127.0.0.1, "
                       "port: 80}]}]").clusters[0]
    assert spec.warmup == 5.0
    assert parse_model(model("0")).clusters[0].warmup == 0.0
    assert parse_model(model("2m")).clusters[0].warmup == 120.0


@pytest.mark.parametrize(("value", "message"), [
    ("-1s", "expected a duration"), ("11m", "at most 600s"), ("soon", "expected a duration"),
    ("true", "expected a duration")])
def test_bad_warmup_is_refused_with_its_path(value: str, message: str) -> None:
    with pytest.raises(ModelError) as caught:
        parse_model(model(value))
    assert "clusters[0].warmup" in str(caught.value)
    assert message in str(caught.value)


# -- the tracker -------------------------------------------------------------------------


def test_members_serving_at_start_up_do_not_ramp() -> None:
    spec = parse_model(model())
    warm = WarmUp()
    assert warm.update(spec, registered("m0", "m1", "m2"), T0).fractions == {}
    assert warm.update(spec, registered("m0", "m1", "m2"), T0 + 0.5).fractions == {}


def test_a_member_that_joins_ramps_and_the_others_keep_their_weight() -> None:
    spec = parse_model(model())
    warm = WarmUp()
    warm.update(spec, registered("m0", "m1"), T0 - 10)
    w = warm.update(spec, registered("m0", "m1", "m2"), T0 + 0.3)
    assert w.fractions == {"web": {"m2": pytest.approx(0.1)}}
    assert w.next_change == T0 + 1.0
    seen = []
    now = T0 + 0.3
    while w.next_change is not None:
        now = w.next_change
        w = warm.at(spec, now)
        seen.append(w.fractions.get("web", {}).get("m2", 1.0))
    assert seen == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert now == T0 + 5.0
    assert warm.at(spec, now + 1).fractions == {}


def test_members_joining_a_cluster_where_nobody_serves_take_their_share_at_once() -> None:
    spec = parse_model(model())
    warm = WarmUp()
    warm.update(spec, RuntimeState(), T0 - 10)
    assert warm.update(spec, registered("m0", "m1"), T0).fractions == {}
    assert warm.update(spec, registered("m0", "m1", "m2"), T0 + 1).fractions == {
        "web": {"m2": 0.1}}


def test_a_member_that_comes_back_ramps_again_from_the_start() -> None:
    spec = parse_model(model())
    warm = WarmUp()
    everyone = registered("m0", "m1", "m2")
    warm.update(spec, everyone, T0 - 100)
    lost = registered("m0", "m1")
    assert warm.update(spec, lost, T0).fractions == {}
    assert warm.update(spec, everyone, T0 + 2).fractions == {"web": {"m2": 0.1}}
    # Lost again mid-ramp: the ramp is dropped, and the next return starts over.
    assert warm.update(spec, lost, T0 + 3).fractions == {}
    assert warm.update(spec, everyone, T0 + 20).fractions == {"web": {"m2": 0.1}}


@pytest.mark.parametrize("state", [
    RuntimeState(registrations={("web", "m2"): Registration("127.0.0.1", 8002,
                                                            problems=("disk",))}),
    RuntimeState(registrations={("web", "m2"): Registration("127.0.0.1", 8002, ready=False)}),
    RuntimeState(registrations={("web", "m2"): Registration("127.0.0.1", 8002,
                                                            overloaded=True)}),
    RuntimeState(members_down={("web", "m2"): AdminAction(reason="patch")},
                 registrations={("web", "m2"): Registration("127.0.0.1", 8002)}),
])
def test_a_member_back_from_a_problem_sync_overload_or_drain_ramps(
        state: RuntimeState) -> None:
    spec = parse_model(model())
    others = {k: v for k, v in registered("m0", "m1").registrations.items()}
    warm = WarmUp()
    warm.update(spec, RuntimeState(registrations={**others, **state.registrations},
                                   members_down=state.members_down), T0 - 10)
    w = warm.update(spec, registered("m0", "m1", "m2"), T0)
    assert w.fractions == {"web": {"m2": 0.1}}


def test_warmup_zero_and_clusters_without_stickiness_get_no_eds_ramp() -> None:
    for text in (model("0"), model(stickiness="null")):
        spec = parse_model(text)
        warm = WarmUp()
        warm.update(spec, registered("m0", "m1"), T0 - 10)
        assert warm.update(spec, registered("m0", "m1", "m2"), T0).fractions == {}


def test_many_members_joining_cost_a_bounded_number_of_eds_pushes() -> None:
    """40 members join at different moments of one step: their ramps change weights at
    the same instants, so a ramp costs at most ``steps`` EDS changes, not 40 times that."""
    spec = parse_model(model(members=44))
    warm = WarmUp()
    first = [f"m{i}" for i in range(4)]
    warm.update(spec, registered(*first), T0 - 10)
    joined = list(first)
    changes = []
    previous = None
    for i in range(4, 44):
        joined.append(f"m{i}")
        w = warm.update(spec, registered(*joined), T0 + 0.02 * (i - 4))
        previous = w.fractions
    now, w = T0 + 0.8, warm.at(spec, T0 + 0.8)
    while w.next_change is not None:
        now = w.next_change
        w = warm.at(spec, now)
        if w.fractions != previous:
            changes.append(now)
        previous = w.fractions
    assert len(changes) == steps(spec.clusters[0].warmup) <= MAX_STEPS


# -- compiled EDS ------------------------------------------------------------------------


def weights(resources: object, cluster: str = "web") -> dict[str, int]:
    cla = resources.endpoints[cluster]  # type: ignore[attr-defined]
    return {ep.endpoint.hostname: ep.load_balancing_weight.value
            for group in cla.endpoints for ep in group.lb_endpoints}


def test_the_ramp_scales_only_the_ramping_members_eds_weight() -> None:
    spec = parse_model(model())
    state = registered("m0", "m1", "m2", weight=200)
    full = weights(compile_resources(spec, state))
    assert full["m2"] == 2 * full["m0"]  # the member's own weight...
    ramping = compile_resources(spec, state, warming={"web": {"m2": 0.4}})
    got = weights(ramping)
    assert got["m0"] == full["m0"] and got["m1"] == full["m1"]
    assert got["m2"] == ramped(full["m2"], 0.4)  # ...times the ramp
    # The incremental compiler gives the same bytes and reuses what did not change.
    compiler = Compiler()
    for share in (0.1, 0.4, 1.0):
        warming = {"web": {"m2": share}} if share < 1 else {}
        assert (compiler.compile(spec, state, warming=warming).endpoints["web"]
                .SerializeToString(deterministic=True)
                == compile_resources(spec, state, warming=warming).endpoints["web"]
                .SerializeToString(deterministic=True))


def test_clusters_without_stickiness_use_envoys_slow_start_with_the_same_window() -> None:
    plain = compile_resources(parse_model(model("7s", stickiness="null")))
    slow = plain.clusters["web"].least_request_lb_config.slow_start_config
    assert slow.slow_start_window.seconds == 7
    assert slow.min_weight_percent.value == pytest.approx(100 * MIN_FRACTION)
    hashed = compile_resources(parse_model(model("7s")))
    assert not hashed.clusters["web"].HasField("least_request_lb_config")
    off = compile_resources(parse_model(model("0", stickiness="null")))
    assert not off.clusters["web"].HasField("least_request_lb_config")


# -- what the operator sees ----------------------------------------------------------------


def history(to: str, since: str, at: float) -> dict[str, object]:
    return {"state": to, "from": since, "at": datetime.fromtimestamp(at, UTC).isoformat()}


def test_status_shows_a_member_warming_up_with_its_ramped_share() -> None:
    spec = parse_model(model())
    read = MeshRead(revision=7, model=spec, model_error=None, model_source="etcd",
                    runtime=registered("m0", "m1", "m2"),
                    states={("web", "m2"): history("ready", "lost", T0),
                            ("web", "m1"): history("ready", "admin-down", T0 - 60)})
    report = status_report(read, now=T0 + 2.5)
    members = {m["name"]: m for m in report["clusters"][0]["members"]}
    assert members["m2"]["warmup"]["fraction"] == pytest.approx(0.4)
    assert members["m2"]["share"] == pytest.approx(0.4 / 2.4, abs=1e-3)
    assert members["m0"]["warmup"] is None and members["m1"]["warmup"] is None
    assert members["m0"]["share"] == pytest.approx(1 / 2.4, abs=1e-3)
    after = status_report(read, now=T0 + 5.0)["clusters"][0]["members"]
    assert all(m["warmup"] is None for m in after)
    assert {m["name"]: m["share"] for m in after}["m2"] == pytest.approx(1 / 3, abs=1e-3)


def test_verify_expects_the_ramped_weight_envoy_is_given() -> None:

    spec = parse_model(model())
    state = registered("m0", "m1", "m2")
    full = weights(compile_resources(spec, state))["m2"]
    for _ in range(5):  # a step may pass during one check: try again
        started = time.time() - 2.5
        read = MeshRead(revision=7, model=spec, model_error=None, model_source="etcd",
                        runtime=state, states={("web", "m2"): history("ready", "lost",
                                                                      started)})
        share = fraction(5.0, started, time.time())
        hosts = {h["member"]: h["weight"] for h in expected_endpoints(read)["web"]}
        if share == fraction(5.0, started, time.time()):
            break
    assert 0.2 <= share <= 0.6
    assert hosts["m2"] == ramped(full, share) < full
    assert hosts["m0"] == weights(compile_resources(spec, state))["m0"]


def test_a_member_that_only_changed_between_serving_states_does_not_warm() -> None:

    read = MeshRead(revision=7, model=parse_model(model()), model_error=None,
                    model_source="etcd", runtime=registered("m0", "m1", "m2"),
                    states={("web", "m2"): history("ready", "active-attention", T0)})
    assert warming_of(read, T0 + 1) == {}
    read.states[("web", "m2")] = history("ready", "returning", T0)
    assert warming_of(read, T0 + 1)["web"]["m2"]["fraction"] == pytest.approx(0.2)


def test_status_ramps_nobody_who_joined_where_nobody_served() -> None:
    """As the control plane: members that came into an empty cluster together, or a
    first one, take their share at once; one that came after them ramps."""
    spec = parse_model(model())
    states = {("web", "m0"): history("ready", "lost", T0),
              ("web", "m1"): history("ready", "lost", T0)}
    read = MeshRead(revision=7, model=spec, model_error=None, model_source="etcd",
                    runtime=registered("m0", "m1"), states=dict(states))
    assert warming_of(read, T0 + 1) == {}
    states[("web", "m2")] = history("ready", "syncing", T0 + 0.5)
    read = MeshRead(revision=8, model=spec, model_error=None, model_source="etcd",
                    runtime=registered("m0", "m1", "m2"), states=states)
    assert {m: w["fraction"] for m, w in warming_of(read, T0 + 1)["web"].items()} == {
        "m2": pytest.approx(0.2)}
