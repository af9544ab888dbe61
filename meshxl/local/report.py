"""What a failover run's request records and spans say: the report's pure computations.

From the client's :class:`~meshxl.local.traffic.Record` list, the sessions read back
and the run's spans (:func:`meshxl.telemetry.otlpjson.read_spans`): requests and
failures, acknowledged and lost writes, recovery time per session (RTO), and the
failover trace's detection, convergence and takeover times (as ``meshxl slo review``
defines them). :func:`build_report` assembles ``report.json`` of ``meshxl demo`` and
:func:`print_summary` prints it; the benchmarks and tests use the parts. No processes:
tested on synthetic records.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshxl import stats
from meshxl.binaries import install_hint
from meshxl.telemetry import names, slo

from .traffic import Record


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def distribution(values_ms: Sequence[float]) -> dict[str, Any]:
    """``{count, p50, p99, max}`` in milliseconds (None when there are no values).

    Percentiles by :func:`meshxl.stats.quantile` (nearest rank).
    """
    s = stats.summary(values_ms)
    return {"count": s["n"], "p50": _ms(s.get("p50")), "p99": _ms(s.get("p99")),
            "max": _ms(s.get("max"))}


def last_acknowledged(records: Iterable[Record]) -> dict[str, int]:
    """The highest seq acknowledged per session (2xx POSTs only)."""
    acked: dict[str, int] = {}
    for r in records:
        if r.method == "POST" and r.ok and r.seq is not None:
            acked[r.session] = max(acked.get(r.session, 0), r.seq)
    return acked


def lost_writes(records: Iterable[Record], final: Mapping[str, int | None]) -> dict[str, int]:
    """Per session with a loss: last acknowledged seq minus the seq read back.

    A session that could not be read back (``None`` or missing) counts all its
    acknowledged writes as lost: nothing proves they survived.
    """
    lost: dict[str, int] = {}
    for session, acked in last_acknowledged(records).items():
        seen = final.get(session)
        missing = acked - (seen if seen is not None else 0)
        if missing > 0:
            lost[session] = missing
    return lost


def recovery_times_ms(records: Sequence[Record], kill_time: float,
                      killed: str) -> tuple[list[float], list[str]]:
    """RTO per session the killed member was serving, and the sessions never recovered.

    A session counts when its last success that ended before the kill was served by
    the killed member; its RTO runs from the kill to the end of its first success that
    ends after the kill and was served by another member. A response the killed member
    sent before it died can still reach the client after the kill (it was in flight
    through Envoy): it does not recover the session, whose next request still has to
    fail over.
    """
    last_before: dict[str, Record] = {}
    first_after: dict[str, Record] = {}
    for r in sorted(records, key=lambda r: r.ended):
        if r.method != "POST" or not r.ok:
            continue
        if r.ended <= kill_time:
            last_before[r.session] = r
        elif r.member != killed and r.session not in first_after:
            first_after[r.session] = r
    rto, unrecovered = [], []
    for session, r in sorted(last_before.items()):
        if r.member != killed:
            continue
        after = first_after.get(session)
        if after is None:
            unrecovered.append(session)
        else:
            rto.append((after.ended - kill_time) * 1000)
    return rto, unrecovered


def member_counts(records: Iterable[Record], *, since: float | None = None,
                  until: float | None = None) -> dict[str, int]:
    """Successful POSTs per member, optionally those sent at or after ``since`` and
    those that ended before ``until``. ``since`` counts by the time a request was sent:
    a response the killed member sent just before the kill may reach the client just
    after it, and is not a request served after the kill."""
    counts: collections.Counter[str] = collections.Counter()
    for r in records:
        if r.method != "POST" or not r.ok or r.member is None:
            continue
        if since is not None and r.sent < since:
            continue
        if until is not None and r.ended >= until:
            continue
        counts[r.member] += 1
    return dict(sorted(counts.items()))


def busiest_member(records: Iterable[Record]) -> str | None:
    """The member that last served the most sessions (load-sharing's kill target)."""
    last: dict[str, tuple[float, str]] = {}
    for r in records:
        if r.method == "POST" and r.ok and r.member is not None:
            if r.session not in last or r.ended >= last[r.session][0]:
                last[r.session] = (r.ended, r.member)
    served = collections.Counter(member for _, member in last.values())
    return served.most_common(1)[0][0] if served else None


def failure_kinds(records: Iterable[Record]) -> dict[str, int]:
    kinds: collections.Counter[str] = collections.Counter()
    for r in records:
        if r.method == "POST" and not r.ok:
            kinds[f"HTTP {r.status}" if r.status else (r.error or "no answer")] += 1
    return dict(kinds)


def failure_examples(failed: Sequence[Record], started: float,
                     limit: int = 10) -> list[dict[str, Any]]:
    """The first ``limit`` failed requests as they were answered: when (seconds into
    the run), which session, the status, the member that answered if it said so, and
    the answer's first bytes or the client's error (who refused: Envoy or a member)."""
    return [{"at_s": round(r.sent - started, 3), "took_ms": round((r.ended - r.sent) * 1e3, 1),
             "session": r.session, "status": r.status, "member": r.member, "answer": r.error}
            for r in sorted(failed, key=lambda r: r.sent)[:limit]]


def _root(span: Any) -> bool:
    return not span.parent_span_id


def failover_roots(spans: Iterable[Any], member: str | None = None,
                   since_ns: int | None = None) -> list[Any]:
    """Root ``meshxl.failover`` spans, of one lost member if given, started at or after
    ``since_ns`` if given, oldest first."""
    roots = [s for s in spans if s.name == names.FAILOVER and _root(s)
             and (member is None or s.attributes.get(names.MEMBER) == member)
             and (since_ns is None or s.start_ns >= since_ns)]
    return sorted(roots, key=lambda s: s.start_ns)


def causal_violations(trace: Sequence[Any], tolerance_ns: int = 1_000_000) -> list[str]:
    """Where detect -> rebuild -> push -> ack do not follow each other in time.

    Each stage must start no earlier than the previous stage ends (the last end of
    its spans), give or take ``tolerance_ns``; every ack must follow some push.
    """
    order = (names.FAILOVER_DETECT, names.FAILOVER_REBUILD, names.FAILOVER_PUSH,
             names.FAILOVER_ACK)
    stages = {name: [s for s in trace if s.name == name] for name in order}
    problems = [f"no {name} span" for name in order if not stages[name]]
    for before, after in zip(order, order[1:], strict=False):
        if not stages[before] or not stages[after]:
            continue
        # A push goes out per node after the rebuild; an ACK follows its node's push.
        # Stages may be per node, so compare each later span with the earliest end
        # of the stage before it.
        earliest_end = min(s.end_ns for s in stages[before])
        for span in stages[after]:
            if span.start_ns + tolerance_ns < earliest_end:
                problems.append(f"{after} starts {(earliest_end - span.start_ns) / 1e6:.1f} ms "
                                f"before {before} ends")
    return problems


@dataclass
class FailoverTimes:
    """What the failover trace of one lost member says, times in Unix nanoseconds."""

    trace_id: str | None = None
    traces: int = 0
    """Failover traces found for the member (one expected)."""
    cause: str | None = None
    start_ns: int | None = None
    converged_ns: int | None = None
    """End of the last ``meshxl.failover.ack``."""
    pushes_ns: list[int] = field(default_factory=list)
    acks_ns: list[int] = field(default_factory=list)
    takeovers_ns: list[int] = field(default_factory=list)
    takeover_ms: list[float] = field(default_factory=list)
    takeover_source: str | None = None
    stage_ms: dict[str, float] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)


