"""The sidecar's quotas (quota.py): the token bucket, the accounting of sessions and
bytes, the 429 answer, and the model's ``sessions.quota`` as the sidecar reads it."""

from __future__ import annotations

import json

import pytest

from meshxl.model import parse_model
from meshxl.model.basics import ModelError
from meshxl.model.load import parse_unexpanded
from meshxl.model.spec import SessionQuota
from meshxl.model.vsls import sessions_of
from meshxl.statesync.api import SessionRoutes
from meshxl.statesync.cache import Entry
from meshxl.statesync.cluster_routes import add_cluster_routes
from meshxl.statesync.delayed import LocalSessions
from meshxl.statesync.http import Request, Router
from meshxl.statesync.http.routing import failure
from meshxl.statesync.metrics import StatesyncMetrics
from meshxl.statesync.quota import (
    RECOUNT_AFTER,
    THROTTLED_FOR,
    THROTTLED_LINGER,
    QuotaGuard,
    QuotaRefused,
    TokenBucket,
    Usage,
    held,
    held_size,
)
from meshxl.statesync.record import SessionRecord
from meshxl.statesync.writes import DELETE, PATCH, Write


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_bucket_holds_one_second_and_refills_at_its_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(10, clock=clock)
    assert [bucket.take() for _ in range(10)] == [0.0] * 10  # a burst of one second's worth
    assert bucket.take() == pytest.approx(0.1)  # the next token in 1/rate
    clock.now += 0.25
    assert [bucket.take() for _ in range(2)] == [0.0, 0.0]
    assert bucket.take() == pytest.approx(0.05)
    clock.now += 100
    assert bucket.level() == 10  # never more than the burst


def test_a_request_larger_than_the_burst_passes_on_a_full_bucket_and_leaves_a_debt() -> None:
    clock = Clock()
    bucket = TokenBucket(5, clock=clock)
    assert bucket.take(12) == 0.0
    assert bucket.level() == -7
    assert bucket.take() == pytest.approx(8 / 5)  # back to 1 token in 1.6 s
    clock.now += 1.6
    assert bucket.take() == 0.0
    slow = TokenBucket(0.5, clock=clock)  # below one write a second: a burst of one
    assert slow.burst == 1 and slow.take() == 0.0 and slow.take() == pytest.approx(2.0)


def test_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="above 0"):
        TokenBucket(0)


class Cluster:
    """A cache's worth of sessions: id -> size."""

    def __init__(self, **sizes: int) -> None:
        self.sizes = dict(sizes)
        self.counts = 0

    def count(self) -> Usage:
        self.counts += 1
        return Usage(len(self.sizes), sum(self.sizes.values()))


def guard(cluster: Cluster, clock: Clock, metrics: StatesyncMetrics | None = None,
          **limits: float) -> QuotaGuard:
    return QuotaGuard(SessionQuota(**limits), cluster.count,  # type: ignore[arg-type]
                      cluster.sizes.get, metrics, clock=clock)


def put(session: str, size: int) -> Write:
    return Write(session_id=session, data=b"x" * size)


def test_write_batches_linger_only_while_the_cluster_is_past_its_rate() -> None:
    clock = Clock()
    assert guard(Cluster(), clock).linger() == 0.0  # no quota
    assert guard(Cluster(), clock, sessions=5).linger() == 0.0  # none for the rate
    g = guard(Cluster(), clock, writes_per_second=10, writes_burst=2)
    g.admit([put("a", 1)])
    g.admit([put("b", 1)])
    assert g.linger() == 0.0  # at the rate: every write taken, nothing refused
    assert g.rate_refusal() is not None  # a refusal from a request's head counts
    assert g.linger() == THROTTLED_LINGER
    clock.now += THROTTLED_FOR - 0.01
    assert g.linger() == THROTTLED_LINGER
    clock.now += 0.02
    assert g.linger() == 0.0
    g.admit([put("c", 1)])
    with pytest.raises(QuotaRefused):  # and one from a request's body
        g.admit([put("d", 1), put("e", 1), put("f", 1)])
    assert g.linger() == THROTTLED_LINGER
    sessions = guard(Cluster(a=5), clock, sessions=1)
    with pytest.raises(QuotaRefused):  # another quota's refusal: not the rate
        sessions.admit([put("new", 1)])
    assert sessions.linger() == 0.0


