"""Planned moves and delayed sync (meshxl.model.moves, meshxl.xds.planned,
meshxl.statesync.delayed and planned): which records move sessions away from which
member, the control plane's wait for that member's acknowledgement (bounded by
``sync_delay`` + 1 s), and the sidecar's write-through while a move is under way."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from meshxl.etcd.keys import Keys
from meshxl.etcd.mesh import flushed_moves, runtime_from_values
from meshxl.model import AdminAction, RuntimeState, parse_model
from meshxl.model.moves import GRACE, health_token, held_back, moves, moves_away_from
from meshxl.model.runtime import Health, Registration
from meshxl.statesync.delayed import LocalSessions
from meshxl.statesync.metrics import StatesyncMetrics
from meshxl.statesync.planned import PlannedFlush, ack_value
from meshxl.xds.health import Judge
from meshxl.xds.metrics import XdsMetrics
from meshxl.xds.planned import MoveGate

NOW = 1_000_000.0
DELAY = 5.0
AT = datetime.fromtimestamp(NOW, UTC).isoformat()  # NOW as an admin record's time
SITES = {"a": "dc1", "b": "dc1", "c": "dc2"}
REG = Registration(address="127.0.0.1", port=8000)


def _tokens(state: RuntimeState) -> dict[str, tuple[str, ...]]:
    return {m: moves_away_from("web", m, SITES[m], state) for m in SITES}


def test_each_planned_move_names_the_members_it_moves_sessions_away_from() -> None:
    down = AdminAction(at=AT)
    state = RuntimeState(
        members_down={("web", "a"): down}, sites_offline={"dc2": down},
        health={("web", "b"): Health("degraded", since=NOW)})
    assert _tokens(state) == {"a": (f"down@{AT}",), "b": (f"degraded:b@{NOW!r}",),
                              "c": (f"offline:dc2@{AT}",)}
    # A probe moves the active's sessions to the probed member and may hand them back:
    # both replicate (and write through while it runs); a handback the standby's.
    probe = RuntimeState(health={("web", "b"): Health("probe", since=NOW, behind="a")})
    assert _tokens(probe) == {"a": (f"probe:b@{NOW!r}",), "b": (f"probe:b@{NOW!r}",),
                              "c": ()}
    handback = RuntimeState(health={("web", "b"): Health("handback", since=NOW)})
    assert _tokens(handback)["b"] == (f"handback:b@{NOW!r}",)
    # Moving nothing: held behind already, or reported only.
    quiet = RuntimeState(health={("web", "a"): Health("held", since=NOW),
                                 ("web", "b"): Health("degraded", since=NOW, moves=False)})
    assert _tokens(quiet) == {"a": (), "b": (), "c": ()}
    # An operator's choice of a virtual system's active moves the others' sessions.
    chosen = RuntimeState(preferred={("web", "c"): AdminAction(at=AT)})
    assert _tokens(chosen) == {"a": (f"preferred:c@{AT}",), "b": (f"preferred:c@{AT}",),
                               "c": ()}
    # A pool member down re-places the pool's virtual systems: their members flush.
    pooled = RuntimeState(members_down={("pool1", "a"): AdminAction(at=AT)})
    assert moves_away_from("vs1", "a", "dc1", pooled) == ()
    assert moves_away_from("vs1", "a", "dc1", pooled, "pool1") == (f"down@{AT}",)
    [move] = moves("vs1", {"a": "dc1"}, pooled, "pool1")
    assert move.key == ("pool1", "a")
    # Only members that could flush (registered) are named.
    assert moves("web", {"b": "dc1"}, state)[0].members == ("b",)


def _acked(*pairs: tuple[str, str, float]) -> dict[tuple[str, str], dict[str, float]]:
    out: dict[tuple[str, str], dict[str, float]] = {}
    for member, token, at in pairs:
        out.setdefault(("web", member), {})[token] = at
    return out


def test_a_move_waits_for_its_acknowledgement_at_most_sync_delay_and_a_second() -> None:
    clusters = [("web", DELAY, SITES, None)]
    state = RuntimeState(members_down={("web", "a"): AdminAction(at=AT)},
                         health={("web", "b"): Health("degraded", since=NOW)})
    held = held_back(clusters, state, NOW + 0.1)
    assert held.state.members_down == {} and held.state.health == {}
    assert {m.token for m in held.waiting} == {f"down@{AT}", f"degraded:b@{NOW!r}"}
    assert held.next_release == NOW + DELAY + GRACE
    # b has replicated its young sessions: its step-down starts at its acknowledgement.
    acked = RuntimeState(members_down=state.members_down, health=state.health,
                         flushed=_acked(("b", f"degraded:b@{NOW!r}", NOW + 0.2)))
    held = held_back(clusters, acked, NOW + 0.3)
    assert held.state.members_down == {}
    assert held.state.health[("web", "b")].since == NOW + 0.2
    assert held.next_release == NOW + DELAY + GRACE
    # Unacknowledged (an old or dead sidecar): the move goes ahead after the wait, its
    # steps counted from then.
    late = held_back(clusters, state, NOW + DELAY + GRACE)
    assert late.waiting == () and late.next_release is None
    assert late.unacknowledged == {f"down@{AT}", f"degraded:b@{NOW!r}"}
    assert late.state.members_down == state.members_down
    assert late.state.health[("web", "b")].since == NOW + DELAY + GRACE
    # An acknowledgement of another version of the record counts for nothing.
    stale = RuntimeState(members_down=state.members_down,
                         flushed=_acked(("a", "down@2001-01-01T00:00:00+00:00", NOW)))
    assert held_back(clusters, stale, NOW + 1).state.members_down == {}


def test_a_record_dated_ahead_waits_no_longer_than_from_when_it_was_first_seen() -> None:
    state = RuntimeState(health={("web", "b"): Health("degraded", since=NOW + 3600)})
    token = f"degraded:b@{NOW + 3600!r}"
    held = held_back([("web", DELAY, SITES, None)], state, NOW + DELAY + GRACE, {token: NOW})
    assert held.waiting == () and ("web", "b") in held.state.health


def test_without_delayed_sync_or_planned_moves_the_state_is_compiled_as_it_is() -> None:
    state = RuntimeState(registrations={("web", "a"): REG})
    assert held_back([("web", DELAY, SITES, None)], state, NOW).state is state
    down = RuntimeState(registrations={("web", "a"): REG},
                        members_down={("web", "a"): AdminAction(at=AT)})
    gate = MoveGate()
    plain = parse_model(MODEL.format(delay="0s"))
    assert gate.gate(plain, down, NOW).state is down  # sync_delay 0: nothing waits
    delayed = parse_model(MODEL.format(delay="5s"))
    held = gate.gate(delayed, down, NOW)
    assert held.state.members_down == {} and gate.waiting == (f"down@{AT}",)
    # Gone before it went ahead: forgotten.
    assert gate.gate(delayed, RuntimeState(registrations=down.registrations), NOW).waiting == ()
    assert gate.waiting == () and gate.first_seen == {}


def test_the_gate_counts_the_moves_that_wait_and_those_that_went_ahead_unacknowledged(
) -> None:
    metrics = XdsMetrics()
    gate = MoveGate(metrics)
    delayed = parse_model(MODEL.format(delay="5s"))
    down = RuntimeState(registrations={("web", "a"): REG},
                        members_down={("web", "a"): AdminAction(at=AT)})
    gate.gate(delayed, down, NOW)
    assert metrics.planned_waiting._value.get() == 1
    assert gate.gate(delayed, down, NOW + DELAY + GRACE).state is down
    assert metrics.planned_waiting._value.get() == 0
    assert metrics.planned_unacknowledged._value.get() == 1


def test_a_sidecar_with_its_own_sync_delay_is_waited_for_whatever_the_model_says() -> None:
    """``--sync-delay`` on a sidecar, none in the model: its registration says so, and
    the move away from it waits; a registration's delay that is not a number, or longer
    than a day, is not believed."""
    plain = parse_model(MODEL.format(delay="0s"))
    records: dict[str, Any] = {"address": "127.0.0.1", "port": 8001}
    for told, waits in ((30, True), (0, False), ("30", False), (True, False),
                        (86_401, False), (float("nan"), False)):
        reg = Registration.from_dict({**records, "sync_delay": told})
        down = RuntimeState(registrations={("web", "a"): reg},
                            members_down={("web", "a"): AdminAction(at=AT)})
        held = MoveGate().gate(plain, down, NOW)
        assert bool(held.waiting) is waits, told
        assert (held.state.members_down == {}) is waits, told


MODEL = """
clusters:
- name: web
  membership: registered
  sessions: {{sync_delay: {delay}}}
  members:
  - {{name: a, address: 127.0.0.1, port: 8001}}
