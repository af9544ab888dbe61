"""OTLP JSON lines -> Span values, on lines written by the real FileSpanExporter.

``TraceWriter``, ``failover_trace`` and ``request_trace`` build traces with explicit
timestamps through the OpenTelemetry SDK, so the parser is tested on exactly what
``--trace-file`` writes (test_slo.py reuses them).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.json.file.trace_exporter import FileSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from meshxl.telemetry import names
from meshxl.telemetry.otlpjson import (
    KIND_CLIENT,
    KIND_INTERNAL,
    KIND_SERVER,
    STATUS_ERROR,
    STATUS_UNSET,
    TraceFileError,
    by_trace,
    children,
    parse_line,
    read_spans,
)

T0 = 1_700_000_000_000_000_000
MS = 1_000_000
FIXTURES = Path(__file__).parent / "fixtures" / "traces"


class TraceWriter:
    """Spans with explicit times, exported by FileSpanExporter into one file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._providers: dict[str, TracerProvider] = {}
        self._ends: dict[int, int] = {}

    def tracer(self, service: str, **resource: str) -> trace.Tracer:
        if service not in self._providers:
            provider = TracerProvider(
                resource=Resource.create({"service.name": service, **resource}))
            provider.add_span_processor(SimpleSpanProcessor(FileSpanExporter(self.path)))
            self._providers[service] = provider
        return self._providers[service].get_tracer("meshxl.tests")

    def span(self, service: str, name: str, start_ns: int, end_ns: int, *,
             parent: trace.Span | None = None, kind: SpanKind = SpanKind.INTERNAL,
             attributes: dict[str, Any] | None = None, error: bool = False,
             links: Sequence[trace.Span] = (), resource: dict[str, str] | None = None,
             ) -> trace.Span:
        """Start a span; it is written when ``end(span, end_ns)`` is called."""
        context = trace.set_span_in_context(parent) if parent is not None else None
        span = self.tracer(service, **(resource or {})).start_span(
            name, context=context, kind=kind, attributes=attributes, start_time=start_ns,
            links=[Link(s.get_span_context()) for s in links])
        if error:
            span.set_status(Status(StatusCode.ERROR, "failed"))
        self._ends[id(span)] = end_ns
        return span

    def end(self, *spans: trace.Span, at: int | None = None) -> None:
        """End spans at the time given to ``span()`` (or ``at``): that writes them."""
        for span in spans:
            end_ns = self._ends.pop(id(span))
            span.end(end_time=end_ns if at is None else at)

    def leaf(self, *args: Any, **kwargs: Any) -> trace.Span:
        span = self.span(*args, **kwargs)
        self.end(span)
        return span

    def close(self) -> None:
        for provider in self._providers.values():
            provider.shutdown()


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[TraceWriter]:
    out = TraceWriter(tmp_path / "traces.jsonl")
    yield out
    out.close()


def failover_trace(w: TraceWriter, start_ns: int, *, detect_ms: float = 20,
                   rebuild_ms: float = 5, nodes: Sequence[tuple[float, float]] = ((2, 30), (3, 45)),
                   takeovers_ms: Sequence[float] = (8, 12), member: str = "b1") -> int:
    """A failover trace like the control plane's; returns its convergence in ns.

    ``nodes``: per Envoy node (push ms, ack ms), pushes starting after the rebuild.
    """
    def at(ms: float) -> int:
        return start_ns + round(ms * MS)

    root = w.span("meshxl-xds", names.FAILOVER, start_ns, 0,
                  attributes={names.CLUSTER: "orders", names.MEMBER: member,
                              names.CAUSE: "lease_expired", names.NODES: len(nodes)},
                  resource={names.COMPONENT: "xds"})
    w.leaf("meshxl-xds", names.FAILOVER_DETECT, start_ns, at(detect_ms), parent=root)
    rebuilt = detect_ms + rebuild_ms
    w.leaf("meshxl-xds", names.FAILOVER_REBUILD, at(detect_ms), at(rebuilt), parent=root,
           attributes={names.VERSION: "7"})
    last = rebuilt
    for i, (push, ack) in enumerate(nodes):
        node = {names.NODE: f"envoy-{i}"}
        w.leaf("meshxl-xds", names.FAILOVER_PUSH, at(rebuilt), at(rebuilt + push), parent=root,
               attributes=node)
        w.leaf("meshxl-xds", names.FAILOVER_ACK, at(rebuilt + push), at(rebuilt + push + ack),
               parent=root, attributes=node)
        last = max(last, rebuilt + push + ack)
    for i, took in enumerate(takeovers_ms):
        w.leaf("meshxl-xds", names.FAILOVER_TAKEOVER, at(rebuilt), at(rebuilt + took),
               parent=root, attributes={names.SESSION: f"s{i}", names.PREVIOUS_OWNER: member})
    w.end(root, at=at(last))
    return at(last) - start_ns


