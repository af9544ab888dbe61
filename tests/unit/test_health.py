"""Sick members judged from per-host request samples (meshxl.xds.health), and what a
judgement does to the cluster view (meshxl.model.cluster_view)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from meshxl.model import RuntimeState, cluster_view, parse_model
from meshxl.model.decode import problems_of
from meshxl.model.runtime import AdminAction, Health, MemberState, Registration, Role
from meshxl.model.spec import ClusterSpec
from meshxl.model.traffic import Degradation
from meshxl.xds.health import WINDOW, Judge, share, shares

NOW = 1_000_000.0  # a window boundary
PROBE_SECONDS = Degradation().probe_time  # the default


@dataclass(frozen=True)
class S:
    requests: int
    errors: int
    p90: float | None


def _model(mode: str = "load-sharing", **degradation: object) -> object:
    extra = "".join(f", {k}: {v}" for k, v in degradation.items())
    return parse_model(f"""
clusters:
- name: web
  mode: {mode}
  stickiness: {{header: x-session}}
  degradation: {{action: move{extra}}}
  members:
  - {{name: a, address: 127.0.0.1, port: 8001}}
  - {{name: b, address: 127.0.0.1, port: 8002}}
  - {{name: c, address: 127.0.0.1, port: 8003}}
""")


class Samples:
    """Requests per host per window: ``latency(host, window_start)`` gives each window."""

    def __init__(self, sample: Callable[[str, float], S | None]) -> None:
        self.sample = sample

    def windows(self, cluster: str, since: float, until: float) -> dict[str, list[S]]:
        out: dict[str, list[S]] = {}
        for host in ("127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003"):
            got = [self.sample(host, (since + i * WINDOW))
                   for i in range(round((until - since) / WINDOW))]
            out[host] = [s if s is not None else S(0, 0, None) for s in got]
        return out

    def summary(self, cluster: str, since: float, until: float) -> dict[str, S]:
        out = {}
        for host, windows in self.windows(cluster, since, until).items():
            live = [w for w in windows if w.requests]
            if live:
                p90s = [w.p90 for w in live if w.p90 is not None]
                out[host] = S(sum(w.requests for w in live), sum(w.errors for w in live),
                              statistics.median(p90s) if p90s else None)
        return out


def steady(slow: dict[str, float] | None = None, errors: dict[str, float] | None = None,
           since: float = NOW - 3.0, until: float = math.inf, requests: int = 20,
           normal: float = 0.010) -> Samples:
    """Every host answers in ``normal`` seconds, but for the ones in ``slow`` (host port
    -> p90) and ``errors`` (port -> failed fraction) from ``since`` to ``until``."""
    def sample(host: str, at: float) -> S:
        port = host.rsplit(":", 1)[1]
        sick = since <= at < until
        p90 = (slow or {}).get(port, normal) if sick else normal
        failed = round(requests * (errors or {}).get(port, 0.0)) if sick else 0
        return S(requests, failed, p90)
    return Samples(sample)


def _judge(model: object, samples: Samples, state: RuntimeState | None = None,
           now: float = NOW, judge: Judge | None = None) -> dict[str, Health]:
    found = (judge or Judge("r1")).judge(model, state or RuntimeState(), samples, now)  # type: ignore[arg-type]
    return {m: h for (_, m), h in found.records.items()}


def test_a_member_ten_times_slower_than_its_peers_is_degraded() -> None:
    records = _judge(_model(), steady(slow={"8003": 0.100}))
    assert list(records) == ["c"]
    assert records["c"].kind == "degraded" and records["c"].by == "r1"
    assert "p90 100 ms against its peers' 10 ms" in records["c"].reason


def test_one_slow_window_a_short_burst_or_a_slight_slowdown_moves_nothing() -> None:
    # a GC pause: one window of the three
    assert _judge(_model(), steady(slow={"8003": 0.500}, since=NOW - 1.0)) == {}
    # slower, but less than latency_factor (3x) its peers
    assert _judge(_model(), steady(slow={"8003": 0.025})) == {}
    # 3x, but not latency_margin (25 ms) above them: fast services are not judged on us
    assert _judge(_model(), steady(slow={"8003": 0.003}, normal=0.001)) == {}


def test_everyone_equally_slow_moves_nothing() -> None:
    assert _judge(_model(), steady(slow={"8001": 0.2, "8002": 0.2, "8003": 0.2})) == {}


def test_too_few_requests_are_not_judged() -> None:
    assert _judge(_model(), steady(slow={"8003": 0.1}, requests=3)) == {}
    assert _judge(_model(min_requests=5), steady(slow={"8003": 0.1}, requests=3)) != {}


def test_a_member_too_slow_to_answer_often_is_judged_on_the_answers_it_gives() -> None:
    """A member ten times slower completes a few requests where its peers complete
    many, some windows none at all: judged on the windows it answered in."""
    def sample(host: str, at: float) -> S:
        if host.endswith("8003") and at >= NOW - 3.0:
            window = round((at - NOW) / WINDOW)
            return S(3, 0, 0.5) if window % 3 else S(0, 0, None)
        return S(20, 0, 0.01)
    assert list(_judge(_model(), Samples(sample))) == ["c"]
    # but one window with answers is not a span
    def once(host: str, at: float) -> S:
        if host.endswith("8003") and at >= NOW - 3.0:
            return S(6, 0, 0.5) if round((at - NOW) / WINDOW) == -1 else S(0, 0, None)
        return S(20, 0, 0.01)
    assert _judge(_model(), Samples(once)) == {}


def test_a_hanging_member_is_sick_a_member_that_answers_nothing_is_down() -> None:
    """Every request to c timed out after 0.5 s (its access log counts the wait as its
    latency): sick. Every request to c reset without a byte (killed): passed over."""
    def hanging(host: str, at: float) -> S:
        if host.endswith("8003") and at >= NOW - 3.0:
            return S(4, 4, 0.5)
        return S(20, 0, 0.01)
    records = _judge(_model(), Samples(hanging))
    assert list(records) == ["c"] and "p90 500 ms" in records["c"].reason
    def killed(host: str, at: float) -> S:
        if host.endswith("8003") and at >= NOW - 3.0:
            return S(4, 4, None)
        return S(20, 0, 0.01)
    assert _judge(_model(), Samples(killed)) == {}


def test_a_member_is_judged_against_its_own_normal_too() -> None:
    # c always served the heaviest sessions at 4x its peers: that is its normal
    heavy = steady(slow={"8003": 0.040}, since=0.0)
    assert _judge(_model(), heavy) == {}
    # from there, 3x worse is sick
    def sample(host: str, at: float) -> S:
        port = host.rsplit(":", 1)[1]
        if port == "8003":
            return S(20, 0, 0.130 if at >= NOW - 3.0 else 0.040)
        return S(20, 0, 0.010)
    assert list(_judge(_model(), Samples(sample))) == ["c"]


def test_failing_a_share_of_requests_is_degraded() -> None:
    records = _judge(_model(), steady(errors={"8002": 0.2}))
    assert list(records) == ["b"]
    assert "20% of requests failed" in records["b"].reason
    assert _judge(_model(), steady(errors={"8002": 0.02})) == {}


def test_at_most_a_minority_of_a_tier_is_degraded() -> None:
    records = _judge(_model(), steady(slow={"8002": 0.2, "8003": 0.1}))
    assert len(records) == 1


def test_action_off_judges_nothing_and_report_moves_nothing() -> None:
    off = parse_model(_yaml_with("action: off"))
    assert _judge(off, steady(slow={"8003": 0.1})) == {}
    report = parse_model(_yaml_with("action: report"))
    records = _judge(report, steady(slow={"8003": 0.1}))
    assert records["c"].moves is False


def _yaml_with(degradation: str, mode: str = "load-sharing") -> str:
    return f"""
