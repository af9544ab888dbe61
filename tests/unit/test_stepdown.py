"""A degraded member's pins let go (meshxl.xds.stepdown): at its last step in load
sharing, once the active role moved from it in high availability (and the active's
while a probe runs, a standby's after a probe that moved nothing); sent HEALTHY, which
is no override target of a pinned cluster."""

from __future__ import annotations

from envoy.config.core.v3 import health_check_pb2

from meshxl.model import RuntimeState, cluster_view, parse_model
from meshxl.model.runtime import Health
from meshxl.xds.compiler import Compiler
from meshxl.xds.resources import build_cluster, build_load_assignment
from meshxl.xds.stepdown import released

NOW = 1_000_000.0


def _model(mode: str = "load-sharing", pin: bool = True, **degradation: object) -> object:
    extra = ", ".join(f"{k}: {v}" for k, v in degradation.items())
    pinned = ", pin: {cookie: {name: p}}" if pin else ""
    return parse_model(f"""
clusters:
- name: web
  mode: {mode}
  stickiness: {{header: x-session{pinned}}}
  degradation: {{{extra}}}
  members:
  - {{name: a, address: 127.0.0.1, port: 8001}}
  - {{name: b, address: 127.0.0.1, port: 8002}}
  - {{name: c, address: 127.0.0.1, port: 8003}}
""")


def _state(**health: Health) -> RuntimeState:
    return RuntimeState(health={("web", m): h for m, h in health.items()})


def test_load_sharing_pins_go_at_the_last_step_only() -> None:
    model = _model()
    state = _state(c=Health("degraded", since=NOW))
    # Halvings at 0, 1, 2, 3 s (step 1 s); at 4 s the share is min_share: pins go.
    assert [released(model, state, NOW + t) for t in (0, 3.9)] == [{}, {}]  # type: ignore[arg-type]
    assert released(model, state, NOW + 4) == {"web": frozenset({"c"})}  # type: ignore[arg-type]
    # A floor above the halvings is the last step as soon as it is reached.
    floor = _model(min_share=0.2)
    assert released(floor, state, NOW + 1.9) == {}  # type: ignore[arg-type]
    assert released(floor, state, NOW + 2) == {"web": frozenset({"c"})}  # type: ignore[arg-type]


def test_nothing_goes_without_pins_a_move_or_a_degraded_record() -> None:
    late = NOW + 60
    assert released(_model(pin=False), _state(c=Health("degraded", since=NOW)), late) == {}  # type: ignore[arg-type]
    assert released(_model(), _state(c=Health("degraded", since=NOW, moves=False)),  # type: ignore[arg-type]
                    late) == {}
    assert released(_model(), _state(c=Health("probe", since=NOW)), late) == {}  # type: ignore[arg-type]
    assert released(_model(), RuntimeState(), late) == {}  # type: ignore[arg-type]


def test_high_availability_pins_go_when_the_active_role_moves() -> None:
    model = _model("high-availability")
    moved = _state(a=Health("degraded", since=NOW, behind="b"))
    assert released(model, moved, NOW) == {"web": frozenset({"a"})}  # type: ignore[arg-type]
    # a probe (which names the active it runs beside) lets the active's pins go, so
    # its sessions' requests are balanced between the two; a record without it, none
    probing = _state(b=Health("probe", since=NOW, behind="a"))
    assert released(model, probing, NOW) == {"web": frozenset({"a"})}  # type: ignore[arg-type]
    assert released(model, _state(b=Health("probe", since=NOW)), NOW) == {}  # type: ignore[arg-type]
    # a probe that moved nothing hands the standby's sessions back; a member held behind
    # (manual failback) keeps no pins either
    for kind in ("handback", "held"):
        got = released(model, _state(b=Health(kind, since=NOW, behind="a")), NOW)  # type: ignore[arg-type]
        assert got == {"web": frozenset({"b"})}, kind
        assert released(_model(), _state(b=Health(kind, since=NOW)), NOW) == {}  # type: ignore[arg-type]
    assert released(_model(), probing, NOW) == {}  # type: ignore[arg-type]


def _statuses(cla: object) -> dict[str, int]:
    return {ep.endpoint.hostname: ep.health_status
            for group in cla.endpoints for ep in group.lb_endpoints}  # type: ignore[attr-defined]


def test_a_released_member_is_sent_healthy_which_no_pin_targets() -> None:
    model = _model()
    spec = model.clusters[0]  # type: ignore[attr-defined]
    state = _state(c=Health("degraded", since=NOW))
    view = cluster_view(spec, state)
    assert set(_statuses(build_load_assignment(view)).values()) == {health_check_pb2.UNKNOWN}
    statuses = _statuses(build_load_assignment(view, released=frozenset({"c"})))
    assert statuses == {"a": health_check_pb2.UNKNOWN, "b": health_check_pb2.UNKNOWN,
                        "c": health_check_pb2.HEALTHY}
    targets = build_cluster(spec).common_lb_config.override_host_status.statuses
    assert health_check_pb2.HEALTHY not in targets
    assert health_check_pb2.UNKNOWN in targets and health_check_pb2.DEGRADED in targets
    # The compiler rebuilds the endpoints when the released set changes.
    compiler = Compiler()
    before = compiler.compile(model, state).endpoints["web"]  # type: ignore[arg-type]
    after = compiler.compile(model, state, released={"web": frozenset({"c"})}  # type: ignore[arg-type]
                             ).endpoints["web"]
    assert _statuses(before)["c"] == health_check_pb2.UNKNOWN
    assert _statuses(after)["c"] == health_check_pb2.HEALTHY


def test_high_availability_pins_only_to_the_active_tier() -> None:
    """Outside a probe only the active keeps pins: the standby and the backup are sent
    HEALTHY whatever brought a session to them (a takeover handed back, a failback);
    a probed standby shares the active's tier and keeps the pins it takes."""
    ok, released_ = health_check_pb2.UNKNOWN, health_check_pb2.HEALTHY
    spec = _model("high-availability").clusters[0]  # type: ignore[attr-defined]
    assert _statuses(build_load_assignment(cluster_view(spec, RuntimeState()))) == {
        "a": ok, "b": released_, "c": released_}
    probing = cluster_view(spec, _state(b=Health("probe", since=NOW, behind="a")))
    assert _statuses(build_load_assignment(probing, released=frozenset({"a"}))) == {
        "a": released_, "b": ok, "c": released_}
    unpinned = _model("high-availability", pin=False).clusters[0]  # type: ignore[attr-defined]
    assert set(_statuses(build_load_assignment(cluster_view(unpinned, RuntimeState())))
               .values()) == {ok}
