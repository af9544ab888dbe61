"""Spans from OTLP/JSON lines files, as plain frozen values.

The SLO review reads what ``--trace-file`` (opentelemetry-exporter-otlp-json-file's
``FileSpanExporter``) and the OpenTelemetry Collector's ``file`` exporter write: one
``ExportTraceServiceRequest`` in OTLP/JSON per line. Parsing is pure (``parse_line``)
so it is tested without files; ``read_spans`` and ``merge_traces`` (many processes'
files into one) are the only parts that touch the disk.

The input is checked rather than trusted, because a review that silently skips a span
reports a better SLO than the one that was delivered: every problem raises
``TraceFileError`` naming the file, the line and the JSON path of the bad field. Ids
must be hex as OTLP/JSON specifies (the protobuf JSON mapping's base64 is rejected, not
guessed at). Blank lines are allowed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshxl.errors import InputError

__all__ = [
    "KIND_CLIENT",
    "KIND_CONSUMER",
    "KIND_INTERNAL",
    "KIND_PRODUCER",
    "KIND_SERVER",
    "KIND_UNSPECIFIED",
    "STATUS_ERROR",
    "STATUS_OK",
    "STATUS_UNSET",
    "Span",
    "TraceFileError",
    "by_trace",
    "children",
    "merge_traces",
    "parse_line",
    "read_spans",
]

# SpanKind and StatusCode as numbered in opentelemetry/proto/trace/v1/trace.proto.
KIND_UNSPECIFIED, KIND_INTERNAL, KIND_SERVER, KIND_CLIENT, KIND_PRODUCER, KIND_CONSUMER = range(6)
STATUS_UNSET, STATUS_OK, STATUS_ERROR = range(3)

# The protobuf JSON mapping also allows enum names; accept them for files written by
# other exporters.
_KIND_NAMES = {
    "SPAN_KIND_UNSPECIFIED": KIND_UNSPECIFIED,
    "SPAN_KIND_INTERNAL": KIND_INTERNAL,
    "SPAN_KIND_SERVER": KIND_SERVER,
    "SPAN_KIND_CLIENT": KIND_CLIENT,
    "SPAN_KIND_PRODUCER": KIND_PRODUCER,
    "SPAN_KIND_CONSUMER": KIND_CONSUMER,
}
_STATUS_NAMES = {
    "STATUS_CODE_UNSET": STATUS_UNSET,
    "STATUS_CODE_OK": STATUS_OK,
    "STATUS_CODE_ERROR": STATUS_ERROR,
}
_TRACE_ID = re.compile(r"[0-9a-fA-F]{32}")
_SPAN_ID = re.compile(r"[0-9a-fA-F]{16}")


class TraceFileError(InputError):
    """A trace file that cannot be read or does not hold valid OTLP/JSON spans.

    ``str()`` is ``"{path}:{line}: {message}"`` (``"{path}: {message}"`` when the
    whole file is the problem, e.g. it cannot be opened), the form editors jump to.
    """

    def __init__(self, path: str, line: int | None, message: str) -> None:
        self.path = path
        self.line = line
        self.message = message
        where = path if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Span:
    """One finished span, with OTLP's wrapped values unwrapped to Python values.

    Ids are lower-case hex; ``parent_span_id`` is None for a root span. Not hashable
    (attributes are dicts); key spans by ``(trace_id, span_id)``.
    """

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    service: str
    status_code: int
    status_message: str
    links: tuple[tuple[str, str], ...] = ()
    events: tuple[tuple[str, int, dict[str, Any]], ...] = ()

    @property
    def duration_ms(self) -> float:
        """End minus start, in milliseconds (SLO thresholds are written in ms)."""
        return (self.end_ns - self.start_ns) / 1e6

    @property
    def start_s(self) -> float:
        """Start as Unix seconds, for display."""
        return self.start_ns / 1e9


class _Bad(Exception):
    """A problem at a JSON path inside one line; becomes a TraceFileError."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}" if where else message)


