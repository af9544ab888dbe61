"""``meshxl demo``: kill -9 a member under session traffic and measure what clients saw.

Everything runs on loopback: etcd (embedded unless ``--etcd``), an OTLP receiver for
Envoy's request spans, the xDS control plane, three members (the sample counter app
:mod:`meshxl.demo.app` plus its statesync sidecar each) and Envoy. Sessions are driven
through Envoy; part-way through, the member serving them is killed (app and sidecar,
SIGKILL). The run then reads every session back and writes, in the output directory:

* ``report.json``: requests, failures, acknowledged and lost writes, recovery time per
  session (RTO), detection, convergence and takeover times from the failover trace;
* ``traces.jsonl``: every process's spans (OTLP JSON lines), one failover trace among
  Envoy's, the apps' and the sidecars' request traces;
* ``timeline.png``: requests per member over time with the failover's events.

The report's computations are pure functions of the request records and the spans
(:func:`build_report` and friends), tested without processes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.util
import json
import math
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape

from meshxl.local.deployment import CLUSTER, MODES, SESSION_HEADER, DemoDeployment
from meshxl.telemetry import names, slo

MEMBER_HEADER = "x-meshxl-member"
REQUEST_INTERVAL = 0.1
"""Pause between one session's requests: 10 requests/s per session."""
BUCKET = 0.1
"""Timeline resolution, seconds."""


# -- records and pure report computations -----------------------------------------------


@dataclass
class Record:
    """One client request through Envoy; times are Unix seconds."""

    sent: float
    ended: float
    session: str
    status: int
    """HTTP status; 0 when no answer came (connection error, timeout)."""
    member: str | None = None
    seq: int | None = None
    method: str = "POST"
    error: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def quantile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated quantile (numpy's default), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def distribution(values_ms: Sequence[float]) -> dict[str, Any]:
    """``{count, p50, p99, max}`` in milliseconds (None when there are no values)."""
    return {"count": len(values_ms), "p50": _ms(quantile(values_ms, 0.5)),
            "p99": _ms(quantile(values_ms, 0.99)),
            "max": _ms(max(values_ms) if values_ms else None)}


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
    the killed member; its RTO runs from the kill to the end of its first success
    that ends after the kill.
    """
    last_before: dict[str, Record] = {}
    first_after: dict[str, Record] = {}
    for r in sorted(records, key=lambda r: r.ended):
        if r.method != "POST" or not r.ok:
            continue
        if r.ended <= kill_time:
            last_before[r.session] = r
        elif r.session not in first_after:
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
    """Successful POSTs per member, optionally those ending in [since, until)."""
    counts: collections.Counter[str] = collections.Counter()
    for r in records:
        if r.method != "POST" or not r.ok or r.member is None:
            continue
        if since is not None and r.ended < since:
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


def _root(span: Any) -> bool:
    return not span.parent_span_id


def failover_roots(spans: Iterable[Any], member: str | None = None) -> list[Any]:
    """Root ``meshxl.failover`` spans, of one lost member if given, oldest first."""
    roots = [s for s in spans if s.name == names.FAILOVER and _root(s)
             and (member is None or s.attributes.get(names.MEMBER) == member)]
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


def failover_times(spans: Sequence[Any], member: str) -> FailoverTimes:
    """The first failover trace of ``member``: stages, convergence and takeovers."""
    roots = failover_roots(spans, member)
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


def build_report(records: Sequence[Record], final: Mapping[str, int | None],
                 spans: Sequence[Any], *, mode: str, members: Sequence[str],
                 sessions: int, duration: float, started: float,
                 kill_time: float | None, killed: str | None) -> dict[str, Any]:
    """The run's report (``report.json``); ``started`` and ``kill_time`` in Unix seconds."""
    posts = [r for r in records if r.method == "POST"]
    failed = [r for r in posts if not r.ok]
    lost = lost_writes(posts, final)
    report: dict[str, Any] = {
        "mode": mode, "cluster": CLUSTER, "members": list(members), "sessions": sessions,
        "duration_s": duration, "started_unix": started,
        "requests": len(posts), "failed_requests": len(failed),
        "failures": failure_kinds(posts),
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
    fo = failover_times(spans, killed)
    kill_ns = int(kill_time * 1e9)
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
        },
    )
    return report