def test_no_quota_admits_everything_and_counts_nothing() -> None:
    cluster = Cluster(a=5)
    g = guard(cluster, Clock())
    for _ in range(1000):
        g.admit([put("new", 10**6)])
    assert cluster.counts == 0 and g.status() is None


def test_sessions_quota_refuses_only_a_new_session_beyond_it() -> None:
    clock, metrics = Clock(), StatesyncMetrics()
    cluster = Cluster(a=1, b=1)
    g = guard(cluster, clock, metrics, sessions=3)
    g.admit([put("a", 100)])  # an existing session: never refused for the count
    g.admit([put("c", 1)])  # the third
    g.admit([put("c", 2)])  # admitted already: not new again
    with pytest.raises(QuotaRefused) as refused:
        g.admit([put("d", 1)])
    assert refused.value.status == 429
    assert refused.value.details == {"quota": "sessions", "limit": 3, "current": 3,
                                     "retry_after": 5}
    # A bulk save of two new sessions where one fits: refused whole.
    cluster.sizes.pop("b")  # the cache now: b deleted, c written
    cluster.sizes["c"] = 2
    clock.now += RECOUNT_AFTER  # recounted
    with pytest.raises(QuotaRefused):
        g.admit([put("e", 1), put("f", 1)])
    g.admit([put("e", 1), put("e", 2)])  # one session written twice: one new
    g.admit([Write(session_id="z", op=DELETE)])  # deletes are never refused
    assert 'meshxl_statesync_quota_refused_total{quota="sessions"} 2.0' in \
        metrics.render().decode()
    assert g.status()["sessions"] == {"limit": 3, "used": 3}  # type: ignore[index]


def cached(**sizes: int) -> dict[str, Entry]:
    return {session: Entry(7, SessionRecord(owner="b", content_type="application/json",
                                            created=1.0, updated=1.0, data=b"x" * size))
            for session, size in sizes.items()}


def test_what_a_sidecar_holds_counts_its_kept_sessions_once() -> None:
    local = LocalSessions("a", 8.0, StatesyncMetrics())
    for session, size in (("k1", 10), ("k2", 20), ("both", 5)):
        local.keep(session, b"y" * size, "application/json", None, 1.0)
    caches = [cached(c1=100, both=50), cached(c2=1)]  # two shards' caches
    assert held(caches, [local.kept()]) == Usage(5, 100 + 50 + 1 + 10 + 20)
    assert held(caches, []) == Usage(3, 151)  # what counting the caches alone saw
    assert held_size("k2", caches, [local.kept()]) == 20
    assert held_size("both", caches, [local.kept()]) == 5  # its newest copy: kept here
    assert held_size("c2", caches, [local.kept()]) == 1
    assert held_size("none", caches, [local.kept()]) is None