def _obj(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _Bad(where, f"expected a JSON object, got {type(value).__name__}")
    return value


def _list(parent: Mapping[str, Any], key: str, where: str) -> list[Any]:
    """An optional repeated field: absent or null means empty (proto3 JSON)."""
    value = parent.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Bad(f"{where}.{key}" if where else key,
                   f"expected a JSON array, got {type(value).__name__}")
    return value


def _hex_id(value: Any, where: str, pattern: re.Pattern[str], digits: int) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise _Bad(where, f"expected {digits} hex digits, got {value!r}")
    if set(value) == {"0"}:
        raise _Bad(where, "an all-zero id is invalid")
    return value.lower()


def _uint64(value: Any, where: str, *, required: bool) -> int:
    """A fixed64 field: a decimal string in OTLP/JSON; a JSON number is tolerated."""
    if value is None and not required:
        return 0
    if isinstance(value, bool):
        raise _Bad(where, f"expected a decimal integer, got {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.isdigit():
        number = int(value)
    else:
        raise _Bad(where, f"expected a decimal integer, got {value!r}")
    if number < 0 or number >= 1 << 64:
        raise _Bad(where, f"out of range: {value!r}")
    return number


def _enum(value: Any, where: str, names: Mapping[str, int], limit: int) -> int:
    if value is None:
        return 0
    if isinstance(value, str) and value in names:
        return names[value]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < limit:
        return value
    raise _Bad(where, f"unknown value {value!r}")


def _any_value(value: Any, where: str) -> Any:
    """Unwrap an OTLP ``AnyValue``: ``{"stringValue": "x"}`` -> ``"x"`` and so on."""
    wrapped = _obj(value, where)
    if not wrapped:
        return None
    if len(wrapped) != 1:
        raise _Bad(where, f"expected one value field, got {sorted(wrapped)}")
    ((kind, inner),) = wrapped.items()
    here = f"{where}.{kind}"
    if kind == "stringValue":
        if not isinstance(inner, str):
            raise _Bad(here, f"expected a string, got {inner!r}")
        return inner
    if kind == "boolValue":
        if not isinstance(inner, bool):
            raise _Bad(here, f"expected true or false, got {inner!r}")
        return inner
    if kind == "intValue":  # int64: a decimal string in OTLP/JSON
        if isinstance(inner, int) and not isinstance(inner, bool):
            return inner
        if isinstance(inner, str) and re.fullmatch(r"-?[0-9]+", inner):
            return int(inner)
        raise _Bad(here, f"expected a decimal integer, got {inner!r}")
    if kind == "doubleValue":
        if isinstance(inner, (int, float)) and not isinstance(inner, bool):
            return float(inner)
        if inner in ("NaN", "Infinity", "-Infinity"):
            return float(inner.replace("Infinity", "inf"))
        raise _Bad(here, f"expected a number, got {inner!r}")
    if kind == "bytesValue":  # base64 here is the OTLP/JSON encoding: keep the text
        if not isinstance(inner, str):
            raise _Bad(here, f"expected a base64 string, got {inner!r}")
        return inner
    if kind == "arrayValue":
        values = _list(_obj(inner, here), "values", here)
        return [_any_value(v, f"{here}.values[{i}]") for i, v in enumerate(values)]
    if kind == "kvlistValue":
        return _attributes(_obj(inner, here), "values", here)
    raise _Bad(here, "unknown value type")


def _attributes(parent: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    """A ``repeated KeyValue`` as a dict (a repeated key: the last one wins)."""
    out: dict[str, Any] = {}
    for i, item in enumerate(_list(parent, key, where)):
        here = f"{where}.{key}[{i}]" if where else f"{key}[{i}]"
        pair = _obj(item, here)
        name = pair.get("key")
        if not isinstance(name, str):
            raise _Bad(f"{here}.key", f"expected a string, got {name!r}")
        out[name] = _any_value(pair.get("value", {}), f"{here}.value")
    return out


def _span(raw: Any, where: str, resource: dict[str, Any], service: str) -> Span:
    span = _obj(raw, where)
    trace_id = _hex_id(span.get("traceId"), f"{where}.traceId", _TRACE_ID, 32)
    span_id = _hex_id(span.get("spanId"), f"{where}.spanId", _SPAN_ID, 16)
    parent_raw = span.get("parentSpanId")
    parent = (None if parent_raw in (None, "")
              else _hex_id(parent_raw, f"{where}.parentSpanId", _SPAN_ID, 16))
    name = span.get("name")
    if not isinstance(name, str) or not name:
        raise _Bad(f"{where}.name", f"expected a non-empty string, got {name!r}")
    start = _uint64(span.get("startTimeUnixNano"), f"{where}.startTimeUnixNano", required=True)
    end = _uint64(span.get("endTimeUnixNano"), f"{where}.endTimeUnixNano", required=True)
    if end < start:
        raise _Bad(f"{where}.endTimeUnixNano", f"ends ({end}) before it starts ({start})")
    status = _obj(span.get("status") or {}, f"{where}.status")
    code = _enum(status.get("code"), f"{where}.status.code", _STATUS_NAMES, 3)
    message = status.get("message") or ""
    if not isinstance(message, str):
        raise _Bad(f"{where}.status.message", f"expected a string, got {message!r}")
    links = []
    for i, item in enumerate(_list(span, "links", where)):
        here = f"{where}.links[{i}]"
        link = _obj(item, here)
        links.append((_hex_id(link.get("traceId"), f"{here}.traceId", _TRACE_ID, 32),
                      _hex_id(link.get("spanId"), f"{here}.spanId", _SPAN_ID, 16)))
    events = []
    for i, item in enumerate(_list(span, "events", where)):
        here = f"{where}.events[{i}]"
        event = _obj(item, here)
        event_name = event.get("name", "")
        if not isinstance(event_name, str):
            raise _Bad(f"{here}.name", f"expected a string, got {event_name!r}")
        events.append((event_name,
                       _uint64(event.get("timeUnixNano"), f"{here}.timeUnixNano", required=False),
                       _attributes(event, "attributes", here)))
    return Span(
        trace_id=trace_id,
        span_id=span_id,
        parent_span_id=parent,
        name=name,
        kind=_enum(span.get("kind"), f"{where}.kind", _KIND_NAMES, 6),
        start_ns=start,
        end_ns=end,
        attributes=_attributes(span, "attributes", where),
        resource=resource,
        service=service,
        status_code=code,
        status_message=message,
        links=tuple(links),
        events=tuple(events),
    )


def _request(document: Any) -> list[Span]:
    out: list[Span] = []
    request = _obj(document, "")
    if "resourceSpans" not in request:
        raise _Bad("", "not an OTLP ExportTraceServiceRequest: no resourceSpans")
    for r, item in enumerate(_list(request, "resourceSpans", "")):
        here = f"resourceSpans[{r}]"
        resource_spans = _obj(item, here)
        resource = _attributes(_obj(resource_spans.get("resource") or {}, f"{here}.resource"),
                               "attributes", f"{here}.resource")
        service = resource.get("service.name")
        service = service if isinstance(service, str) else ""
        for s, scope_item in enumerate(_list(resource_spans, "scopeSpans", here)):
            scope_here = f"{here}.scopeSpans[{s}]"
            scope_spans = _obj(scope_item, scope_here)
            for i, raw in enumerate(_list(scope_spans, "spans", scope_here)):
                out.append(_span(raw, f"{scope_here}.spans[{i}]", resource, service))
    return out


def parse_line(text: str, source: str = "file", line: int = 1) -> list[Span]:
    """The spans of one OTLP/JSON line (none for a blank line).

    Raises ``TraceFileError(source, line, ...)`` naming the JSON path of the problem.
    """
    if not text.strip():
        return []
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise TraceFileError(source, line, f"invalid JSON: {error.msg} "
                             f"(column {error.colno})") from None
    except RecursionError:
        raise TraceFileError(source, line, "invalid JSON: nested too deeply") from None
    try:
        return _request(document)
    except _Bad as bad:
        raise TraceFileError(source, line, str(bad)) from None


MAX_TRACE_LINE = 64 * 1024 * 1024
"""Longest line of a trace file, in characters (one export request; the receiver
accepts requests of up to 32 MiB of protobuf)."""
MAX_TRACE_BYTES = 1024 * 1024 * 1024
"""Most characters read from all trace files of one review together."""
MAX_SPANS = 1_000_000
"""Most spans one review reads (distinct spans, after duplicates are dropped)."""


def read_spans(paths: Iterable[str], *, max_line: int = MAX_TRACE_LINE,
               max_total: int = MAX_TRACE_BYTES, max_spans: int = MAX_SPANS) -> list[Span]:
    """Every span of every file, in file order, within the limits (a file past one is
    a ``TraceFileError`` naming the limit: split the files or narrow the time range).

    A span seen twice (same trace and span id: a file given twice, an exporter that
    retried) is kept once, so it is not counted twice by the SLO review.
    """
    spans: list[Span] = []
    seen: set[tuple[str, str]] = set()
    total = 0
    for path in paths:
        try:
            with open(path, encoding="utf-8") as file:
                number = 0
                while text := file.readline(max_line + 1):
                    number += 1
                    if len(text) > max_line:
                        raise TraceFileError(path, number, f"line longer than {max_line:,} "
                                             "characters")
                    total += len(text)
                    if total > max_total:
                        raise TraceFileError(path, number, "the trace files hold more than "
                                             f"{max_total:,} characters")
                    for span in parse_line(text, path, number):
                        key = (span.trace_id, span.span_id)
                        if key not in seen:
                            seen.add(key)
                            spans.append(span)
                    if len(spans) > max_spans:
                        raise TraceFileError(path, number, f"more than {max_spans:,} spans "
                                             "to review")
        except UnicodeDecodeError as error:
            raise TraceFileError(path, None, f"not UTF-8 text: {error.reason}") from None
        except OSError as error:
            raise TraceFileError(path, None, f"cannot read: {error.strerror or error}") from None
    return spans


def _start_order(span: Span) -> tuple[int, int]:
    """By start; on a tie the longer span (the enclosing parent) first."""
    return span.start_ns, -span.end_ns


def by_trace(spans: Iterable[Span]) -> dict[str, list[Span]]:
    """Spans grouped by trace id (traces in first-seen order), each sorted by start
    (a parent before the child that starts with it)."""
    traces: dict[str, list[Span]] = {}
    for span in spans:
        traces.setdefault(span.trace_id, []).append(span)
    for members in traces.values():
        members.sort(key=_start_order)
    return traces


def children(spans: Sequence[Span]) -> dict[str, list[Span]]:
    """Parent span id -> its child spans in ``spans``, each list sorted by start.

    Keys are span ids only: call it on one trace's spans (``by_trace``) when span ids
    might repeat across traces.
    """
    out: dict[str, list[Span]] = {}
    for span in spans:
        if span.parent_span_id is not None:
            out.setdefault(span.parent_span_id, []).append(span)
    for members in out.values():
        members.sort(key=_start_order)
    return out


def merge_traces(trace_dir: Path, target: Path) -> int:
    """Concatenate every ``*.jsonl`` of ``trace_dir`` into ``target``; returns lines.

    One file per process (each its own exporter) becomes the run's one trace file;
    blank lines are dropped, bytes that are not UTF-8 replaced (``read_spans`` then
    names the line). A file's last line without its newline is dropped too: exporters
    write whole lines, so it is a write a killed process (``kill -9`` of a member) left
    unfinished, not a span to read.
    """
    lines = 0
    with target.open("w", encoding="utf-8") as out:
        for path in sorted(trace_dir.glob("*.jsonl")):
            text = path.read_text(encoding="utf-8", errors="replace")
            for line in text[:text.rfind("\n") + 1].splitlines():
                if line.strip():
                    out.write(line.rstrip() + "\n")
                    lines += 1
    return lines