def request_trace(w: TraceWriter, start_ns: int, *, fail_ms: float | None = 3,
                  backoff_ms: float = 25, retry_ms: float = 4, retry_ok: bool = True,
                  failure: str = "status", service: str = "envoy-front") -> int | None:
    """An Envoy request: SERVER span, a failed CLIENT attempt, a retry; returns RTO ns.

    ``failure``: how the first attempt failed: ``status`` (503 + error status),
    ``reset`` (no status, response flag UF, string tags as Envoy writes them).
    ``fail_ms=None``: a request whose first attempt succeeds (no RTO).
    """
    def at(ms: float) -> int:
        return start_ns + round(ms * MS)

    proxy = {"component": "proxy"}
    ok = retry_ok or fail_ms is None
    server = w.span(service, "ingress orders", start_ns, 0, kind=SpanKind.SERVER,
                    attributes={**proxy, "http.status_code": "200" if ok else "503",
                                "response_flags": "-" if ok else "URX"},
                    error=not ok)
    begin = 0.5
    if fail_ms is not None:
        if failure == "status":
            attrs = {**proxy, "http.status_code": 503, "upstream_address": "127.0.0.1:8081"}
            w.leaf(service, "router orders egress", at(begin), at(begin + fail_ms),
                   parent=server, kind=SpanKind.CLIENT, attributes=attrs, error=True)
        else:
            attrs = {**proxy, "upstream_address": "127.0.0.1:8081", "response_flags": "UF"}
            w.leaf(service, "router orders egress", at(begin), at(begin + fail_ms),
                   parent=server, kind=SpanKind.CLIENT, attributes=attrs)
        retry_start = begin + fail_ms + backoff_ms
    else:
        retry_start = begin
    retry_end = retry_start + retry_ms
    w.leaf(service, "router orders egress", at(retry_start), at(retry_end), parent=server,
           kind=SpanKind.CLIENT, error=not retry_ok,
           attributes={**proxy, "http.status_code": "200" if retry_ok else "503",
                       "response_flags": "-" if retry_ok else "UF",
                       "upstream_address": "127.0.0.1:8082"})
    w.end(server, at=at(retry_end + 0.5))
    if fail_ms is None:
        return None
    return at(retry_end) - at(begin) if retry_ok else None


# -- the parser -------------------------------------------------------------------------------

def test_parses_what_the_file_exporter_writes(writer: TraceWriter) -> None:
    root = writer.span("meshxl-xds", names.FAILOVER, T0, T0 + 40 * MS,
                       attributes={names.NODES: 2, "ratio": 0.5, "ok": True,
                                   "list": ["a", "b"]},
                       resource={names.COMPONENT: "xds"})
    child = writer.span("meshxl-xds", names.FAILOVER_ACK, T0 + 10 * MS, T0 + 30 * MS,
                        parent=root, kind=SpanKind.CLIENT, error=True, links=[root])
    child.add_event("nack", {"reason": "bad"}, timestamp=T0 + 20 * MS)
    writer.end(child, root)

    spans = read_spans([str(writer.path)])

    assert [s.name for s in spans] == [names.FAILOVER_ACK, names.FAILOVER]
    ack, parsed_root = spans
    assert parsed_root.parent_span_id is None
    assert parsed_root.kind == KIND_INTERNAL
    assert parsed_root.trace_id == format(root.get_span_context().trace_id, "032x")
    assert parsed_root.span_id == format(root.get_span_context().span_id, "016x")
    assert parsed_root.attributes == {names.NODES: 2, "ratio": 0.5, "ok": True,
                                      "list": ["a", "b"]}
    assert parsed_root.service == "meshxl-xds"
    assert parsed_root.resource[names.COMPONENT] == "xds"
    assert parsed_root.status_code == STATUS_UNSET
    assert parsed_root.duration_ms == 40.0
    assert parsed_root.start_s == T0 / 1e9
    assert ack.parent_span_id == parsed_root.span_id
    assert ack.kind == KIND_CLIENT
    assert ack.status_code == STATUS_ERROR and ack.status_message == "failed"
    assert ack.links == ((parsed_root.trace_id, parsed_root.span_id),)
    assert ack.events == (("nack", T0 + 20 * MS, {"reason": "bad"}),)
    assert ack.start_ns == T0 + 10 * MS and ack.end_ns == T0 + 30 * MS