def failover_times(spans: Sequence[Any], member: str,
                   since_ns: int | None = None) -> FailoverTimes:
    """The first failover trace of ``member`` (started at or after ``since_ns``, the
    kill, if given: on a loaded machine the sick-member judge may step a slow member's
    share down before it is killed, and that failover did not detect the kill): stages,
    convergence and takeovers."""
    roots = failover_roots(spans, member, since_ns)
    out = FailoverTimes(traces=len(roots))
    if not roots:
        return out
    root = roots[0]
    trace = [s for s in spans if s.trace_id == root.trace_id]
    out.trace_id, out.start_ns = root.trace_id, root.start_ns
    out.cause = root.attributes.get(names.CAUSE)
    acks = [s for s in trace if s.name == names.FAILOVER_ACK]
    out.pushes_ns = sorted(s.start_ns for s in trace if s.name == names.FAILOVER_PUSH)
    out.acks_ns = sorted(s.end_ns for s in acks)
    for name in (names.FAILOVER_DETECT, names.FAILOVER_REBUILD, names.FAILOVER_PUSH,
                 names.FAILOVER_ACK):
        stage = [s for s in trace if s.name == name]
        if stage:
            out.stage_ms[name.rsplit(".", 1)[-1]] = round(
                (max(s.end_ns for s in stage) - min(s.start_ns for s in stage)) / 1e6, 2)
    # Convergence and takeover as the SLO review defines them (one definition).
    (failover,) = [f for f in slo.find_failovers(spans) if f.trace_id == root.trace_id]
    (converged_ms,) = slo.convergence_ms(spans, [failover])
    out.converged_ns = root.start_ns + round(converged_ms * 1e6)
    out.takeover_ms = slo.takeover_ms(spans, [failover])
    joined = [s for s in trace if s.name == names.FAILOVER_TAKEOVER]
    takeovers = joined or [s for s in spans if s.name == names.SESSION_TAKEOVER
                           and failover.contains(s.start_ns)]
    out.takeover_source = ((names.FAILOVER_TAKEOVER if joined else names.SESSION_TAKEOVER)
                           if takeovers else None)
    out.takeovers_ns = sorted(s.start_ns for s in takeovers)
    out.violations = causal_violations(trace)
    return out


