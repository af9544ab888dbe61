"""The trace-based SLO review: failover traces + Envoy request traces -> verdicts.

Objectives are OpenSLO v1 ``SLO`` documents (``deploy/slo/failover.yaml``) whose
indicator names one of the SLIs below with a metric source of type ``meshxl-traces``;
they are evaluated with the ``Occurrences`` budgeting method over spans read from OTLP
JSON lines files. Everything here is pure, so the numbers are tested on synthetic
traces without processes; ``meshxl slo review`` (:mod:`meshxl.cli.telemetry`) reads
the files and prints the report.

Failovers and windows
    A failover is a ``meshxl.failover`` span (the root of a failover trace). Its window
    is ``[root start - window_before, root end + window_after]`` (defaults 5 s and 1 s):
    the time before detection holds the kill and the requests that hit the dead
    member before anyone noticed.

SLIs (one *occurrence* per value; the ratio SLI counts requests)
    ``convergence_ms``
        Per failover: from the root's start (detection) to the end of the last
        ``meshxl.failover.ack`` span of its trace, whatever that ACK's status (a NACK
        also ends that node's push; it shows in the trace). A failover without ACK
        spans (no Envoy connected) converges at the root's end.
    ``takeover_ms``
        The duration of every ``meshxl.failover.takeover`` span of a failover trace;
        for a failover trace without any, the duration of every
        ``meshxl.session.takeover`` span (in any trace) that starts inside its window.
        A span is counted once even if windows overlap.
    ``rto_ms`` (data-plane recovery time)
        Per request trace (a trace without a ``meshxl.failover`` span) whose first
        failed upstream attempt starts inside a failover window: from that attempt's
        start to the end of the first successful attempt that starts after it. A
        trace with no successful attempt after the failure did not recover: its
        value is infinite (a bad occurrence for ``lt``/``lte``, shown as ``inf`` in
        the table and ``null`` in JSON).
    ``request_success_ratio``
        Proxy ``SERVER`` spans (downstream requests) starting inside a failover
        window: total = all of them, good = those that did not fail.

What counts as Envoy's spans
    A *proxy span* is one whose resource ``service.name`` starts with ``envoy``
    (case-insensitive), or whose resource ``meshxl.component`` is ``envoy``, or
    whose attribute ``component`` is ``proxy`` (the tag Envoy puts on its spans).
    *Upstream attempts* are the proxy ``CLIENT`` spans of a trace (Envoy's
    ``spawn_upstream_span``: one per attempt); a trace without any falls back to its
    proxy ``SERVER`` spans, so a client's own retries in one trace still count.

What counts as failed
    A span failed when its status code is ERROR, or its HTTP status
    (``http.response.status_code`` or ``http.status_code``) is >= 500, or its
    ``error`` attribute is true (bool, or the string ``"true"`` Envoy writes). For
    upstream attempts, also when ``upstream.reset`` / ``upstream_reset`` is set, or
    ``response_flags`` / ``envoy.response_flags`` is set to something other than
    ``-`` or empty (``-`` is Envoy's "no flags"). Downstream spans ignore response
    flags: a request retried to success may carry the flag of its first attempt.
    Anything else (including no HTTP status at all) succeeded.

Budget (Occurrences)
    good/total per objective; met when ``total == 0`` or ``good/total >= target``.
    ``burn_rate = (bad/total) / (1 - target)`` (0 when total is 0);
    ``budget_remaining = 1 - burn_rate`` (1.0 when total is 0; negative when
    overspent). With ``target == 1`` there is no budget: no bad occurrence gives
    remaining 1.0 and burn 0.0, any bad one gives remaining 0.0 and an infinite burn
    rate, reported as ``null`` in JSON (which has no infinity) and ``inf`` in the
    table. Percentiles are nearest-rank over the SLI values (``meshxl.stats.quantile``,
    the definition of every meshxl report; None for the ratio SLI and when there are no
    values).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from meshxl.bounded import load_yaml_all, read_text
from meshxl.errors import InputError
from meshxl.stats import quantile

from .otlpjson import Span
from .sli import Failover, convergence_ms, find_failovers, request_counts, rto_ms, takeover_ms

__all__ = [
    "METRIC_SOURCE_TYPE",
    "RATIO_SLIS",
    "THRESHOLD_SLIS",
    "Failover",
    "Objective",
    "ObjectiveResult",
    "Report",
    "SloError",
    "convergence_ms",
    "find_failovers",
    "format_number",
    "load_slos",
    "parse_slo_documents",
    "report_to_json",
    "request_counts",
    "review",
    "rto_ms",
    "takeover_ms",
]

METRIC_SOURCE_TYPE = "meshxl-traces"
THRESHOLD_SLIS = ("convergence_ms", "takeover_ms", "rto_ms")
RATIO_SLIS = ("request_success_ratio",)
OUTPUTS = ("table", "json")

_OPS: dict[str, Callable[[float, float], bool]] = {
    "lt": operator.lt, "lte": operator.le, "gt": operator.gt, "gte": operator.ge,
}
_OP_TEXT = {"lt": "<", "lte": "<=", "gt": ">", "gte": ">="}


# -- objectives -----------------------------------------------------------------------------

class SloError(InputError):
    """A bad SLO document; ``str()`` names the file and the field."""

    def __init__(self, path: str, field: str, message: str) -> None:
        self.path = path
        self.field = field
        self.message = message
        super().__init__(f"{path}: {field}: {message}" if field else f"{path}: {message}")


@dataclass(frozen=True)
class Objective:
    """One objective of one OpenSLO ``SLO``: ``op``/``threshold`` are None for ratios."""

    name: str
    display_name: str
    sli: str
    target: float
    op: str | None = None
    threshold: float | None = None
    source: str = ""

    def describe(self) -> str:
        """``convergence_ms < 1000`` / ``request_success_ratio``, for the table."""
        if self.op is None:
            return self.sli
        return f"{self.sli} {_OP_TEXT[self.op]} {format_number(self.threshold)}"


def format_number(value: float | None) -> str:
    """A figure as the review prints it: "-" for none, "inf", no trailing zeros."""
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:g}" if value == int(value) else f"{value:.3f}".rstrip("0")


def _get(node: Mapping[str, Any], key: str, where: str, path: str, kind: type | tuple[type, ...],
         *, required: bool = True) -> Any:
    field = f"{where}.{key}" if where else key
    if key not in node or node[key] is None:
        if required:
            raise SloError(path, field, "missing")
        return None
    value = node[key]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise SloError(path, field, f"expected {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise SloError(path, field, f"expected {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    words = {dict: "a mapping", list: "a list", str: "a string", int: "a number",
             float: "a number"}
    return " or ".join(dict.fromkeys(words.get(k, k.__name__) for k in kinds))


def _metric_sli(source: Mapping[str, Any], where: str, path: str) -> str:
    """The SLI a ``metricSource`` names: ``{type: meshxl-traces, spec: {sli: NAME}}``."""
    metric = _get(source, "metricSource", where, path, dict)
    here = f"{where}.metricSource"
    kind = _get(metric, "type", here, path, str)
    if kind != METRIC_SOURCE_TYPE:
        raise SloError(path, f"{here}.type",
                       f"unsupported metric source {kind!r} (this review reads "
                       f"{METRIC_SOURCE_TYPE!r})")
    spec = _get(metric, "spec", here, path, dict)
    sli: str = _get(spec, "sli", f"{here}.spec", path, str)
    return sli


def _objectives(document: Mapping[str, Any], index: int, path: str) -> list[Objective]:
    where = f"document {index + 1}"
    api = document.get("apiVersion")
    if api != "openslo/v1":
        raise SloError(path, f"{where}: apiVersion",
                       f"expected 'openslo/v1', got {api!r}")
    if document.get("kind") != "SLO":
        raise SloError(path, f"{where}: kind", f"expected 'SLO', got {document.get('kind')!r}")
    try:
        metadata = _get(document, "metadata", "", path, dict)
        name: str = _get(metadata, "name", "metadata", path, str)
    except SloError as error:
        raise SloError(path, f"{where}: {error.field}", error.message) from None
    try:
        return _objective_list(document, name, path)
    except SloError as error:
        raise SloError(path, f"SLO {name!r}: {error.field}", error.message) from None


def _objective_list(document: Mapping[str, Any], name: str, path: str) -> list[Objective]:
    spec = _get(document, "spec", "", path, dict)
    if "indicatorRef" in spec and "indicator" not in spec:
        raise SloError(path, "spec.indicatorRef",
                       "not supported: write the indicator inline as spec.indicator")
    indicator = _get(spec, "indicator", "spec", path, dict)
    indicator_spec = _get(indicator, "spec", "spec.indicator", path, dict)
    here = "spec.indicator.spec"
    if "thresholdMetric" in indicator_spec:
        threshold = _get(indicator_spec, "thresholdMetric", here, path, dict)
        sli = _metric_sli(threshold, f"{here}.thresholdMetric", path)
        sli_field = f"{here}.thresholdMetric.metricSource.spec.sli"
        if sli not in THRESHOLD_SLIS:
            raise SloError(path, f"{sli_field}",
                           f"unknown threshold SLI {sli!r}; one of {', '.join(THRESHOLD_SLIS)}")
        ratio = False
    elif "ratioMetric" in indicator_spec:
        metric = _get(indicator_spec, "ratioMetric", here, path, dict)
        good = _metric_sli(_get(metric, "good", f"{here}.ratioMetric", path, dict),
                           f"{here}.ratioMetric.good", path)
        total = _metric_sli(_get(metric, "total", f"{here}.ratioMetric", path, dict),
                            f"{here}.ratioMetric.total", path)
        sli_field = f"{here}.ratioMetric.good.metricSource.spec.sli"
        if good not in RATIO_SLIS:
            raise SloError(path, f"{sli_field}",
                           f"unknown ratio SLI {good!r}; one of {', '.join(RATIO_SLIS)}")
        if total != good:
            raise SloError(path, f"{here}.ratioMetric.total.metricSource.spec.sli",
                           f"must name the same SLI as good ({good!r}), got {total!r}")
        sli, ratio = good, True
    else:
        raise SloError(path, f"{here}", "needs thresholdMetric or ratioMetric")
    method = _get(spec, "budgetingMethod", "spec", path, str)
    if method != "Occurrences":
        raise SloError(path, "spec.budgetingMethod",
                       f"only 'Occurrences' is supported, got {method!r}")
    raw_objectives = _get(spec, "objectives", "spec", path, list)
    if not raw_objectives:
        raise SloError(path, "spec.objectives", "empty")
    out = []
    for i, raw in enumerate(raw_objectives):
        field = f"spec.objectives[{i}]"
        if not isinstance(raw, dict):
            raise SloError(path, f"{field}", f"expected a mapping, got {raw!r}")
        display = _get(raw, "displayName", field, path, str, required=False) or ""
        target = _get(raw, "target", field, path, (int, float), required=False)
        if target is None:
            percent = _get(raw, "targetPercent", field, path, (int, float), required=False)
            if percent is None:
                raise SloError(path, f"{field}.target", "missing")
            target = percent / 100
        if not 0 < target <= 1:
            raise SloError(path, f"{field}.target",
                           f"must be in (0, 1], got {target!r}")
        op = _get(raw, "op", field, path, str, required=not ratio)
        value = _get(raw, "value", field, path, (int, float), required=not ratio)
        if ratio:
            if op is not None or value is not None:
                raise SloError(path, f"{field}.{'op' if op is not None else 'value'}",
                               "a ratioMetric objective has only a target")
        elif op not in _OPS:
            raise SloError(path, f"{field}.op",
                           f"unknown op {op!r}; one of {', '.join(_OPS)}")
        full_name = name if len(raw_objectives) == 1 else f"{name}/{display or i}"
        out.append(Objective(name=full_name, display_name=display, sli=sli,
                             target=float(target), op=op,
                             threshold=None if value is None else float(value), source=path))
    return out


MAX_SLO_BYTES = 1024 * 1024
"""Largest SLO file (an OpenSLO document is a few hundred bytes)."""
MAX_SLO_DEPTH = 32
"""Deepest nesting of an SLO file's mappings and lists (OpenSLO needs about six)."""
MAX_SLO_VALUES = 100_000
"""Most values an SLO file may expand to, YAML aliases counted at every use."""
MAX_FAILOVERS = 10_000
"""Most failover traces one review judges (each is compared with every span)."""