def test_kept_sessions_count_against_the_quota_across_recounts() -> None:
    """Issue 51, item 6: ``quota: {sessions: 5}`` with delayed sync admitted 30 new
    sessions in 6 s, all kept on the member (its cache empty), because each recount
    found none of them."""
    clock = Clock()
    local = LocalSessions("a", 8.0, StatesyncMetrics())
    caches: list[dict[str, Entry]] = [{}]
    g = QuotaGuard(SessionQuota(sessions=5, bytes=64),
                   lambda: held(caches, [local.kept()]),
                   lambda session: held_size(session, caches, [local.kept()]), clock=clock)
    admitted = 0
    for i in range(30):
        clock.now += 0.2  # 30 new sessions over 6 s: a recount every 5
        try:
            g.admit([put(f"s{i}", 8)])
        except QuotaRefused as exc:
            assert exc.details["quota"] == "sessions" and exc.details["current"] == 5
            continue
        local.keep(f"s{i}", b"x" * 8, "application/json", None, clock.now)
        admitted += 1
    assert admitted == 5 and len(local) == 5
    g.admit([put("s0", 8)])  # a kept session is not a new one
    with pytest.raises(QuotaRefused) as grown:  # and its bytes count: 40 + 60 > 64
        g.admit([put("s1", 68)])
    assert grown.value.details["quota"] == "bytes"
    # Replicated (cached, its copy here let go): counted once, through the cache.
    for i in range(5):
        caches[0][f"s{i}"] = cached(**{f"s{i}": 8})[f"s{i}"]
        local.drop(f"s{i}")
    clock.now += RECOUNT_AFTER
    assert g.usage() == Usage(5, 40)


def test_bytes_quota_counts_growth_only() -> None:
    clock = Clock()
    cluster = Cluster(a=600)
    g = guard(cluster, clock, bytes=1000)
    g.admit([put("b", 400)])  # 1000: at the limit, not beyond
    with pytest.raises(QuotaRefused) as refused:
        g.admit([put("c", 1)])
    assert refused.value.details["quota"] == "bytes"
    assert refused.value.details["current"] == 1000
    g.admit([put("a", 100)])  # shrinks: 500 freed
    g.admit([put("c", 500)])
    with pytest.raises(QuotaRefused):  # a merge patch counts its own size as growth
        g.admit([Write(session_id="a", op=PATCH, patch={"k": "v"})])
    g.admit([Write(session_id="a", op=DELETE)])
    status = g.status()
    assert status is not None and status["bytes"] == {"limit": 1000, "used": 1000}
    assert status["refused"] == {"bytes": 2}


def test_writes_per_second_refuses_with_the_time_to_the_next_token() -> None:
    clock = Clock()
    g = guard(Cluster(), clock, writes_per_second=4)
    for i in range(4):
        g.admit([put(f"s{i}", 1)])
    with pytest.raises(QuotaRefused) as refused:
        g.admit([put("s5", 1)])
    assert refused.value.details["quota"] == "writes_per_second"
    assert refused.value.details["retry_after"] == 1  # 0.25 s, rounded up to whole seconds
    assert ("Retry-After", "1") in refused.value.headers
    clock.now += 0.25
    g.admit([put("s5", 1)])
    g.admit([Write(session_id="s5", op=DELETE)])  # takes no token
    clock.now += 1.0
    status = g.status()
    assert status is not None
    assert status["writes_per_second"]["limit"] == 4
    assert status["writes_per_second"]["last_second"] == 5  # in the second before
    assert status["writes_per_second"]["burst"] == 4  # one second's worth, by default


def test_writes_burst_sizes_the_bucket() -> None:
    """A tenant whose bucket holds 2 writes gets 2 at once, then one per 1/rate."""
    clock = Clock()
    g = guard(Cluster(), clock, writes_per_second=40, writes_burst=2)
    g.admit([put("s1", 1)])
    g.admit([put("s2", 1)])
    with pytest.raises(QuotaRefused):
        g.admit([put("s3", 1)])
    assert g.bucket is not None and g.bucket.wait() == pytest.approx(1 / 40)
    clock.now += 10
    assert g.bucket.level() == 2


def test_a_refused_request_takes_no_token_and_counts_no_space() -> None:
    clock = Clock()
    cluster = Cluster()
    g = guard(cluster, clock, sessions=1, writes_per_second=1)
    with pytest.raises(QuotaRefused):
        g.admit([put("a", 1), put("b", 1)])  # two new sessions: over the count
    assert g.bucket is not None and g.bucket.level() == 1
    g.admit([put("a", 1)])