clusters:
- name: web
  mode: {mode}
  degradation: {{{degradation}}}
  members:
  - {{name: a, address: 127.0.0.1, port: 8001}}
  - {{name: b, address: 127.0.0.1, port: 8002}}
  - {{name: c, address: 127.0.0.1, port: 8003}}
"""


def _state(**health: Health) -> RuntimeState:
    return RuntimeState(health={("web", m): h for m, h in health.items()})


def test_the_share_halves_every_step_down_to_the_floor() -> None:
    spec = _model().clusters[0]  # type: ignore[attr-defined]
    assert [share(spec, NOW, NOW + t) for t in (0, 0.99, 1, 2, 3, 4, 60)] == [
        0.5, 0.5, 0.25, 0.125, 0.0625, 0.0, 0.0]
    floor = _model(min_share=0.1).clusters[0]  # type: ignore[attr-defined]
    assert [share(floor, NOW, NOW + t) for t in (0, 1, 2, 3, 4, 60)] == [
        0.5, 0.25, 0.125, 0.1, 0.1, 0.1]
    model = _model()
    found, due = shares(model, _state(c=Health("degraded", since=NOW)), NOW + 1.5)  # type: ignore[arg-type]
    assert found == {"web": {"c": 0.25}} and due == NOW + 2.0
    found, due = shares(model, _state(c=Health("degraded", since=NOW)), NOW + 9)  # type: ignore[arg-type]
    assert found == {"web": {"c": 0.0}} and due is None
    assert shares(model, _state(c=Health("degraded", since=NOW, moves=False)), NOW) == ({}, None)  # type: ignore[arg-type]


def test_a_degraded_member_recovers_after_recover_seconds_within_the_margins() -> None:
    model = _model(recover="5s")
    judge = Judge("r1")
    sick = steady(slow={"8003": 0.1}, until=NOW)
    first = _judge(model, sick, judge=judge, now=NOW)
    assert list(first) == ["c"]
    state = _state(c=first["c"])
    # still within recover: kept whatever the samples say
    assert _judge(model, sick, state, now=NOW + 4, judge=judge) == {"c": first["c"]}
    # recover seconds with no worse window: the record goes
    assert _judge(model, sick, state, now=NOW + 6, judge=judge) == {}
    # still worse in one window of the last recover seconds: kept
    late = steady(slow={"8003": 0.1}, since=NOW - 3.0, until=NOW + 3.0)
    assert _judge(model, late, state, now=NOW + 6, judge=judge) == {"c": first["c"]}
    # records of another replica are neither kept nor removed by this one
    other = _state(c=Health("degraded", since=NOW, by="r2"))
    assert _judge(model, sick, other, now=NOW + 6, judge=judge) == {}


def test_cluster_view_degraded_member_keeps_its_tier_in_load_sharing() -> None:
    spec = _model().clusters[0]  # type: ignore[attr-defined]
    view = cluster_view(spec, _state(c=Health("degraded", since=NOW)))
    c = view.member("c")
    assert c is not None and c.state is MemberState.DEGRADED and c.priority == 0
    assert c.role is Role.LOAD_SHARING


def _ha() -> object:
    return _model("high-availability")


def test_cluster_view_high_availability_degraded_active_goes_behind_the_standby() -> None:
    spec = _ha().clusters[0]  # type: ignore[attr-defined]
    view = cluster_view(spec, _state(a=Health("degraded", since=NOW)))
    roles = {m.name: (m.role, m.priority, m.state) for m in view.members}
    assert roles["b"] == (Role.ACTIVE, 0, MemberState.READY)
    assert roles["a"] == (Role.STANDBY, 1, MemberState.DEGRADED)
    assert roles["c"][0] is Role.BACKUP
    # report only: shown degraded, keeps its place
    view = cluster_view(spec, _state(a=Health("degraded", since=NOW, moves=False)))
    a = view.member("a")
    assert a is not None and a.role is Role.ACTIVE and a.state is MemberState.DEGRADED
    # a probed standby joins the active's tier, keeping its role
    view = cluster_view(spec, _state(b=Health("probe", since=NOW)))
    roles = {m.name: (m.role, m.priority) for m in view.members}
    assert roles["a"] == (Role.ACTIVE, 0) and roles["b"] == (Role.STANDBY, 0)
    assert roles["c"] == (Role.BACKUP, 1)


@pytest.mark.parametrize("probe_time", [None, 3.0])
def test_high_availability_probe_then_predictive_failover(probe_time: float | None) -> None:
    model = _ha() if probe_time is None else _model("high-availability",
                                                    probe_time=f"{probe_time:g}s")
    probe_for = PROBE_SECONDS if probe_time is None else probe_time
    judge = Judge("r1")

    def only(port: str, p90: Callable[[float], float]) -> Samples:
        def sample(host: str, at: float) -> S | None:
            if host.endswith(port):
                return S(20, 0, p90(at))
            return None
        return Samples(sample)

    def active_slow(at: float) -> float:
        return 0.2 if at >= NOW - 3.0 else 0.01
    # the active is 20x its normal: the standby is probed
    found = judge.judge(model, RuntimeState(), only("8001", active_slow), NOW)  # type: ignore[arg-type]
    assert {m: h.kind for (_, m), h in found.records.items()} == {"b": "probe"}
    assert "its normal" in found.suspects["web"]
    probe = _state(b=found.records[("web", "b")])
    # the probe runs for probe_time; then the two are compared
    fast_standby = Samples(lambda host, at: S(20, 0, active_slow(at)) if host.endswith("8001")
                           else S(10, 0, 0.01) if host.endswith("8002") else None)
    held = judge.judge(model, probe, fast_standby, NOW + probe_for - 0.5)  # type: ignore[arg-type]
    assert {m: h.kind for (_, m), h in held.records.items()} == {"b": "probe"}
    moved = judge.judge(model, probe, fast_standby, NOW + probe_for + 0.5)  # type: ignore[arg-type]
    assert {m: h.kind for (_, m), h in moved.records.items()} == {"a": "degraded"}
    assert moved.records[("web", "a")].reason == (
        "p90 200 ms against the standby's 10 ms (predictive failover to b)")


def test_high_availability_a_standby_no_better_ends_the_probe() -> None:
    model = _ha()
    judge = Judge("r1")
    first = judge.judge(model, RuntimeState(), Samples(  # type: ignore[arg-type]
        lambda host, at: S(20, 0, 0.2 if at >= NOW - 3 else 0.01) if host.endswith("8001")
        else None), NOW)
    probe = _state(b=first.records[("web", "b")])
    both_slow = Samples(lambda host, at: S(20, 0, 0.2) if host.endswith(("8001", "8002"))
                        else None)
    after = judge.judge(model, probe, both_slow, NOW + PROBE_SECONDS + 0.5)  # type: ignore[arg-type]
    assert after.records == {}
    # and the cluster is left alone for `recover` seconds
    again = judge.judge(model, RuntimeState(), both_slow, NOW + PROBE_SECONDS + 1.0)  # type: ignore[arg-type]
    assert again.records == {}


def test_high_availability_pinned_a_probe_that_moves_nothing_hands_back() -> None:
    """With pins the probe names the active it runs beside (its pins are let go
    meanwhile), and a standby no better keeps a handback record for ``recover``: its
    place, its pins let go (meshxl.xds.stepdown), while it is the standby."""
    model = parse_model(_yaml_with("action: move, recover: 4s", "high-availability").replace(
        "mode: high-availability\n",
        "mode: high-availability\n  stickiness: {header: x-session, pin: {cookie: {name: p}}}\n"))
    judge = Judge("r1")
    first = judge.judge(model, RuntimeState(), Samples(  # type: ignore[arg-type]
        lambda host, at: S(20, 0, 0.2 if at >= NOW - 3 else 0.01) if host.endswith("8001")
        else None), NOW)
    assert first.records[("web", "b")].behind == "a"
    both_slow = Samples(lambda host, at: S(20, 0, 0.2) if host.endswith(("8001", "8002"))
                        else None)
    ended = NOW + PROBE_SECONDS + 0.5
    after = judge.judge(model, _state(b=first.records[("web", "b")]), both_slow, ended)  # type: ignore[arg-type]
    handback = after.records[("web", "b")]
    assert (handback.kind, handback.behind, handback.since) == ("handback", "a", ended)
    assert handback.reason == (  # what the probe saw: why it moved nothing
        "probed beside a, no better (a: p90 200 ms, 40 requests, 0% failed; b: p90 200 ms, "
        "40 requests, 0% failed): its sessions go back")
    view = cluster_view(model.clusters[0], _state(b=handback))  # type: ignore[attr-defined]
    roles = {m.name: (m.role, m.priority, m.state) for m in view.members}
    assert roles["a"] == (Role.ACTIVE, 0, MemberState.READY)
    assert roles["b"] == (Role.STANDBY, 1, MemberState.READY)
    kept = judge.judge(model, _state(b=handback), both_slow, ended + 3.9)  # type: ignore[arg-type]
    assert set(kept.records) == {("web", "b")}
    assert judge.judge(model, _state(b=handback), both_slow, ended + 4).records == {}  # type: ignore[arg-type]
    # the standby became the active meanwhile (the active went down): nothing to hand back
    down = RuntimeState(health={("web", "b"): handback},
                        members_down={("web", "a"): AdminAction(reason="x")})
    assert judge.judge(model, down, both_slow, ended + 1).records == {}  # type: ignore[arg-type]


def test_a_probe_that_gets_no_requests_fails_nothing_over() -> None:
    """A probed standby that sees no requests (under Istio, a pinned cluster's: its
    labels stay behind the active) ends the probe unjudged; the active keeps its role."""
    model = _ha()
    judge = Judge("r1")
    active_only = Samples(lambda host, at: S(20, 0, 0.2 if at >= NOW - 3 else 0.01)
                          if host.endswith("8001") else None)
    first = judge.judge(model, RuntimeState(), active_only, NOW)  # type: ignore[arg-type]
    probe = _state(b=first.records[("web", "b")])
    waiting = judge.judge(model, probe, active_only, NOW + 2 * PROBE_SECONDS)  # type: ignore[arg-type]
    assert {m: h.kind for (_, m), h in waiting.records.items()} == {"b": "probe"}
    done = judge.judge(model, probe, active_only, NOW + 3 * PROBE_SECONDS + 0.5)  # type: ignore[arg-type]
    assert done.records == {} and done.suspects == {}


def test_a_registered_member_that_is_gone_loses_its_judgement() -> None:
    model = parse_model(_yaml_with("action: move").replace(
        "members:", "membership: registered\n  members:"))
    reg = {("web", n): Registration(address="127.0.0.1", port=p)
           for n, p in (("a", 8001), ("b", 8002))}
    state = RuntimeState(registrations=reg,
                         health={("web", "c"): Health("degraded", since=NOW, by="r1")})
    assert _judge(model, steady(), state, now=NOW + 1) == {}


@pytest.mark.parametrize("data, problem", [
    ({"kind": "sick"}, "health kind must be one of"),
    ({"kind": "degraded", "since": "x"}, "health since is not a number"),
    ({"kind": "degraded", "since": "nan"}, "not a finite number"),
])
def test_a_bad_health_record_is_refused_with_its_reason(data: dict[str, object],
                                                        problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Health.from_dict(data)


def test_a_health_record_round_trips() -> None:
    h = Health("degraded", reason="p90 x", since=NOW, by="r1", moves=False)
    assert Health.from_dict(h.to_dict()) == h


def _ha_model(failback: str = "automatic") -> object:
    return parse_model(_yaml_with("action: move, recover: 4s", "high-availability").replace(
        "  members:", f"  failover: {{failback: {failback}, failback_delay: 2s}}\n  members:"))


def _moved(judge: Judge, model: object, slow_active: Samples) -> Health:
    """Drive a predictive failover from a to b; the degraded record of a."""
    found = judge.judge(model, RuntimeState(), slow_active, NOW)  # type: ignore[arg-type]
    probe = _state(b=found.records[("web", "b")])
    moved = judge.judge(model, probe, slow_active, NOW + PROBE_SECONDS + 0.5)  # type: ignore[arg-type]
    record = moved.records[("web", "a")]
    assert record.kind == "degraded" and record.behind == "b"
    return record


def _hosts(p90: dict[str, float], slow_since: float = NOW - 3.0) -> Samples:
    """Every listed port serves (20 requests a window); 8001 at 10 ms before slow_since."""
    def sample(host: str, at: float) -> S | None:
        port = host.rsplit(":", 1)[1]
        if port not in p90:
            return None
        return S(20, 0, p90[port] if at >= slow_since or port != "8001" else 0.01)
    return Samples(sample)


@pytest.mark.parametrize("failback, after", [("automatic", {}), ("manual", {"a": "held"})])
def test_a_degraded_active_well_again_is_probed_then_failback_decides(
        failback: str, after: dict[str, str]) -> None:
    model, judge = _ha_model(failback), Judge("r1")
    record = _moved(judge, model, _hosts({"8001": 0.2, "8002": 0.01}))
    state = _state(a=record)
    view = cluster_view(model.clusters[0], state)  # type: ignore[attr-defined]
    assert view.member("b").role is Role.ACTIVE  # type: ignore[union-attr]
    hold = record.since + 4 + (2 if failback == "automatic" else 0)
    well = _hosts({"8001": 0.01, "8002": 0.01})
    kept = judge.judge(model, state, well, hold - 0.5)  # type: ignore[arg-type]
    assert kept.records == {("web", "a"): record}
    probing = judge.judge(model, state, well, hold + 0.5)  # type: ignore[arg-type]
    assert {m: h.kind for (_, m), h in probing.records.items()} == {"a": "probe"}
    probed = _state(a=probing.records[("web", "a")])
    view = cluster_view(model.clusters[0], probed)  # type: ignore[attr-defined]
    assert view.member("b").role is Role.ACTIVE and view.member("a").priority == 0  # type: ignore[union-attr]
    done = judge.judge(model, probed, well, hold + 0.5 + PROBE_SECONDS + 0.5)  # type: ignore[arg-type]
    assert {m: h.kind for (_, m), h in done.records.items()} == after
    if after:
        held = _state(a=done.records[("web", "a")])
        view = cluster_view(model.clusters[0], held)  # type: ignore[attr-defined]
        a, b = view.member("a"), view.member("b")
        assert a is not None and b is not None
        assert (b.role, a.role, a.state) == (Role.ACTIVE, Role.STANDBY, MemberState.RETURNING)
        # while b serves, a stays held; when b leaves, a takes its place back
        assert judge.judge(model, held, well, hold + 10).records == done.records  # type: ignore[arg-type]
        gone = RuntimeState(health=held.health, members_down={("web", "b"): None})  # type: ignore[dict-item]
        view = cluster_view(model.clusters[0], gone)  # type: ignore[attr-defined]
        assert view.member("a").role is Role.ACTIVE  # type: ignore[union-attr]


def test_a_degraded_active_still_slow_stays_degraded() -> None:
    model, judge = _ha_model(), Judge("r1")
    record = _moved(judge, model, _hosts({"8001": 0.2, "8002": 0.01}))
    state = _state(a=record)
    hold = record.since + 6
    probing = judge.judge(model, state, _hosts({"8001": 0.2, "8002": 0.01}), hold + 0.5)  # type: ignore[arg-type]
    probed = _state(a=probing.records[("web", "a")])
    done = judge.judge(model, probed, _hosts({"8001": 0.2, "8002": 0.01}),  # type: ignore[arg-type]
                       hold + 0.5 + PROBE_SECONDS + 0.5)
    again = done.records[("web", "a")]
    assert again.kind == "degraded" and again.reason.startswith("still") and again.behind == "b"


def test_high_availability_normal_is_the_clusters_not_the_members_slow_past() -> None:
    """A member that was slow before a failover, active again, is judged by what the
    cluster normally answers in (its peers' windows count), not by its own slow past."""
    model, judge = _ha(), Judge("r1")
    def sample(host: str, at: float) -> S | None:
        port = host.rsplit(":", 1)[1]
        if port == "8001":  # slow throughout, including its baseline
            return S(20, 0, 0.2) if at >= NOW - 10 else None
        if port == "8002":  # served well before
            return S(20, 0, 0.01) if at < NOW - 10 else None
        return None
    found = judge.judge(model, RuntimeState(), Samples(sample), NOW)  # type: ignore[arg-type]
    assert {m: h.kind for (_, m), h in found.records.items()} == {"b": "probe"}


def test_a_past_sickness_does_not_become_the_members_normal() -> None:
    """c was sick for half of the last minute (undetected: action off, or before this
    replica started), then well; sick again now, it is judged by its healthy ratio."""
    def sample(host: str, at: float) -> S:
        port = host.rsplit(":", 1)[1]
        if port == "8003" and (NOW - 40 <= at < NOW - 10 or at >= NOW - 3.0):
            return S(20, 0, 0.2)
        return S(20, 0, 0.01)
    assert list(_judge(_model(), Samples(sample))) == ["c"]


def test_a_member_killed_is_down_not_sick() -> None:
    """Killed: its last answers, then resets and refused connections (failures with no
    byte back, so no latency): not judged; its lease and health check take it out."""
    def sample(host: str, at: float) -> S:
        if host.endswith("8003"):
            if at >= NOW - 1.0:
                return S(10, 10, None)   # refused, reset: no answer
            if at >= NOW - 1.5:
                return S(20, 8, 0.011)   # answers, then the in-flight ones reset
        return S(20, 0, 0.01)
    assert _judge(_model(), Samples(sample)) == {}
    # answered failures (503s with a latency) are sickness
    answered = steady(errors={"8003": 0.5})
    assert list(_judge(_model(), answered)) == ["c"]


@pytest.mark.parametrize("written", ["500ms", "0s", "11m", -1, "soon"])
def test_a_probe_time_outside_one_second_to_ten_minutes_is_refused(written: object) -> None:
    problems = problems_of({"name": "web", "mode": "high-availability",
                            "degradation": {"probe_time": written},
                            "members": [{"name": "a", "address": "127.0.0.1", "port": 8001}]},
                           ClusterSpec)
    assert [p.path for p in problems] == ["degradation.probe_time"], problems