"""


def test_acknowledgements_are_read_from_the_mesh_and_bad_ones_skipped() -> None:
    keys = Keys()
    good = keys.member_flushed("web", "a")
    assert keys.parse_cluster_key(good) == ("web", "flushed", "a")
    state = runtime_from_values(keys, {
        good: ack_value({"down@x": NOW}),
        keys.member_flushed("web", "b"): b'{"moves": {"down@x": "soon"}}',
        keys.member_flushed("web", "c"): b'{"moves": {"down@x": NaN}}'})
    assert state.flushed == {("web", "a"): {"down@x": NOW}}
    with pytest.raises(ValueError):
        flushed_moves({"moves": ["down@x"]})


def test_a_move_under_way_makes_every_kept_session_due_and_writes_through() -> None:
    local = LocalSessions("a", DELAY, StatesyncMetrics())
    local.keep("s1", b"{}", "application/json", None, NOW)
    assert local.keeps_new and local.due(NOW + 1) == []
    local.writing_through = True
    assert not local.keeps_new and [s for s, _ in local.due(NOW + 1)] == ["s1"]
    assert not local.young(local.get("s1"), NOW + 1)  # type: ignore[arg-type]
    local.writing_through = False
    assert local.keeps_new and local.due(NOW + 1) == []


class _Etcd:
    """Records the acknowledgement's puts and deletes (the sidecar's etcd client)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def put(self, key: bytes, value: bytes, lease: int) -> None:
        self.calls.append(("put", (json.loads(value)["moves"], lease)))

    async def delete(self, key: bytes) -> None:
        self.calls.append(("delete", key.decode()))


