"""The files operators hand to ``meshxl inject`` and ``meshxl slo review`` are bounded:
size, line length, nesting, alias expansion and span count. Anything past a limit, or
not YAML/JSON at all, is one line naming the file and an error exit, never a hang or a
traceback (fuzzed with hypothesis per surface)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshxl.bounded import InputError, load_yaml_all, read_text
from meshxl.cli import main
from meshxl.cli.telemetry import slo_review_command
from meshxl.kube.workloads import MAX_INJECT_BYTES, MAX_INJECT_DEPTH
from meshxl.telemetry.otlpjson import TraceFileError, read_spans
from meshxl.telemetry.slo import (
    MAX_SLO_BYTES,
    MAX_SLO_DEPTH,
    SloError,
    load_slos,
    parse_slo_documents,
)

REPO = Path(__file__).resolve().parents[2]
SLO = REPO / "deploy" / "slo" / "failover.yaml"
POD = """\
apiVersion: v1
kind: Pod
metadata: {name: web-0, labels: {meshxl.io/cluster: web}}
spec:
  containers: [{name: app, image: app:1, ports: [{containerPort: 8080}]}]
"""


def nested(depth: int) -> str:
    return "a: " + "[" * depth + "]" * depth + "\n"


def bomb(levels: int) -> str:
    lines = ['l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


# -- the bounded reader --------------------------------------------------------------------


def test_read_text_stops_at_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    assert read_text(str(path), 100) == "x" * 100
    with pytest.raises(InputError, match=r"f: input larger than 99 bytes"):
        read_text(str(path), 99)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(InputError, match="not UTF-8"):
        read_text(str(path), 100)
    with pytest.raises(InputError, match="cannot read"):
        read_text(str(tmp_path / "missing"), 100)


def test_yaml_bounds_refuse_depth_expansion_and_self_reference() -> None:
    assert load_yaml_all(nested(10), "x", max_depth=12, max_values=100) == [
        {"a": json.loads("[" * 10 + "]" * 10)}]
    with pytest.raises(InputError, match="nested deeper than 12 levels"):
        load_yaml_all(nested(12), "x", max_depth=12, max_values=100)
    with pytest.raises(InputError, match="nested deeper than 64 levels"):
        load_yaml_all(nested(200_000), "x", max_depth=64, max_values=100)  # libyaml crash
    with pytest.raises(InputError, match="expands to more than 100,000 values"):
        load_yaml_all(bomb(9), "x", max_depth=64, max_values=100_000)
    with pytest.raises(InputError, match="alias inside its own anchor"):
        load_yaml_all("a: &a [*a]\n", "x", max_depth=64, max_values=100)
    with pytest.raises(InputError, match=r"x:\d+:\d+: invalid YAML"):
        load_yaml_all("a: [\n", "x", max_depth=64, max_values=100)


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=40)


@settings(max_examples=60, deadline=None)
@given(data=yaml_values, depth=st.integers(1, 40))
def test_yaml_bounds_accept_exactly_what_fits(data: object, depth: int) -> None:
    text = yaml.safe_dump(data)
    try:
        [loaded] = load_yaml_all(text, "x", max_depth=depth, max_values=10_000)
    except InputError as exc:
        assert "nested deeper" in str(exc)
        return
    assert loaded == data


# -- meshxl slo review ------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(text=st.one_of(
    st.text(max_size=300),
    st.builds(lambda v: yaml.safe_dump(v), yaml_values),
    st.sampled_from([nested(MAX_SLO_DEPTH + 1), bomb(7), "a: &a [*a]", "!!python/object:x {}",
                     "---\n" * 1000, "a: !!timestamp 2026-13-45", "\x00", "[" * 5000]),
))
def test_slo_documents_are_objectives_or_one_line_errors(text: str) -> None:
    try:
        parse_slo_documents(text, "fuzz.yaml")
    except SloError as exc:
        message = str(exc)
        assert message.startswith("fuzz.yaml") and "\n" not in message, message


def test_slo_files_past_the_limits_are_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("#" * (MAX_SLO_BYTES + 1))
    with pytest.raises(SloError, match="larger than 1,048,576 bytes"):
        load_slos([str(big)])
    deep = tmp_path / "deep.yaml"
    deep.write_text(nested(100_000))
    with pytest.raises(SloError, match=f"nested deeper than {MAX_SLO_DEPTH} levels"):
        load_slos([str(deep)])


def span_line(count: int, start: int = 0) -> str:
    spans = [{"traceId": f"{i + 1:032x}", "spanId": f"{i + 1:016x}", "name": "x",
              "startTimeUnixNano": "1", "endTimeUnixNano": "2"}
             for i in range(start, start + count)]
    return json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": spans}]}]}) + "\n"


def test_trace_files_past_the_limits_are_refused(tmp_path: Path) -> None:
    traces = tmp_path / "t.jsonl"
    traces.write_text(span_line(5) + span_line(5, 5))
    assert len(read_spans([str(traces)])) == 10
    with pytest.raises(TraceFileError, match=r"t.jsonl:2: more than 8 spans"):
        read_spans([str(traces)], max_spans=8)
    with pytest.raises(TraceFileError, match=r"t.jsonl:1: line longer than 100 characters"):
        read_spans([str(traces)], max_line=100)
    with pytest.raises(TraceFileError, match=r"t.jsonl:2: the trace files hold more than"):
        read_spans([str(traces)], max_total=len(span_line(5)) + 10)
    traces.write_text("[" * 100_000 + "\n")
    with pytest.raises(TraceFileError, match="nested too deeply"):
        read_spans([str(traces)])


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(line=st.one_of(st.text(max_size=200), st.builds(json.dumps, yaml_values)))
def test_trace_lines_are_spans_or_one_line_errors(tmp_path: Path, line: str) -> None:
    traces = tmp_path / "fuzz.jsonl"
    traces.write_text(line.replace("\n", " ") + "\n", encoding="utf-8", errors="replace")
    try:
        read_spans([str(traces)])
    except TraceFileError as exc:
        assert str(exc).startswith(str(traces)) and "\n" not in str(exc)


def test_review_command_reports_a_bad_file_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text(nested(100_000))
    assert slo_review_command([str(tmp_path / "none.jsonl")], [str(deep)], "table") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nested deeper" in err


def test_review_table_shows_objective_names_as_typed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    slo = tmp_path / "slo.yaml"
    slo.write_text(SLO.read_text().replace("name: ", "name: x-[/red]-", 1))
    traces = tmp_path / "t.jsonl"
    traces.write_text("")
    code = slo_review_command([str(traces)], [str(slo)], "table")
    assert code in (0, 1)
    assert "x-[/red]-" in capsys.readouterr().out


# -- meshxl inject ----------------------------------------------------------------------------


def run_inject(text: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["inject", "-f", "-", "-q"], input=text)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_inject_refuses_input_past_the_limits() -> None:
    code, _, err = run_inject("#" * (MAX_INJECT_BYTES + 1))
    assert code == 1 and err == ("meshxl: <stdin>: Kubernetes YAML larger than 16,777,216 "
                                 "bytes\n")
    code, _, err = run_inject(nested(MAX_INJECT_DEPTH + 1))
    assert code == 1 and err == f"meshxl: <stdin>: nested deeper than {MAX_INJECT_DEPTH} levels\n"
    code, _, err = run_inject(bomb(9))  # 10^9 values: a hang before
    assert code == 1 and "expands to more than 2,000,000 values" in err
    code, out, err = run_inject(POD)
    assert code == 0 and "statesync" in out, (out, err)


@settings(max_examples=60, deadline=None)
@given(text=st.one_of(
    st.text(max_size=300),
    st.builds(lambda v: yaml.safe_dump_all(v), st.lists(yaml_values, max_size=3)),
    st.builds(lambda extra: POD + "---\n" + yaml.safe_dump(extra), yaml_values),
))
def test_inject_fuzz_gives_yaml_or_one_line_errors(text: str) -> None:
    code, _, err = run_inject(text)
    assert code in (0, 1)
    if code == 1:
        assert err.startswith("meshxl: ") and err.count("\n") == 1, err