def parse_slo_documents(text: str, source: str = "slo") -> list[Objective]:
    """The objectives of every OpenSLO ``SLO`` document in one YAML text.

    Any other kind, a missing or wrong field, an unknown op or SLI, or a target outside
    (0, 1] raises ``SloError`` naming ``source`` and the field: a review against a
    half-understood objective would report a verdict nobody asked for.
    """
    if len(text) > MAX_SLO_BYTES:
        raise SloError(source, "", f"larger than {MAX_SLO_BYTES:,} characters")
    try:
        documents = [d for d in load_yaml_all(text, source, max_depth=MAX_SLO_DEPTH,
                                               max_values=MAX_SLO_VALUES) if d is not None]
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SloError(source, where, f"invalid YAML: {problem}") from None
    except InputError as error:
        raise SloError(source, "", str(error).removeprefix(f"{source}: ")) from None
    if not documents:
        raise SloError(source, "", "no SLO documents")
    out: list[Objective] = []
    for index, document in enumerate(documents):
        if not isinstance(document, dict):
            raise SloError(source, f"document {index + 1}",
                           f"expected a mapping, got {type(document).__name__}")
        out.extend(_objectives(document, index, source))
    return out


def load_slos(paths: Iterable[str]) -> list[Objective]:
    """Objectives of every file, in order; unreadable files raise ``SloError``."""
    out: list[Objective] = []
    for path in paths:
        try:
            text = read_text(path, MAX_SLO_BYTES, "SLO file")
        except InputError as error:
            raise SloError(path, "", str(error).removeprefix(f"{path}: ")
                           .replace(f"cannot read {path}:", "cannot read:")) from None
        out.extend(parse_slo_documents(text, path))
    return out