def test_the_refusal_is_a_429_json_answer_with_retry_after() -> None:
    exc = QuotaRefused("writes_per_second", 50, 50, 0.02)
    answer = failure(Request("PUT", "/v1/sessions/x", "", "1.1", {}, True), exc)
    assert answer.status == 429
    assert answer.header("Retry-After") == "1"
    body = json.loads(answer.body)
    assert body["status"] == 429 and body["quota"] == "writes_per_second"
    assert body["limit"] == 50 and body["current"] == 50
    assert "writes_per_second quota" in body["error"]


QUOTA_MODEL = """\
clusters:
  - name: orders
    members: [{name: a, address: 127.0.0.1, port: 8080}]
    sessions: {quota: {sessions: 100, bytes: 1000000, writes_per_second: 2.5}}
pools:
  - name: web
    listener: {address: 127.0.0.1, port: 10000}
    members:
      - {name: w1, address: 127.0.0.1, port: 8081}
      - {name: w2, address: 127.0.0.1, port: 8082}
virtual_systems:
  - names: [t01, t02]
    pool: web
    sessions: {ttl: 10m, quota: {writes_per_second: 50}}
  - {name: big, pool: web}
  - name: t09
    pool: web
    sessions: {quota: {writes_per_second: 5, hold_refused: false, writes_burst: 2}}
"""


def test_the_model_and_the_sidecar_read_the_same_quota() -> None:
    model = parse_model(QUOTA_MODEL)
    quota = model.cluster("orders").sessions.quota  # type: ignore[union-attr]
    assert (quota.sessions, quota.bytes, quota.writes_per_second) == (100, 1_000_000, 2.5)
    sidecar = parse_unexpanded(QUOTA_MODEL)
    assert sessions_of(sidecar, "orders").quota == SessionQuota(  # type: ignore[union-attr]
        sessions=100, bytes=1_000_000, writes_per_second=2.5)
    t02 = sessions_of(sidecar, "t02")
    assert t02 is not None and t02.ttl == 600 and t02.quota == SessionQuota(
        writes_per_second=50)
    assert sessions_of(sidecar, "big").quota == SessionQuota()  # type: ignore[union-attr]
    assert sessions_of(sidecar, "nobody") is None
    assert sessions_of(model, "t02") == t02  # the control plane's, expanded
    assert model.virtual_systems[0].sessions.quota.writes_per_second == 50
    assert model.virtual_systems[0].sessions.quota.hold_refused  # the default
    assert not model.virtual_systems[2].sessions.quota.hold_refused
    assert sessions_of(sidecar, "t09").quota == SessionQuota(  # type: ignore[union-attr]
        writes_per_second=5, hold_refused=False, writes_burst=2)
    assert model.virtual_systems[2].sessions.quota.writes_burst == 2
    assert model.virtual_systems[0].sessions.quota.writes_burst is None


@pytest.mark.parametrize("quota", ["{sessions: 0}", "{bytes: -1}", "{writes_per_second: 0}",
                                   "{writes_per_second: fast}", "{burst: 3}",
                                   "{hold_refused: maybe}", "{writes_burst: 3}",
                                   "{writes_per_second: 5, writes_burst: 0}",
                                   "{writes_per_second: 5, writes_burst: 1.5}"])
def test_a_wrong_quota_is_refused_by_the_control_plane_and_the_sidecar(quota: str) -> None:
    text = f"""\
clusters:
  - name: orders
    members: [{{name: a, address: 127.0.0.1, port: 8080}}]
    sessions: {{quota: {quota}}}
"""
    with pytest.raises(ModelError, match=r"clusters\[0\]\.sessions\.quota"):
        parse_unexpanded(text)
    with pytest.raises(ModelError, match=r"sessions\.quota"):
        parse_model(text)


# -- the refusal from the head: before the body is read ----------------------------------


