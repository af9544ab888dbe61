"""The failover report's computations (meshxl.local.report, the percentiles of
meshxl.stats) and the timeline (meshxl.local.plot) on synthetic request records and
spans, no processes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from meshxl import stats
from meshxl.local import plot
from meshxl.local import report as demo
from meshxl.local.traffic import Record
from meshxl.telemetry import names
from meshxl.telemetry.otlpjson import Span, merge_traces, read_spans

T0 = 1_700_000_000.0
KILL = T0 + 4.0
KILL_NS = int(KILL * 1e9)


def FakeSpan(name: str, trace_id: str, span_id: str, parent_span_id: str | None,  # noqa: N802
             start_ns: int, end_ns: int, attributes: dict[str, Any] | None = None,
             service: str = "meshxl-xds", status_code: int = 0, kind: int = 1) -> Span:
    """A real parsed span, as read_spans returns it."""
    return Span(trace_id=trace_id, span_id=span_id, parent_span_id=parent_span_id, name=name,
                kind=kind, start_ns=start_ns, end_ns=end_ns, attributes=attributes or {},
                resource={"service.name": service}, service=service, status_code=status_code,
                status_message="")


def post(at: float, session: str, member: str | None, seq: int | None, status: int = 200,
         took: float = 0.01) -> Record:
    return Record(T0 + at, T0 + at + took, session, status, member, seq, "POST")


def failover_trace(member: str = "a", trace_id: str = "f" * 32, start: float = 1.8,
                   push_at: float = 0.013) -> list[FakeSpan]:
    """A failover trace of ``member`` starting ``start`` s after the kill (ms offsets)."""
    base = KILL_NS + int(start * 1e9)

    def at(ms: float) -> int:
        return base + int(ms * 1e6)

    root = FakeSpan(names.FAILOVER, trace_id, "1" * 16, None, at(0), at(20),
                    {names.MEMBER: member, names.CAUSE: "lease_expired"})
    return [
        root,
        FakeSpan(names.FAILOVER_DETECT, trace_id, "2" * 16, root.span_id, at(0), at(10)),
        FakeSpan(names.FAILOVER_REBUILD, trace_id, "3" * 16, root.span_id, at(10), at(12)),
        FakeSpan(names.FAILOVER_PUSH, trace_id, "4" * 16, root.span_id, at(push_at * 1000),
                 at(14)),
        FakeSpan(names.FAILOVER_ACK, trace_id, "5" * 16, root.span_id, at(14), at(16)),
        FakeSpan(names.FAILOVER_TAKEOVER, trace_id, "6" * 16, root.span_id, at(17), at(19),
                 {names.MEMBER: "b"}, "meshxl-statesync"),
        FakeSpan(names.FAILOVER_TAKEOVER, trace_id, "7" * 16, root.span_id, at(17), at(21),
                 {names.MEMBER: "b"}, "meshxl-statesync"),
    ]


def test_quantiles_and_distribution() -> None:
    # Nearest rank (meshxl.stats): the value at rank ceil(q * n), one that was observed.
    assert stats.quantile([], 0.5) is None
    assert stats.quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert stats.quantile([0.0, 10.0], 0.99) == 10.0
    assert demo.distribution([10.0, 20.0, 30.0]) == {"count": 3, "p50": 20.0, "p99": 30.0,
                                                     "max": 30.0}
    assert demo.distribution([]) == {"count": 0, "p50": None, "p99": None, "max": None}


def test_lost_writes_compare_last_acknowledged_seq_with_read_back() -> None:
    records = [post(0, "s1", "a", 1), post(1, "s1", "a", 2), post(2, "s1", "a", None, 503),
               post(0, "s2", "a", 1), post(1, "s2", "b", 2),
               post(0, "s3", "a", 1), post(1, "s3", "a", 2)]
    assert demo.last_acknowledged(records) == {"s1": 2, "s2": 2, "s3": 2}
    # s1 is intact; s2 lost one write; s3 could not be read back: both its writes count.
    # A read back above the last acknowledged seq (an unacknowledged write that applied)
    # is no loss.
    assert demo.lost_writes(records, {"s1": 3, "s2": 1, "s3": None}) == {"s2": 1, "s3": 2}


def test_recovery_time_counts_only_sessions_of_the_killed_member() -> None:
    records = [
        post(3.0, "s1", "a", 1), post(4.25, "s1", "b", 2, took=0.05),   # 300 ms
        post(3.5, "s2", "a", 1), post(4.0, "s2", None, None, 503),      # fails after the kill
        post(4.5, "s2", "b", 2, took=0.1),                                # 600 ms
        post(3.9, "s3", "b", 1), post(4.1, "s3", "b", 2),                 # not on a
        post(3.8, "s4", "a", 1),                                          # never again
    ]
    rto, unrecovered = demo.recovery_times_ms(records, KILL, "a")
    assert rto == [pytest.approx(300, abs=0.01), pytest.approx(600, abs=0.01)]
    assert unrecovered == ["s4"]


def test_a_response_in_flight_at_the_kill_neither_recovers_nor_counts_after_it() -> None:
    # s1's request went to a before the kill and its answer reached the client 20 ms
    # after it (in flight through Envoy); the session recovers only on b, 300 ms later.
    kill = KILL - T0
    records = [post(3.0, "s1", "a", 1), post(kill - 0.01, "s1", "a", 2, took=0.03),
               post(kill + 0.25, "s1", "b", 3, took=0.05)]
    rto, unrecovered = demo.recovery_times_ms(records, KILL, "a")
    assert rto == [pytest.approx(300, abs=0.01)] and unrecovered == []
    assert demo.member_counts(records, since=KILL) == {"b": 1}
    assert demo.member_counts(records, until=KILL) == {"a": 1}


def test_busiest_member_and_member_counts() -> None:
    records = [post(0, "s1", "a", 1), post(0, "s2", "b", 1), post(1, "s2", "c", 2),
               post(0, "s3", "c", 1), post(1, "s4", "b", 1, status=409)]
    assert demo.busiest_member(records) == "c"
    assert demo.member_counts(records) == {"a": 1, "b": 1, "c": 2}
    assert demo.member_counts(records, since=T0 + 0.5) == {"c": 1}
    assert demo.failure_kinds(records) == {"HTTP 409": 1}


def test_failure_examples_say_who_answered_what_and_when() -> None:
    refused = Record(T0 + 2, T0 + 2.25, "s2", 503, None, None, "POST", "no healthy upstream")
    dropped = Record(T0 + 1, T0 + 6, "s1", 0, None, None, "POST", "TimeoutError")
    conflict = post(3, "s3", "b", None, status=409)
    examples = demo.failure_examples([refused, conflict, dropped], T0, limit=2)
    assert examples == [
        {"at_s": 1.0, "took_ms": 5000.0, "session": "s1", "status": 0, "member": None,
         "answer": "TimeoutError"},
        {"at_s": 2.0, "took_ms": 250.0, "session": "s2", "status": 503, "member": None,
         "answer": "no healthy upstream"},
    ]


def test_failover_times_from_the_killed_members_trace() -> None:
    spans = failover_trace("a") + failover_trace("z", trace_id="e" * 32)
    fo = demo.failover_times(spans, "a")
    assert fo.traces == 1 and fo.trace_id == "f" * 32 and fo.cause == "lease_expired"
    assert fo.start_ns == KILL_NS + int(1.8e9)
    assert (fo.converged_ns - fo.start_ns) / 1e6 == pytest.approx(16)  # type: ignore[operator]
    assert sorted(fo.takeover_ms) == [pytest.approx(2), pytest.approx(4)]
    assert fo.takeover_source == names.FAILOVER_TAKEOVER
    assert fo.violations == []
    assert demo.failover_times(spans, "nobody").traces == 0


def test_session_takeover_spans_stand_in_when_the_trace_has_none() -> None:
    trace = [s for s in failover_trace() if s.name != names.FAILOVER_TAKEOVER]
    start = trace[0].start_ns
    request_spans = [FakeSpan(names.SESSION_TAKEOVER, "9" * 32, "8" * 16, "7" * 16,
                              start + 5_000_000, start + 8_000_000),
                     # Takeovers precede detection (Envoy retries before a lease ends):
                     # 1 s before still belongs to this failover, 10 s before does not.
                     FakeSpan(names.SESSION_TAKEOVER, "9" * 32, "b" * 16, "7" * 16,
                              start - 10**9, start - 10**9 + 2_000_000),
                     FakeSpan(names.SESSION_TAKEOVER, "9" * 32, "a" * 16, "7" * 16,
                              start - 10 * 10**9, start - 10 * 10**9 + 1)]
    fo = demo.failover_times(trace + request_spans, "a")
    assert fo.takeover_source == names.SESSION_TAKEOVER
    assert sorted(fo.takeover_ms) == [pytest.approx(2), pytest.approx(3)]


def test_causal_violations_flag_a_push_before_the_rebuild_ended() -> None:
    early = failover_trace(push_at=0.005)  # push at 5 ms, rebuild ends at 12 ms
    problems = demo.causal_violations(early)
    assert len(problems) == 1 and "meshxl.failover.push starts" in problems[0]
    missing = [s for s in failover_trace() if s.name != names.FAILOVER_ACK]
    assert demo.causal_violations(missing) == ["no meshxl.failover.ack span"]


def envoy_attempts(trace_id: str, statuses: list[tuple[str, bool]]) -> list[FakeSpan]:
    root = FakeSpan("ingress", trace_id, "0" * 16, None, 0, 100, {}, "envoy", kind=2)
    return [root] + [
        FakeSpan("router demo egress", trace_id, f"{i + 1:016x}", root.span_id, 10 * i,
                 10 * i + 5, {"http.status_code": code, **({"error": "true"} if err else {})},
                 "envoy", kind=3)
        for i, (code, err) in enumerate(statuses)]


def test_envoy_retry_traces_need_a_failed_attempt_then_a_success() -> None:
    spans = (envoy_attempts("1" * 32, [("0", True), ("200", False)])
             + envoy_attempts("2" * 32, [("200", False)])
             + envoy_attempts("3" * 32, [("503", False), ("503", False)])
             + envoy_attempts("4" * 32, [("200", False), ("0", True)]))
    assert demo.envoy_retry_traces(spans) == ["1" * 32]


def test_build_report_has_every_field() -> None:
    records = [post(3.0, "s1", "a", 1), post(4.25, "s1", "b", 2, took=0.05),
               post(3.1, "s2", "a", 1), post(4.3, "s2", "b", 2)]
    spans = failover_trace() + envoy_attempts("1" * 32, [("0", True), ("200", False)])
    report = demo.build_report(records, {"s1": 2, "s2": 1}, spans, cluster="demo",
                               mode="high-availability", members=["a", "b", "c"], sessions=2,
                               duration=8.0, started=T0, kill_time=KILL, killed="a")
    json.dumps(report)  # serializable as is
    assert report["requests"] == 4 and report["failed_requests"] == 0
    assert report["acknowledged_writes"] == 4
    assert report["lost_writes"] == 1 and report["lost_sessions"] == {"s2": 1}
    assert report["rto_ms"]["count"] == 2 and report["rto_ms"]["max"] == pytest.approx(310)
    assert report["detection_ms"] == pytest.approx(1800, abs=0.1)
    assert report["convergence_ms"] == pytest.approx(16, abs=0.1)
    assert report["takeover_ms"]["p50"] == pytest.approx(2)  # of 2 and 4 ms, nearest rank
    assert report["kill_at_s"] == 4.0 and report["killed_member"] == "a"
    assert report["per_member_requests"] == {"a": 2, "b": 2}
    assert report["per_member_requests_after_kill"] == {"b": 2}
    assert report["failover"]["traces"] == 1 and report["failover"]["causal_order"]
    assert report["envoy_spans"] == 3 and report["envoy_retried_requests"] == 1
    for key in ("mode", "members", "sessions", "duration_s", "kill_time_unix"):
        assert key in report


def test_a_failover_before_the_kill_does_not_count_as_detecting_it() -> None:
    # Under load the sick-member judge stepped the busiest member's share down 1 s
    # before it was killed (a degraded failover); the kill's own failover came 1.8 s
    # after. Detection is kill -> the kill's failover, never negative.
    early = failover_trace(trace_id="d" * 32, start=-1.0)
    early[0].attributes[names.CAUSE] = "degraded"
    records = [post(3.0, "s1", "a", 1), post(4.25, "s1", "b", 2)]
    report = demo.build_report(records, {"s1": 2}, early + failover_trace(), cluster="demo",
                               mode="load-sharing", members=["a", "b", "c"], sessions=1,
                               duration=8.0, started=T0, kill_time=KILL, killed="a")
    assert report["detection_ms"] == pytest.approx(1800, abs=0.1)
    assert report["failover"]["trace_id"] == "f" * 32
    assert report["failover"]["before_kill"] == ["degraded"]
    assert demo.failover_times(early, "a", since_ns=KILL_NS).traces == 0


def test_build_report_without_a_kill() -> None:
    report = demo.build_report([post(0, "s1", "a", 1)], {"s1": 1}, [], cluster="demo",
                               mode="load-sharing", members=["a"], sessions=1, duration=1.0,
                               started=T0, kill_time=None, killed=None)
    assert report["lost_writes"] == 0 and report["rto_ms"]["count"] == 0
    assert report["convergence_ms"] is None and report["detection_ms"] is None


def test_timeline_series_buckets_successes_per_member_and_failures() -> None:
    records = [post(0.01, "s1", "a", 1, took=0.0), post(0.05, "s2", "a", 1, took=0.0),
               post(0.15, "s1", "b", 2, took=0.0), post(0.25, "s2", None, None, 503, 0.0),
               Record(T0 + 0.2, T0 + 0.21, "s1", 200, "b", 2, "GET")]  # reads not plotted
    times, per_member, failures = plot.timeline_series(records, T0, T0 + 0.3)
    assert times == [0.0, 0.1, 0.2]
    assert per_member == {"a": [2, 0, 0], "b": [0, 1, 0]}
    assert failures == [0, 0, 1]


def test_plot_timeline_writes_a_png(tmp_path: Path) -> None:
    records = [post(t / 10, f"s{t % 3}", "a" if t < 40 else "b", t) for t in range(80)]
    spans = failover_trace()
    report = demo.build_report(records, {}, spans, cluster="demo", mode="high-availability",
                               members=["a", "b", "c"], sessions=3, duration=8.0, started=T0,
                               kill_time=KILL, killed="a")
    report["failover"]["_pushes_ns"] = [s.start_ns for s in spans
                                        if s.name == names.FAILOVER_PUSH]
    plot.plot_timeline(tmp_path / "t.png", records, report, T0, T0 + 8.0)
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def otlp_line(service: str, spans: list[dict[str, Any]]) -> str:
    return json.dumps({"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name",
                                     "value": {"stringValue": service}}]},
        "scopeSpans": [{"scope": {"name": "t"}, "spans": spans}]}]})


def test_merge_and_read_traces(tmp_path: Path) -> None:
    traces = tmp_path / "traces"
    traces.mkdir()
    span = {"traceId": "ab" * 16, "spanId": "cd" * 8, "name": names.FAILOVER, "kind": 1,
            "startTimeUnixNano": "1000", "endTimeUnixNano": "3000",
            "attributes": [{"key": names.MEMBER, "value": {"stringValue": "a"}},
                           {"key": names.NODES, "value": {"intValue": "1"}}],
            "status": {}}
    (traces / "xds.jsonl").write_text(otlp_line("meshxl-xds", [span]) + "\n\n")
    child = {**span, "spanId": "ef" * 8, "parentSpanId": "cd" * 8,
             "name": names.FAILOVER_DETECT, "attributes": []}
    (traces / "envoy.jsonl").write_text(otlp_line("envoy", [child]) + "\n")
    merged = tmp_path / "traces.jsonl"
    assert merge_traces(traces, merged) == 2
    spans = read_spans([str(merged)])
    by_name = {s.name: s for s in spans}
    root = by_name[names.FAILOVER]
    assert root.parent_span_id is None and root.attributes[names.MEMBER] == "a"
    assert root.attributes[names.NODES] == 1 and root.start_ns == 1000
    assert root.service == "meshxl-xds" and by_name[names.FAILOVER_DETECT].service == "envoy"
    assert demo.failover_roots(spans, "a") == [root]


def test_merge_traces_drops_the_line_a_killed_process_left_unfinished(tmp_path: Path) -> None:
    # kill -9 can land while an exporter writes a batch: its file ends in part of a line.
    traces = tmp_path / "traces"
    traces.mkdir()
    span = {"traceId": "ab" * 16, "spanId": "cd" * 8, "name": names.FAILOVER, "kind": 1,
            "startTimeUnixNano": "1000", "endTimeUnixNano": "3000", "attributes": [],
            "status": {}}
    whole = otlp_line("meshxl-app", [span])
    later = otlp_line("meshxl-app", [{**span, "spanId": "ef" * 8}])
    (traces / "app-a.jsonl").write_text(whole + "\n" + later[: len(later) // 2])
    (traces / "app-b.jsonl").write_text(whole + "\n")
    merged = tmp_path / "traces.jsonl"
    assert merge_traces(traces, merged) == 2
    assert [s.span_id for s in read_spans([str(merged)])] == ["cd" * 8]


def test_demo_model_is_valid_in_both_modes() -> None:
    from meshxl.local import deployment
    from meshxl.model.load import parse_model

    for mode, layout in (("high-availability", deployment.HA_MEMBERS),
                         ("load-sharing", deployment.LS_MEMBERS)):
        text = deployment.demo_model(mode, 10000, layout)
        model = parse_model(text)
        cluster = model.cluster("demo")
        assert cluster is not None and cluster.mode == mode
        assert cluster.membership == "registered" and model.telemetry.tracing
        assert cluster.stickiness is not None and cluster.stickiness.header == "x-session-id"
        assert [s.name for s in cluster.sites] == sorted({site for _, site in layout})
        assert cluster.stickiness.pin is None


def test_demo_model_pins_sessions_on_request() -> None:
    from meshxl.local import deployment
    from meshxl.model.load import parse_model

    for algorithm in ("maglev", "ring_hash"):
        text = deployment.demo_model("load-sharing", 10000, deployment.LS_MEMBERS,
                                     algorithm, pin=True)
        cluster = parse_model(text).cluster("demo")
        assert cluster is not None and cluster.stickiness is not None
        assert cluster.stickiness.algorithm == algorithm
        assert cluster.stickiness.header == "x-session-id"
        pin = cluster.stickiness.pin
        assert pin is not None and pin.carrier == "cookie" and not pin.strict
        assert pin.cookie is not None and pin.cookie.name == deployment.PIN_COOKIE