# -- evaluation -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ObjectiveResult:
    """An objective's verdict; percentiles are None for the ratio SLI."""

    objective: Objective
    good: int
    total: int
    met: bool
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None
    budget_remaining: float
    burn_rate: float  # math.inf when target is 1 and something was bad


@dataclass(frozen=True)
class Report:
    objectives: tuple[ObjectiveResult, ...]
    failovers: int

    @property
    def met(self) -> bool:
        return all(r.met for r in self.objectives)


def _budget(good: int, total: int, target: float) -> tuple[float, float]:
    """(budget_remaining, burn_rate) as documented in the module docstring."""
    bad = total - good
    if total == 0:
        return 1.0, 0.0
    if target >= 1:
        return (1.0, 0.0) if bad == 0 else (0.0, math.inf)
    burn = (bad / total) / (1 - target)
    return 1 - burn, burn


def _evaluate(objective: Objective, values: Sequence[float] | None,
              counts: tuple[int, int]) -> ObjectiveResult:
    if values is None:
        good, total = counts
        stats: list[float | None] = [None, None, None, None]
    else:
        assert objective.op is not None and objective.threshold is not None
        compare, threshold = _OPS[objective.op], objective.threshold
        good, total = sum(1 for v in values if compare(v, threshold)), len(values)
        ordered = sorted(values)
        stats = [quantile(ordered, 0.5), quantile(ordered, 0.9), quantile(ordered, 0.99),
                 ordered[-1] if ordered else None]
    # A tiny tolerance so that 99/100 meets 0.99 despite binary floating point.
    met = total == 0 or good / total >= objective.target - 1e-12
    remaining, burn = _budget(good, total, objective.target)
    return ObjectiveResult(objective, good, total, met, stats[0], stats[1], stats[2], stats[3],
                           remaining, burn)