async def test_the_sidecar_acknowledges_once_nothing_is_kept_and_withdraws_after() -> None:
    local = LocalSessions("a", DELAY, StatesyncMetrics())
    local.keep("s1", b"{}", "application/json", None, NOW)
    client = _Etcd()
    flushed: list[int] = []

    async def flush() -> int:
        due = local.due(NOW)
        for session_id, _ in due:
            local.drop(session_id)
        flushed.append(len(due))
        return len(due)

    lease: list[int | None] = [None]
    planned = PlannedFlush(client, "k", lambda: [local], flush,  # type: ignore[arg-type]
                           lambda: len(local), lambda: lease[0], StatesyncMetrics())
    planned.update(("down@x",))
    assert local.writing_through
    assert await planned.settle() is False and client.calls == []  # not registered yet
    lease[0] = 7
    assert await planned.settle() is True and flushed == [1] and len(local) == 0
    [(op, (acked, under))] = client.calls
    assert op == "put" and set(acked) == {"down@x"} and under == 7
    assert await planned.settle() is True and len(client.calls) == 1  # nothing new
    lease[0] = 8  # registered again: the acknowledgement went with the old lease
    assert await planned.settle() is True and client.calls[-1][1] == (acked, 8)
    planned.update(())
    assert not local.writing_through
    assert await planned.settle() is True and client.calls[-1] == ("delete", "k")
    await asyncio.sleep(0)


VS_MODEL = """
pools:
  - name: web
    listener: {address: 127.0.0.1, port: 10000}
    members:
      - {name: m1, address: 127.0.0.1, port: 9001}
      - {name: m2, address: 127.0.0.1, port: 9002}
virtual_systems:
  - {name: t1, pool: web, sessions: {sync_delay: 5s}}
"""


def test_a_pool_member_down_waits_for_its_virtual_systems_sidecars() -> None:
    from meshxl.model.vsls import placed

    model = parse_model(VS_MODEL)
    registered = {("t1", m): REG for m in ("m1", "m2")}
    down = RuntimeState(registrations=registered,
                        members_down={("web", "m1"): AdminAction(at=AT)})
    held = MoveGate().gate(placed(model, down), down, NOW)
    assert held.state.members_down == {}  # t1 stays where it is meanwhile
    acked = RuntimeState(registrations=registered, members_down=down.members_down,
                         flushed={("t1", "m1"): {f"down@{AT}": NOW}})
    assert MoveGate().gate(placed(model, acked), acked, NOW).state.members_down == \
        down.members_down


