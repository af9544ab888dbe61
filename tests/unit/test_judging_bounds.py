"""What holds across members holds across control-plane replicas (meshxl.xds.judging):
a write keeps only the judgements the cluster's bound allows over every replica's
records in etcd, and two replicas judging at the same instant degrade no majority."""

from __future__ import annotations

from meshxl.model import RuntimeState, parse_model
from meshxl.model.runtime import Health
from meshxl.xds.health import Bound, Judge
from meshxl.xds.judging import within_bounds
from tests.unit.test_health import steady

NOW = 1_000_000.0
TIER = Bound(tier=frozenset({"a", "b", "c"}), degraded=1)


def sick(by: str, kind: str = "degraded") -> Health:
    return Health(kind, reason="slow", since=NOW, by=by)


def test_a_second_replica_cannot_degrade_a_second_member_of_three() -> None:
    stored = {("web", "b"): sick("r1")}
    assert within_bounds("r2", {("web", "c"): sick("r2")}, [], stored, {"web": TIER}) == {}
    # with b's judgement gone (r1 removed it, or its lease ended) there is room
    assert within_bounds("r2", {("web", "c"): sick("r2")}, [], {}, {"web": TIER}) == {
        ("web", "c"): sick("r2")}


def test_the_worst_first_while_there_is_room_and_own_records_stay() -> None:
    five = Bound(tier=frozenset("abcde"), degraded=2)
    stored = {("web", "a"): sick("r1")}
    puts = {("web", "d"): sick("r2"), ("web", "e"): sick("r2")}
    assert list(within_bounds("r2", puts, [], stored, {"web": five})) == [("web", "d")]
    # a record the replica holds already is kept whatever the others hold
    stored = {("web", "a"): sick("r1"), ("web", "b"): sick("r1"), ("web", "c"): sick("r2")}
    renewed = {("web", "c"): Health("degraded", reason="slower", since=NOW, by="r2")}
    assert within_bounds("r2", renewed, [], stored, {"web": five}) == renewed
    # removing its own record in the same write makes room for another
    stored = {("web", "a"): sick("r1"), ("web", "c"): sick("r2")}
    assert within_bounds("r2", puts, [("web", "c")], stored, {"web": five}) == {
        ("web", "d"): sick("r2")}


def test_another_replicas_record_of_a_member_stays_theirs() -> None:
    stored = {("web", "b"): sick("r1")}
    wide = Bound(tier=frozenset("abcde"), degraded=2)
    assert within_bounds("r2", {("web", "b"): sick("r2")}, [], stored, {"web": wide}) == {}


def test_high_availability_one_replicas_judgements_at_a_time() -> None:
    ha = {"web": Bound(exclusive=True)}
    stored = {("web", "b"): sick("r1", "probe")}
    assert within_bounds("r2", {("web", "a"): sick("r2")}, [], stored, ha) == {}
    assert within_bounds("r2", {("web", "b"): sick("r2", "probe")}, [], stored, ha) == {}
    assert within_bounds("r1", {("web", "a"): sick("r1")}, [("web", "b")], stored, ha) == {
        ("web", "a"): sick("r1")}
    # a cluster without a bound (degradation off) is not checked
    assert within_bounds("r2", {("other", "a"): sick("r2")}, [], stored, ha) == {
        ("other", "a"): sick("r2")}


def test_two_replicas_judging_at_once_degrade_one_member_of_three() -> None:
    model = parse_model("""
clusters:
- name: web
  mode: load-sharing
  degradation: {action: move}
  members:
  - {name: a, address: 127.0.0.1, port: 8001}
  - {name: b, address: 127.0.0.1, port: 8002}
  - {name: c, address: 127.0.0.1, port: 8003}
""")
    # each replica's Envoys see another member ten times slower than the others
    one = Judge("r1").judge(model, RuntimeState(), steady(slow={"8002": 0.1}), NOW)  # type: ignore[arg-type]
    two = Judge("r2").judge(model, RuntimeState(), steady(slow={"8003": 0.1}), NOW)  # type: ignore[arg-type]
    assert set(one.records) == {("web", "b")} and set(two.records) == {("web", "c")}
    assert one.bounds["web"] == two.bounds["web"] == TIER
    # r1 commits first; r2's write, read against etcd after it, keeps nothing
    stored = within_bounds("r1", one.records, [], {}, one.bounds)
    assert within_bounds("r2", two.records, [], stored, two.bounds) == {}