def timeline_series(records: Iterable[Record], started: float, end: float,
                    bucket: float = BUCKET) -> tuple[list[float], dict[str, list[int]],
                                                      list[int]]:
    """Bucket start times (s from ``started``), successes per member, failures per bucket."""
    count = max(1, math.ceil((end - started) / bucket))
    times = [round(i * bucket, 6) for i in range(count)]
    per_member: dict[str, list[int]] = {}
    failures = [0] * count
    for r in records:
        if r.method != "POST":
            continue
        i = min(count - 1, max(0, int((r.ended - started) / bucket)))
        if r.ok and r.member is not None:
            per_member.setdefault(r.member, [0] * count)[i] += 1
        elif not r.ok:
            failures[i] += 1
    return times, dict(sorted(per_member.items())), failures


# -- spans -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _LocalSpan:
    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    service: str
    status_code: int
    kind: int = 0


def _value(v: Mapping[str, Any]) -> Any:
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in v:
            return v[key]
    if "intValue" in v:
        return int(v["intValue"])
    return None


def _parse_spans_locally(paths: Iterable[Path]) -> list[Any]:
    """A small OTLP/JSON lines reader, for when meshxl.telemetry.otlpjson is absent."""
    out: list[Any] = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                continue
            for rs in json.loads(line).get("resourceSpans", []):
                res = {a["key"]: _value(a.get("value", {}))
                       for a in rs.get("resource", {}).get("attributes", [])}
                service = str(res.get("service.name", ""))
                for ss in rs.get("scopeSpans", []):
                    for s in ss.get("spans", []):
                        out.append(_LocalSpan(
                            trace_id=s["traceId"], span_id=s["spanId"],
                            parent_span_id=s.get("parentSpanId") or None, name=s["name"],
                            start_ns=int(s["startTimeUnixNano"]),
                            end_ns=int(s["endTimeUnixNano"]),
                            attributes={a["key"]: _value(a.get("value", {}))
                                        for a in s.get("attributes", [])},
                            service=service,
                            status_code=int(s.get("status", {}).get("code", 0)),
                            kind=int(s.get("kind", 0))))
    return out


def read_spans(paths: Sequence[Path]) -> list[Any]:
    try:
        from meshxl.telemetry.otlpjson import read_spans as read
    except ImportError:
        return _parse_spans_locally(paths)
    return list(read([str(p) for p in paths]))


def merge_traces(trace_dir: Path, target: Path) -> int:
    """Concatenate every ``*.jsonl`` of ``trace_dir`` into ``target``; returns lines."""
    lines = 0
    with target.open("w", encoding="utf-8") as out:
        for path in sorted(trace_dir.glob("*.jsonl")):
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.strip():
                    out.write(line.rstrip() + "\n")
                    lines += 1
    return lines


# -- the timeline picture ----------------------------------------------------------------