def envoy_retry_traces(spans: Iterable[Any]) -> list[str]:
    """Request traces where one of Envoy's upstream attempts failed and a later one succeeded.

    Envoy (``spawn_upstream_span``) records one CLIENT span per upstream attempt under
    its ``ingress`` span; a failed attempt carries ``error`` or a non-2xx
    ``http.status_code`` (0 when no answer came), a retry ``retry.count``.
    """
    attempts: dict[str, list[Any]] = collections.defaultdict(list)
    for s in spans:
        if s.service.startswith("envoy") and s.kind == 3:  # CLIENT: an upstream attempt
            attempts[s.trace_id].append(s)

    def succeeded(span: Any) -> bool:
        return str(span.attributes.get("http.status_code", "")).startswith("2") and \
            span.attributes.get("error") not in ("true", True)

    found = []
    for trace_id, tries in attempts.items():
        tries.sort(key=lambda s: s.start_ns)
        failed_at = [s.end_ns for s in tries if not succeeded(s)]
        if failed_at and any(succeeded(s) and s.start_ns >= min(failed_at) for s in tries):
            found.append(trace_id)
    return sorted(found)


def kill_failover(spans: Sequence[Any], killed: str | None,
                  kill_time: float | None) -> FailoverTimes:
    """The failover that detected a kill (Unix seconds): the killed member's first one at
    or after it (empty without a kill)."""
    if killed is None or kill_time is None:
        return FailoverTimes()
    return failover_times(spans, killed, since_ns=int(kill_time * 1e9))


