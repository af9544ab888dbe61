"""The sidecar's own metrics (``meshxl.statesync.metrics``) against prometheus-client,
the reference implementation of Prometheus' text format: the same metrics given the
same operations expose the same text, line by line (prometheus-client's ``_created``
series aside), for generated help texts, label values and numbers."""

from __future__ import annotations

import math
from typing import Any

import prometheus_client
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from meshxl.statesync import metrics as ours
from meshxl.statesync.metrics import StatesyncMetrics, go_float

KINDS = ("counter", "gauge", "histogram")
label_names = st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True)
                       .filter(lambda n: n != "le"), max_size=3, unique=True)
label_values = st.text(max_size=12)  # quotes, backslashes, newlines, any Unicode
numbers = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10**20, 10**20)
amounts = st.floats(min_value=0, allow_infinity=False, allow_nan=False) | st.integers(0, 10**12)
bucket_lists = st.lists(st.floats(min_value=-1e9, max_value=1e9, allow_nan=False),
                        min_size=1, max_size=6, unique=True).map(sorted)


@st.composite
def families(draw: Any) -> list[dict[str, Any]]:
    out = []
    for i in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(KINDS))
        out.append({"name": f"fam{i}", "kind": kind, "doc": draw(st.text(max_size=20)),
                    "labels": draw(label_names),
                    "buckets": draw(bucket_lists) if kind == "histogram" else None})
    return out


def build(module: Any, registry: Any, spec: dict[str, Any]) -> Any:
    cls = {"counter": module.Counter, "gauge": module.Gauge,
           "histogram": module.Histogram}[spec["kind"]]
    extra = {"buckets": spec["buckets"]} if spec["buckets"] is not None else {}
    return cls(spec["name"], spec["doc"], spec["labels"], registry=registry, **extra)


@st.composite
def scenarios(draw: Any) -> tuple[list[dict[str, Any]], list[tuple[int, tuple[str, ...], Any]]]:
    specs = draw(families())
    operations = []
    for _ in range(draw(st.integers(0, 12))):
        index = draw(st.integers(0, len(specs) - 1))
        spec = specs[index]
        values = tuple(draw(label_values) for _ in spec["labels"])
        if spec["kind"] == "counter":
            argument = draw(amounts)
        elif spec["kind"] == "gauge":
            argument = draw(numbers)
        else:
            argument = draw(st.floats(min_value=-1e12, max_value=1e12, allow_nan=False)
                            | st.integers(-10**6, 10**6))
        operations.append((index, values, argument))
    return specs, operations


def apply(metric: Any, kind: str, values: tuple[str, ...], argument: Any) -> None:
    target = metric.labels(*values) if values else metric
    getattr(target, {"counter": "inc", "gauge": "set", "histogram": "observe"}[kind])(argument)


def without_created(text: str, specs: list[dict[str, Any]]) -> str:
    created = {f"{s['name']}_created" for s in specs}
    kept = []
    for line in text.split("\n"):  # only a newline ends a line (the rest is escaped)
        name = (line.split(" ", 3)[2] if line.startswith("#")
                else line.split("{", 1)[0].split(" ", 1)[0])
        if name not in created:
            kept.append(line)
    return "\n".join(kept)


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_the_text_is_prometheus_clients(scenario: Any) -> None:
    specs, operations = scenario
    theirs_registry = prometheus_client.CollectorRegistry()
    ours_registry = ours.Registry()
    theirs = [build(prometheus_client, theirs_registry, s) for s in specs]
    mine = [build(ours, ours_registry, s) for s in specs]
    for index, values, argument in operations:
        kind = specs[index]["kind"]
        apply(theirs[index], kind, values, argument)
        apply(mine[index], kind, values, argument)
    expected = without_created(prometheus_client.generate_latest(theirs_registry).decode(),
                               specs)
    assert ours_registry.render().decode() == expected


@given(numbers)
def test_numbers_are_written_as_prometheus_client_writes_them(value: float) -> None:
    from prometheus_client.utils import floatToGoString

    assert go_float(value) == floatToGoString(value)


def test_a_counter_only_counts_up() -> None:
    counter = ours.Counter("c", "doc", registry=ours.Registry())
    with pytest.raises(ValueError, match="non-negative"):
        counter.inc(-1)
    with pytest.raises(ValueError, match="has labels"):
        ours.Counter("d", "doc", ["a"]).labels("x", "y")
    registry = ours.Registry()
    ours.Gauge("g", "doc", registry=registry)
    with pytest.raises(ValueError, match="registered twice"):
        ours.Gauge("g", "doc", registry=registry)


def test_the_sidecars_metrics_parse_as_prometheus_text() -> None:
    """Every metric of the sidecar, each kind with a sample, read back by
    prometheus-client's parser with its name, type and values."""
    m = StatesyncMetrics()
    m.write("put", "ok").inc(3)
    m.on_batch("put", 5, 0.003)
    m.member.labels("c", 'm"1', "").set(1)
    m.connections.set_function(lambda: 7)
    m.replication_lag.observe(math.inf)
    parsed = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    assert parsed["meshxl_statesync_writes"].type == "counter"
    [write] = parsed["meshxl_statesync_writes"].samples
    assert (write.name, write.labels, write.value) == (
        "meshxl_statesync_writes_total", {"op": "put", "result": "ok"}, 3.0)
    sizes = {s.labels.get("le"): s.value for s in parsed["meshxl_statesync_batch_size"].samples
             if s.name.endswith("_bucket")}
    assert sizes["4.0"] == 0 and sizes["8.0"] == 1 and sizes["+Inf"] == 1
    [member] = parsed["meshxl_statesync_member_info"].samples
    assert member.labels == {"cluster": "c", "member": 'm"1', "site": ""}
    assert parsed["meshxl_statesync_http_connections"].samples[0].value == 7
    assert parsed["meshxl_statesync_ready"].type == "gauge"
    assert parsed["meshxl_statesync_replication_lag_seconds"].type == "histogram"
    assert ours.CONTENT_TYPE.startswith("text/plain; version=")