def test_a_step_down_keeps_its_start_when_the_acknowledgement_goes_with_a_lease() -> None:
    gate = MoveGate()
    model = parse_model(MODEL.format(delay="5s"))
    judged = {("web", "a"): Health("degraded", since=NOW)}
    registered = {("web", "a"): REG}
    acked = RuntimeState(registrations=registered, health=judged,
                         flushed=_acked(("a", f"degraded:a@{NOW!r}", NOW + 0.2)))
    assert gate.gate(model, acked, NOW + 0.3).state.health[("web", "a")].since == NOW + 0.2
    # The member's sidecar restarted: its acknowledgement went with its lease, and the
    # new one acknowledges again later; the steps still count from the first.
    again = RuntimeState(registrations=registered, health=judged,
                         flushed=_acked(("a", f"degraded:a@{NOW!r}", NOW + 30)))
    for state in (RuntimeState(registrations=registered, health=judged), again):
        assert gate.gate(model, state, NOW + 31).state.health[("web", "a")].since == NOW + 0.2


HA_MODEL = """
clusters:
- name: web
  mode: high-availability
  sessions: {sync_delay: 60s}
  stickiness: {header: x-session}
  degradation: {action: move}
  members:
  - {name: a, address: 127.0.0.1, port: 8001}
  - {name: b, address: 127.0.0.1, port: 8002}
"""


def test_a_probe_counts_its_time_from_when_its_move_went_ahead() -> None:
    """With delayed sync a probe waits for the active's sidecar to replicate its young
    sessions before it moves any (a slow etcd: seconds). Meanwhile the active writes
    through, and a request it fails Envoy retries on the standby: those windows show
    a failing active beside a standby that serves, though the probe moved nothing.
    The probe's ``probe_time`` counts from when its move went ahead, so they are never
    its verdict."""
    from tests.unit.test_health import S, Samples

    model = parse_model(HA_MODEL)
    probe_time = model.clusters[0].degradation.probe_time
    gate = MoveGate()
    judge = Judge("r1", gate.began)
    registered = {("web", m): Registration(address="127.0.0.1", port=port)
                  for m, port in (("a", 8001), ("b", 8002))}
    slow = Samples(lambda host, at: S(20, 0, 0.2 if at >= NOW - 3 else 0.01)
                   if host.endswith("8001") else None)
    probe = judge.judge(model, RuntimeState(registrations=registered), slow, NOW  # type: ignore[arg-type]
                        ).records[("web", "b")]
    assert probe.kind == "probe" and probe.behind == "a"
    probed = RuntimeState(registrations=registered, health={("web", "b"): probe})
    token = health_token("probe", "b", probe.since)
    gate.gate(model, probed, NOW + 0.1)
    assert gate.waiting == (token,) and gate.began(token, probe.since) is None

    went = NOW + 5.0  # a's sidecar acknowledged then

    def sample(host: str, at: float) -> S | None:
        if host.endswith("8001"):  # writing through: failing, retried on b
            return S(20, 20 if at < went else 0, 0.2)
        return S(20, 0, 0.2) if host.endswith("8002") else None
    flushing = Samples(sample)
    for t in (1.0, 3 * probe_time + 0.5, 4.5):
        held = judge.judge(model, probed, flushing, NOW + t)  # type: ignore[arg-type]
        assert {m: h.kind for (_, m), h in held.records.items()} == {"b": "probe"}, t
    # Both members replicate and write through while a probe runs: it waits for both.
    half = RuntimeState(registrations=registered, health=probed.health,
                        flushed=_acked(("b", token, NOW + 0.2)))
    gate.gate(model, half, NOW + 0.3)
    assert gate.began(token, probe.since) is None
    acked = RuntimeState(registrations=registered, health=probed.health,
                         flushed=_acked(("b", token, NOW + 0.2), ("a", token, went)))
    gate.gate(model, acked, went + 0.1)
    assert gate.began(token, probe.since) == went
    assert {m: h.kind for (_, m), h in judge.judge(  # type: ignore[arg-type]
        model, acked, flushing, went + probe_time - 0.5).records.items()} == {"b": "probe"}
    # Then the two serve alike: the probe ends, and nothing fails over.
    done = judge.judge(model, acked, flushing, went + probe_time + 0.5)  # type: ignore[arg-type]
    assert done.records == {}