def plot_timeline(path: Path, records: Sequence[Record], report: Mapping[str, Any],
                  started: float, end: float) -> None:
    """Requests per member per 100 ms, failures, and the failover's events."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times, per_member, failures = timeline_series(records, started, end)
    fo = report.get("failover") or {}
    kill_s = report.get("kill_at_s")
    events: list[tuple[str, list[float], str, str]] = []
    if fo.get("start_unix_ns"):
        events.append(("failover detected (control plane)",
                       [fo["start_unix_ns"] / 1e9 - started], "tab:orange", "--"))
    spans_at = _event_times(report, started)
    events += [("xDS push", spans_at["pushes"], "tab:blue", ":"),
               ("Envoy ACK", spans_at["acks"], "tab:green", ":"),
               ("session takeover", spans_at["takeovers"], "tab:purple", "-")]

    zoomed = kill_s is not None
    fig, axes = plt.subplots(2 if zoomed else 1, 1, figsize=(12, 8 if zoomed else 4.5),
                             squeeze=False)
    colors = {"a": "tab:blue", "b": "tab:orange", "c": "tab:green"}
    for k, ax in enumerate(axes[:, 0]):
        x = [t + BUCKET / 2 for t in times]
        for member, counts in per_member.items():
            ax.plot(x, counts, label=f"member {member}", color=colors.get(member),
                    linewidth=1.6, drawstyle="steps-mid")
        if any(failures):
            ax.bar(x, failures, width=BUCKET, color="red", label="failed requests",
                   zorder=3)
        if kill_s is not None:
            ax.axvline(kill_s, color="black", linewidth=2,
                       label=f"kill -9 member {report.get('killed_member')}")
        for label, xs, color, style in events:
            for i, ev in enumerate(xs):
                ax.axvline(ev, color=color, linestyle=style,
                           linewidth=0.8 if label == "session takeover" else 1.4,
                           alpha=0.35 if label == "session takeover" else 0.9,
                           label=label if i == 0 else None)
        ax.set_ylabel(f"requests / {int(BUCKET * 1000)} ms")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        if k == 0:
            ax.set_xlim(0, end - started)
            ax.set_title(f"meshxl demo ({report.get('mode')}): {report.get('requests')} "
                         f"requests, {report.get('failed_requests')} failed, "
                         f"{report.get('lost_writes')} lost writes")
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
        else:
            assert kill_s is not None
            last = max([kill_s + 1.0] + [x for _, xs, _, _ in events for x in xs])
            rto_max = (report.get("rto_ms") or {}).get("max") or 0
            last = max(last, kill_s + rto_max / 1000)
            ax.set_xlim(kill_s - 0.5, min(end - started, last + 0.5))
            top = ax.get_ylim()[1]
            marks = [(kill_s, "kill -9")]
            if events and events[0][1]:
                marks.append((events[0][1][0], "control plane: detect, push, ACK "
                              f"({report.get('convergence_ms')} ms)"))
            for i, (x_at, text) in enumerate(marks):
                # The kill's label to the right of its line, the control plane's to the
                # left of its own, so neither runs under the legend.
                ax.annotate(text, (x_at, top), xytext=(4 if i == 0 else -4, -12),
                            textcoords="offset points", fontsize=8,
                            ha="left" if i == 0 else "right", backgroundcolor="white")
            if rto_max:
                ax.axvspan(kill_s, kill_s + rto_max / 1000, color="red", alpha=0.08,
                           label=f"until the last session recovered ({rto_max:.0f} ms)")
                ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
            ax.set_title("around the kill: detection, xDS push, Envoy ACK, takeovers "
                         f"(RTO p99 {(report.get('rto_ms') or {}).get('p99')} ms, "
                         f"convergence {report.get('convergence_ms')} ms)")
    axes[-1, 0].set_xlabel("seconds since traffic started")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _event_times(report: Mapping[str, Any], started: float) -> dict[str, list[float]]:
    fo = report.get("failover") or {}
    out: dict[str, list[float]] = {"pushes": [], "acks": [], "takeovers": []}
    for key in out:
        out[key] = [ns / 1e9 - started for ns in fo.get(f"_{key}_ns", [])]
    return out


# -- the run --------------------------------------------------------------------------


class Traffic:
    """Steady session traffic through Envoy, one request at a time per session."""

    def __init__(self, url: str, sessions: int, until: float, max_requests: int,
                 trace_file: Path | None = None,
                 interval: float = REQUEST_INTERVAL) -> None:
        self.url = url
        self.interval = interval
        self.trace_file = trace_file
        self.sessions = [f"s{i:03d}" for i in range(sessions)]
        self.until = until
        self.max_requests = max_requests
        self.records: list[Record] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self.failures = 0

    async def run(self) -> None:
        import aiohttp
        from opentelemetry.exporter.otlp.json.file.trace_exporter import FileSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        from meshxl.telemetry.http import client_trace_configs

        # The client starts every request's trace (W3C traceparent through Envoy, the
        # app and its sidecar). A provider of this run's own: a process sets its global
        # provider once, and the demo may run several times in one process (tests).
        provider = TracerProvider(resource=Resource.create(
            {"service.name": "meshxl-demo-client", names.COMPONENT: "demo"}))
        if self.trace_file is not None:
            provider.add_span_processor(BatchSpanProcessor(FileSpanExporter(str(self.trace_file)),
                                                           schedule_delay_millis=500))
        timeout = aiohttp.ClientTimeout(total=5.0)
        connector = aiohttp.TCPConnector(limit=len(self.sessions) + 4)
        try:
            async with aiohttp.ClientSession(
                    timeout=timeout, connector=connector,
                    trace_configs=client_trace_configs(tracer_provider=provider)) as http:
                await asyncio.gather(*(self._session(http, s, k)
                                       for k, s in enumerate(self.sessions)))
        finally:
            provider.shutdown()

    async def _session(self, http: Any, session: str, k: int) -> None:
        # Spread the sessions' first requests over one interval.
        await asyncio.sleep(self.interval * k / len(self.sessions))
        while time.time() < self.until and len(self.records) < self.max_requests:
            record = await request(http, self.url, session, "POST")
            self.records.append(record)
            if record.ok and record.member:
                self.counts[record.member] += 1
            else:
                self.failures += 1
            await asyncio.sleep(self.interval)


async def request(http: Any, url: str, session: str, method: str) -> Record:
    import aiohttp

    sent = time.time()
    try:
        async with http.request(method, url, headers={SESSION_HEADER: session}) as resp:
            body = await resp.read()
            member = resp.headers.get(MEMBER_HEADER)
            seq = None
            if resp.status == 200:
                with contextlib.suppress(ValueError, AttributeError, TypeError):
                    seq = int(json.loads(body)["seq"])
            return Record(sent, time.time(), session, resp.status, member, seq, method,
                          "" if resp.status == 200 else body[:200].decode(errors="replace"))
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Record(sent, time.time(), session, 0, None, None, method,
                      type(exc).__name__)


def _progress(traffic: Traffic, started: float, duration: float, killed: str | None) -> Any:
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    elapsed = min(duration, time.time() - started)
    table.add_row("[bold]time[/]", f"{elapsed:5.1f} / {duration:.0f} s",
                  "[bold]requests[/]", str(len(traffic.records)),
                  "[bold]failed[/]", f"[{'red' if traffic.failures else 'green'}]"
                                     f"{traffic.failures}[/]")
    row = []
    for member in sorted(set(traffic.counts) | {"a", "b", "c"}):
        mark = " [red](killed)[/]" if member == killed else ""
        row += [f"[bold]{member}[/]{mark}", str(traffic.counts[member])]
    table.add_row(*row)
    return table


async def read_back(url: str, sessions: Sequence[str]) -> tuple[dict[str, int | None],
                                                                  list[Record]]:
    import aiohttp

    final: dict[str, int | None] = {}
    records: list[Record] = []
    gate = asyncio.Semaphore(16)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0)) as http:
        async def one(session: str) -> None:
            async with gate:
                for _ in range(3):
                    r = await request(http, url, session, "GET")
                    if r.ok:
                        break
                    await asyncio.sleep(0.2)
                records.append(r)
                final[session] = r.seq if r.ok else None
        await asyncio.gather(*(one(s) for s in sessions))
    return final, records


async def _wait_spans_settled(path: Path, quiet: float = 0.6, timeout: float = 5.0) -> None:
    """Until Envoy's span file stops growing for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    def size_of() -> int:
        return path.stat().st_size if path.exists() else 0

    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        size = await asyncio.to_thread(size_of)
        if size != last:
            last, since = size, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        await asyncio.sleep(0.1)