def test_groups_by_trace_and_parent(writer: TraceWriter) -> None:
    failover_trace(writer, T0)
    request_trace(writer, T0 + 100 * MS)
    spans = read_spans([str(writer.path)])

    traces = by_trace(spans)

    assert len(traces) == 2
    failover, request = traces.values()
    assert failover[0].name == names.FAILOVER  # sorted by start: root first
    tree = children(failover)
    assert sorted(s.name for s in tree[failover[0].span_id]) == sorted(
        [names.FAILOVER_DETECT, names.FAILOVER_REBUILD] + [names.FAILOVER_PUSH] * 2
        + [names.FAILOVER_ACK] * 2 + [names.FAILOVER_TAKEOVER] * 2)
    server = next(s for s in request if s.kind == KIND_SERVER)
    assert [s.kind for s in children(request)[server.span_id]] == [KIND_CLIENT, KIND_CLIENT]


def test_a_span_seen_twice_is_kept_once(writer: TraceWriter) -> None:
    failover_trace(writer, T0)
    once = read_spans([str(writer.path)])
    twice = read_spans([str(writer.path), str(writer.path)])
    assert len(twice) == len(once) == 9


def test_blank_lines_and_enum_names_are_accepted() -> None:
    assert parse_line("  \n") == []
    line = json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [{
        "traceId": "AB" * 16, "spanId": "cd" * 8, "parentSpanId": "", "name": "x",
        "kind": "SPAN_KIND_SERVER", "startTimeUnixNano": 5, "endTimeUnixNano": "7",
        "status": {"code": "STATUS_CODE_ERROR"}}]}]}]})
    (span,) = parse_line(line)
    assert span.trace_id == "ab" * 16  # normalized to lower case
    assert span.parent_span_id is None
    assert span.kind == KIND_SERVER and span.status_code == STATUS_ERROR
    assert span.service == "" and span.start_ns == 5


def _line(**span_fields: Any) -> str:
    span = {"traceId": "0af7651916cd43dd8448eb211c80319c", "spanId": "b7ad6b7169203331",
            "name": "s", "kind": 1, "startTimeUnixNano": "1", "endTimeUnixNano": "2"}
    span.update(span_fields)
    return json.dumps({"resourceSpans": [{"resource": {"attributes": []},
                                          "scopeSpans": [{"spans": [span]}]}]})


@pytest.mark.parametrize(("line", "expected"), [
    ("{not json", "invalid JSON"),
    ("[]", "expected a JSON object"),
    ('{"resourceLogs": []}', "no resourceSpans"),
    (_line(traceId="CvdlGRbNQ92ESOshHIAxnA=="), "traceId: expected 32 hex digits"),
    (_line(spanId="t61rcWkgMzE="), "spanId: expected 16 hex digits"),
    (_line(parentSpanId="xyz"), "parentSpanId: expected 16 hex digits"),
    (_line(traceId="0" * 32), "all-zero"),
    (_line(startTimeUnixNano="soon"), "startTimeUnixNano: expected a decimal integer"),
    (_line(endTimeUnixNano=None), "endTimeUnixNano: expected a decimal integer"),
    (_line(startTimeUnixNano="9"), "ends (2) before it starts (9)"),
    (_line(kind=9), "kind: unknown value 9"),
    (_line(name=""), "name: expected a non-empty string"),
    (_line(attributes=[{"key": "k", "value": {"intValue": "x"}}]),
     "attributes[0].value.intValue: expected a decimal integer"),
    (_line(attributes=[{"key": "k", "value": {"weird": 1}}]), "unknown value type"),
    (_line(status={"code": 7}), "status.code: unknown value 7"),
])
def test_bad_lines_name_file_line_and_field(line: str, expected: str) -> None:
    with pytest.raises(TraceFileError) as caught:
        parse_line(line, "t.jsonl", 7)
    message = str(caught.value)
    assert message.startswith("t.jsonl:7: ")
    assert expected in message
    assert "\n" not in message


def test_bad_line_in_a_file_names_its_line(writer: TraceWriter) -> None:
    failover_trace(writer, T0)
    with writer.path.open("a") as file:
        file.write('{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "x"}]}]}]}\n')
    with pytest.raises(TraceFileError) as caught:
        read_spans([str(writer.path)])
    assert str(caught.value).startswith(f"{writer.path}:10: resourceSpans[0].scopeSpans[0]"
                                        ".spans[0].traceId: expected 32 hex digits")


def test_missing_file_is_a_trace_file_error(tmp_path: Path) -> None:
    with pytest.raises(TraceFileError, match=r"nope\.jsonl: cannot read"):
        read_spans([str(tmp_path / "nope.jsonl")])


def test_committed_fixtures_parse() -> None:
    files = sorted(FIXTURES.glob("*.jsonl"))
    assert files
    for path in files:
        spans = read_spans([str(path)])
        assert any(s.name == names.FAILOVER for s in spans), path