def review(spans: Sequence[Span], objectives: Sequence[Objective], *,
           window_before_s: float = 5.0, window_after_s: float = 1.0) -> Report:
    """Evaluate every objective over the spans (see the module docstring)."""
    failovers = find_failovers(spans, window_before_s, window_after_s)
    series: dict[str, Callable[[], list[float]]] = {
        "convergence_ms": lambda: convergence_ms(spans, failovers),
        "takeover_ms": lambda: takeover_ms(spans, failovers),
        "rto_ms": lambda: rto_ms(spans, failovers),
    }
    cache: dict[str, list[float]] = {}
    counts = request_counts(spans, failovers)
    results = []
    for objective in objectives:
        if objective.sli in RATIO_SLIS:
            results.append(_evaluate(objective, None, counts))
            continue
        if objective.sli not in cache:
            cache[objective.sli] = series[objective.sli]()
        results.append(_evaluate(objective, cache[objective.sli], counts))
    return Report(tuple(results), len(failovers))


# -- output ---------------------------------------------------------------------------------

def _json_number(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def report_to_json(report: Report) -> dict[str, Any]:
    """The JSON document of ``--output json``; non-finite numbers become null."""
    return {
        "objectives": [
            {
                "name": r.objective.name,
                "sli": r.objective.sli,
                "good": r.good,
                "total": r.total,
                "target": r.objective.target,
                "met": r.met,
                "p50": _json_number(r.p50),
                "p90": _json_number(r.p90),
                "p99": _json_number(r.p99),
                "max": _json_number(r.max),
                "budget_remaining": _json_number(r.budget_remaining),
                "burn_rate": _json_number(r.burn_rate),
            }
            for r in report.objectives
        ],
        "met": report.met,
        "failovers": report.failovers,
    }