def build_report(records: Sequence[Record], final: Mapping[str, int | None],
                 spans: Sequence[Any], *, cluster: str, mode: str, members: Sequence[str],
                 sessions: int, duration: float, started: float,
                 kill_time: float | None, killed: str | None,
                 failover: FailoverTimes | None = None) -> dict[str, Any]:
    """The run's report (``report.json``); ``started`` and ``kill_time`` in Unix seconds;
    ``failover``: :func:`kill_failover` of the same spans, if the caller has it."""
    posts = [r for r in records if r.method == "POST"]
    failed = [r for r in posts if not r.ok]
    lost = lost_writes(posts, final)
    report: dict[str, Any] = {
        "mode": mode, "cluster": cluster, "members": list(members), "sessions": sessions,
        "duration_s": duration, "started_unix": started,
        "requests": len(posts), "failed_requests": len(failed),
        "failures": failure_kinds(posts),
        "failure_examples": failure_examples(failed, started),
        "acknowledged_writes": sum(1 for r in posts if r.ok),
        "lost_writes": sum(lost.values()), "lost_sessions": lost,
        "sessions_read_back": sum(1 for v in final.values() if v is not None),
        "per_member_requests": member_counts(posts),
        "killed_member": killed,
        "kill_at_s": None if kill_time is None else round(kill_time - started, 3),
        "kill_time_unix": kill_time,
        "envoy_spans": sum(1 for s in spans if s.service.startswith("envoy")),
        "envoy_retried_requests": len(envoy_retry_traces(spans)),
    }
    if kill_time is None or killed is None:
        report.update(rto_ms=distribution([]), unrecovered_sessions=[], detection_ms=None,
                      convergence_ms=None, takeover_ms=distribution([]), failover={})
        return report
    report["per_member_requests_before_kill"] = member_counts(posts, until=kill_time)
    report["per_member_requests_after_kill"] = member_counts(posts, since=kill_time)
    rto, unrecovered = recovery_times_ms(posts, kill_time, killed)
    kill_ns = int(kill_time * 1e9)
    fo = failover if failover is not None else kill_failover(spans, killed, kill_time)
    earlier = [r for r in failover_roots(spans, killed) if r.start_ns < kill_ns]
    report.update(
        rto_ms=distribution(rto),
        unrecovered_sessions=unrecovered,
        detection_ms=None if fo.start_ns is None else round((fo.start_ns - kill_ns) / 1e6, 1),
        convergence_ms=(None if fo.start_ns is None or fo.converged_ns is None
                        else round((fo.converged_ns - fo.start_ns) / 1e6, 1)),
        takeover_ms=distribution(fo.takeover_ms),
        failover={
            "traces": fo.traces, "trace_id": fo.trace_id, "cause": fo.cause,
            "stages_ms": fo.stage_ms, "pushes": len(fo.pushes_ns), "acks": len(fo.acks_ns),
            "takeovers": len(fo.takeovers_ns), "takeover_spans": fo.takeover_source,
            "causal_order": not fo.violations, "violations": fo.violations,
            "start_unix_ns": fo.start_ns, "converged_unix_ns": fo.converged_ns,
            # The member's failovers before the kill (a share stepped down by the
            # sick-member judge on a loaded machine), not counted as detecting it.
            "before_kill": [r.attributes.get(names.CAUSE) for r in earlier],
        },
    )
    return report



_TWO_CLOCKS = "\n".join((
    "RTO: kill -> its sessions answered by another member (Envoy retried at once).",
    "detection: kill -> failover in the control plane (the member's lease expired).",
    "convergence: failover -> the last Envoy's ACK of the new endpoints.",
    "takeover: how long the new owner's sidecar took to take a session over."))