async def run_demo(console: Any, *, mode: str = "high-availability", sessions: int = 40,
                   duration: float = 20.0, output_dir: Path | None = None,
                   etcd_url: str | None = None, kill_at: float | None = None) -> int:
    """Run the failover demo; returns 1 if an acknowledged write was lost, else 0."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if sessions < 1 or duration <= 0:
        raise ValueError("sessions must be >= 1 and duration > 0")
    kill_after = duration * 0.4 if kill_at is None else kill_at
    if not 0 < kill_after < duration:
        raise ValueError(f"kill_at must be inside the run (0 < {kill_after} < {duration})")
    out = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="meshxl-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    traces = out / "traces"
    traces.mkdir(exist_ok=True)
    for old in traces.glob("*.jsonl"):
        old.unlink()
    work = Path(tempfile.mkdtemp(prefix="meshxl-demo-work-"))
    deployment = DemoDeployment(work, mode=mode, etcd_url=etcd_url, trace_dir=traces)
    try:
        with console.status("starting etcd, the control plane, three members and Envoy..."):
            await deployment.start()
        console.print(f"[bold]meshxl demo[/] ({mode}): {sessions} sessions for "
                      f"{duration:g} s through Envoy {escape(deployment.url)}; kill -9 at "
                      f"{kill_after:g} s. Logs in {escape(str(work))}")

        started = time.time()
        traffic = Traffic(f"{deployment.url}/counter", sessions, started + duration,
                          max_requests=int(sessions * (duration / REQUEST_INTERVAL + 10)),
                          trace_file=traces / "client.jsonl")
        killed: str | None = None
        kill_time: float | None = None
        from rich.live import Live

        with Live(_progress(traffic, started, duration, None), console=console,
                  refresh_per_second=5, transient=False) as live:
            load = asyncio.create_task(traffic.run())
            while not load.done():
                if killed is None and time.time() - started >= kill_after:
                    killed = ("a" if mode == "high-availability"
                              else busiest_member(traffic.records) or "a")
                    kill_time = await deployment.kill_member(killed)
                live.update(_progress(traffic, started, duration, killed))
                await asyncio.wait([load], timeout=0.05)
            await load
            live.update(_progress(traffic, started, duration, killed))
        console.print()
        ended = time.time()
        if killed is not None:
            await deployment.reap_member(killed)

        final, readback = await read_back(f"{deployment.url}/counter", traffic.sessions)
        records = traffic.records + readback

        # Stop: the control plane first (so no member's shutdown looks like a
        # failover), Envoy once its spans are out, then the members, gracefully so
        # every process flushes its trace file.
        await deployment.stop_replicas()
        await _wait_spans_settled(traces / "envoy.jsonl")
        await deployment.stop_envoy()
        await deployment.stop_members()
        await deployment.stop_receiver()
        merge_traces(traces, out / "traces.jsonl")
        spans = read_spans([out / "traces.jsonl"])

        report = build_report(records, final, spans, mode=mode,
                              members=[m.name for m in deployment.members],
                              sessions=sessions, duration=duration, started=started,
                              kill_time=kill_time, killed=killed)
        fo = failover_times(spans, killed) if killed else FailoverTimes()
        report["traffic_ended_s"] = round(ended - started, 3)
        report["readback_failed"] = sum(1 for r in readback if not r.ok)
        # The picture needs matplotlib (the `demo` extra); without it the run still counts.
        plotting = importlib.util.find_spec("matplotlib") is not None
        report["files"] = {"report": str(out / "report.json"),
                           "traces": str(out / "traces.jsonl"), "logs": str(work)}
        if plotting:
            report["files"]["timeline"] = str(out / "timeline.png")
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        plot_report = dict(report)
        plot_report["failover"] = {**report.get("failover", {}), "_pushes_ns": fo.pushes_ns,
                                   "_acks_ns": fo.acks_ns, "_takeovers_ns": fo.takeovers_ns}
        if plotting:
            await asyncio.to_thread(plot_timeline, out / "timeline.png", traffic.records,
                                    plot_report, started, max(ended, started + duration))
        print_summary(console, report, out)
        return 1 if report["lost_writes"] else 0
    finally:
        await deployment.close()


def print_summary(console: Any, report: Mapping[str, Any], out: Path) -> None:
    from rich.table import Table

    def ms(value: Any) -> str:
        return "-" if value is None else f"{value:.0f} ms"

    rto, takeover = report.get("rto_ms") or {}, report.get("takeover_ms") or {}
    table = Table(title=escape(f"meshxl demo: {report['mode']}, kill -9 member "
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
    table.add_row("RTO (sessions of the killed member)",
                  f"p50 {ms(rto.get('p50'))}, p99 {ms(rto.get('p99'))}, "
                  f"max {ms(rto.get('max'))} ({rto.get('count', 0)} sessions)")
    table.add_row("detection (kill -> failover trace)", ms(report.get("detection_ms")))
    table.add_row("convergence (failover -> last ACK)", ms(report.get("convergence_ms")))
    table.add_row("takeover", f"p50 {ms(takeover.get('p50'))}, p99 {ms(takeover.get('p99'))} "
                              f"({takeover.get('count', 0)} sessions)")
    console.print(table)
    console.print(f"report {out / 'report.json'}\ntraces {out / 'traces.jsonl'}",
                  markup=False, highlight=False)
    console.print(f"timeline {report['files']['timeline']}" if "timeline" in report["files"]
                  else "timeline not drawn: it needs matplotlib (pip install 'meshxl[demo]')",
                  markup=False)
    if lost:
        console.print(f"[red]{lost} acknowledged writes were lost[/]")


def main(argv: list[str] | None = None) -> int:
    """``python -m meshxl.demo.failover [--mode M] [--sessions N] [--duration S] [DIR]``."""
    import argparse

    from rich.console import Console

    parser = argparse.ArgumentParser(prog="python -m meshxl.demo.failover")
    parser.add_argument("--mode", choices=MODES, default="high-availability")
    parser.add_argument("--sessions", type=int, default=40)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--output-dir", type=Path)
    parser.add_argument("--etcd")
    args = parser.parse_args(argv)
    return asyncio.run(run_demo(Console(), mode=args.mode, sessions=args.sessions,
                                duration=args.duration, output_dir=args.output_dir,
                                etcd_url=args.etcd))


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["CLUSTER", "Record", "Traffic", "build_report", "request", "run_demo"]