def test_waiting_for_a_token_takes_none() -> None:
    clock = Clock()
    bucket = TokenBucket(2, clock=clock)
    assert bucket.take(2) == 0.0
    assert bucket.wait() == pytest.approx(0.5) and bucket.wait() == pytest.approx(0.5)
    clock.now += 0.5
    assert bucket.wait() == 0.0 and bucket.level() == 1


def test_the_rate_refusal_is_decided_from_the_bucket_alone_and_counted() -> None:
    clock, metrics = Clock(), StatesyncMetrics()
    g = guard(Cluster(), clock, metrics, writes_per_second=1, sessions=5)
    assert g.rate_refusal() is None  # a token: the write goes on to admit()
    assert g.bucket is not None and g.bucket.level() == 1  # which takes it
    g.admit([put("a", 1)])
    refused = g.rate_refusal()
    assert refused is not None and refused.status == 429
    assert refused.details["quota"] == "writes_per_second" and g.refused == {
        "writes_per_second": 1}
    assert ("Retry-After", "1") in refused.headers
    assert 'meshxl_statesync_quota_refused_total{quota="writes_per_second"} 1' in \
        metrics.render().decode()
    assert guard(Cluster(), clock, sessions=1).rate_refusal() is None  # no rate quota


def test_a_hosted_cluster_refuses_a_write_over_its_rate_from_the_head() -> None:
    """The pool sidecar's route asks the request's cluster; an unknown cluster is left
    to its handler (404); the answer is the 429 a refused admit() gives."""
    clock = Clock()

    class Parts:
        quota = guard(Cluster(), clock, writes_per_second=1)

    parts = Parts()
    parts.quota.admit([put("a", 1)])
    routes = SessionRoutes(parts)  # type: ignore[arg-type]
    router = Router()
    add_cluster_routes(router, {"t01": routes}.get, lambda: ["t01"])
    found = router.resolve("/v1/clusters/t01/sessions/s")
    assert found is not None
    methods, params = found
    assert methods["DELETE"].refuse is None and methods["GET"].refuse is None
    for method in ("PUT", "PATCH"):
        refuse = methods[method].refuse
        assert refuse is not None
        request = Request(method, "/v1/clusters/t01/sessions/s", "", "1.1", {}, True)
        request.params = params
        answer = refuse(request)
        assert answer is not None and answer.status == 429
        assert answer.header("Retry-After") == "1"
        assert request.hold == pytest.approx(1.0)  # answered when a token would be there
        assert json.loads(answer.body)["quota"] == "writes_per_second"
        request.params = {**params, "cluster": "nope"}
        assert refuse(request) is None
    clock.now += 2.0  # the holds above are over: the next waits for the token alone
    parts.quota.admit([put("a", 1)])
    clock.now += 0.75
    request.params = params
    request.hold = 0.0
    assert methods["PUT"].refuse(request) is not None  # type: ignore[misc]
    assert request.hold == pytest.approx(0.25)  # the token's wait, not Retry-After's 1 s
    parts.quota.limits = SessionQuota(writes_per_second=1, hold_refused=False)
    request.hold = 0.0
    assert methods["PUT"].refuse(request) is not None  # type: ignore[misc]
    assert request.hold == 0.0  # answered at once
    clock.now += 0.25
    assert methods["PUT"].refuse(request) is None  # type: ignore[misc]


def test_refusals_held_together_are_answered_a_token_apart_at_most_a_second() -> None:
    clock = Clock()
    g = guard(Cluster(), clock, writes_per_second=4)
    g.admit([put("a", 1)] * 4)  # the bucket empty: a token in 0.25 s
    holds = []
    for _ in range(6):
        refused = g.rate_refusal()
        assert refused is not None and refused.wait == pytest.approx(0.25)
        holds.append(g.hold(refused))
    assert holds == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])  # MAX_HOLD
    clock.now += 3.0
    g.admit([put("a", 1)] * 4)
    clock.now += 0.1
    refused = g.rate_refusal()
    assert refused is not None and g.hold(refused) == pytest.approx(0.15)