def print_summary(console: Any, report: Mapping[str, Any], out: Path) -> None:
    """The report as a table on ``console`` (rich), with where its files went; texts
    from outside (failure messages, member names, paths) printed literally."""
    from rich.markup import escape
    from rich.table import Table

    def ms(value: Any) -> str:
        return "-" if value is None else f"{value:.0f} ms"

    rto, takeover = report.get("rto_ms") or {}, report.get("takeover_ms") or {}
    table = Table(title=escape(f"meshxl demo: {report.get('protocol', 'http')} "
                               f"{report['mode']}, kill -9 member "
                               f"{report.get('killed_member')} at {report.get('kill_at_s')} s"),
                  show_header=False)
    table.add_column(style="bold")
    table.add_column()
    failed = report["failed_requests"]
    lost = report["lost_writes"]
    table.add_row("requests", f"{report['requests']} "
                  f"({', '.join(f'{k}: {v}' for k, v in report['per_member_requests'].items())})")
    table.add_row("failed requests", f"[{'red' if failed else 'green'}]{failed}[/]"
                  + (f" {escape(str(report['failures']))}" if failed else ""))
    table.add_row("acknowledged writes", str(report["acknowledged_writes"]))
    table.add_row("lost writes", f"[{'red' if lost else 'green'}]{lost}[/]")
    # Two clocks: the clients recover when Envoy retries a failed request on another
    # member, at once; the control plane detects the loss only when the member's lease
    # in etcd expires. The labels and the note under the table say which is which.
    table.add_row("RTO (clients)",
                  f"p50 {ms(rto.get('p50'))}, p99 {ms(rto.get('p99'))}, "
                  f"max {ms(rto.get('max'))} ({rto.get('count', 0)} sessions)")
    table.add_row("detection (control plane)", ms(report.get("detection_ms")))
    table.add_row("convergence (Envoys)", ms(report.get("convergence_ms")))
    table.add_row("takeover (new owner)",
                  f"p50 {ms(takeover.get('p50'))}, p99 {ms(takeover.get('p99'))} "
                  f"({takeover.get('count', 0)} sessions)")
    streams = report.get("reconnects")
    if streams:  # long-lived connections (WebSocket, TCP, gRPC streams)
        first = streams["kill_to_first_answer_ms"]
        table.add_row("reconnects (kill -> first answer)",
                      f"{streams['of_killed_member']} of the killed member's connections, "
                      f"p50 {ms(first.get('p50'))}, p99 {ms(first.get('p99'))}; state "
                      + ("[green]intact[/]" if streams["state_intact"] else "[red]lost[/]"))
    tallies = report.get("streams")
    if tallies:  # resumable streams beside the requests (meshxl.local.tallies)
        bad = sum(tallies[k] for k in ("lost", "duplicated", "reordered", "misapplied",
                                       "errors"))
        first = tallies.get("kill_to_first_answer_ms") or {}
        table.add_row(
            "resumable streams",
            f"{tallies['streams']} {tallies['kind']} streams, {tallies['sent']} messages: "
            f"[{'red' if bad else 'green'}]lost {tallies['lost']}, duplicated "
            f"{tallies['duplicated']}, reordered {tallies['reordered']}, applied twice "
            f"{tallies['misapplied']}, errors {tallies['errors']}[/]")
        if first.get("n"):
            table.add_row("streams resumed (kill -> first answer)",
                          f"{tallies.get('of_killed_member', 0)} of the killed member's, "
                          f"p50 {ms(first.get('p50'))}, p99 {ms(first.get('p99'))}")
    console.print(table)
    console.print(_TWO_CLOCKS, markup=False, highlight=False)
    console.print(f"report {out / 'report.json'}\ntraces {out / 'traces.jsonl'}",
                  markup=False, highlight=False)
    console.print(f"timeline {report['files']['timeline']}" if "timeline" in report["files"]
                  else "timeline not drawn: it needs matplotlib "
                       f"({install_hint('demo', 'matplotlib')})",
                  markup=False)
    if lost:
        console.print(f"[red]{lost} acknowledged writes were lost[/]")

__all__ = ["FailoverTimes", "Record", "build_report", "busiest_member", "causal_violations",
           "distribution", "envoy_retry_traces", "failover_roots", "failover_times",
           "failure_examples", "failure_kinds", "kill_failover", "last_acknowledged",
           "lost_writes", "member_counts", "print_summary", "recovery_times_ms"]
