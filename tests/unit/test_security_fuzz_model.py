"""Fuzzing the model loader (hypothesis): whatever the text or the data, ``parse_model``
and ``load_model`` return a model or raise ModelError, nothing else, and quickly.

The model reaches the control plane from files and from etcd (``meshxl apply``, or
anyone who can write the key), so a malformed one must be refused, never crash it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from meshxl.model import ModelError, ModelSpec, load_model, parse_model
from meshxl.model.load import MAX_MODEL_BYTES
from tests.harness.clock import scaled

EXAMPLES = int(os.environ.get("MESHXL_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=2000, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Field names of the model, so random data reaches deep validation, not only
# "unknown field".
FIELDS = ["clusters", "name", "mode", "members", "address", "port", "site", "sites",
          "weight", "priority", "stickiness", "algorithm", "header", "cookie", "ttl",
          "source_ip", "health_check", "path", "interval", "timeout", "retries",
          "attempts", "listener", "route", "domains", "prefix", "membership", "sessions",
          "sync_delay", "max_bytes", "failover_rank", "outlier_detection",
          "maglev_table_size", "ring_minimum_size", "ring_maximum_size", "balance_factor",
          "budget_percent", "telemetry", "tracing", "priority_spillover", "enabled",
          "backoff_base", "backoff_max", "unhealthy_threshold", "no_traffic_interval",
          "pin", "strict", "replication"]

scalars = (st.none() | st.booleans() | st.integers() | st.floats()
           | st.text(max_size=20) | st.sampled_from(["250ms", "1.5s", "2m", "1h", "-1s",
                                                     "maglev", "ring_hash", "load-sharing",
                                                     "high-availability", "registered",
                                                     "static", "127.0.0.1", "::1", "dc1"]))
keys = st.sampled_from(FIELDS) | st.text(max_size=10) | st.integers()
data = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(keys, inner, max_size=5), max_leaves=30)

VALID = {"clusters": [{
    "name": "orders", "mode": "high-availability",
    "stickiness": {"algorithm": "maglev", "header": "x-session-id"},
    "sites": [{"name": "dc1"}, {"name": "dc2"}],
    "members": [{"name": "a", "address": "10.0.0.1", "port": 8080, "site": "dc1"},
                {"name": "b", "address": "10.0.0.2", "port": 8080, "site": "dc2"}],
    "health_check": {"path": "/healthz", "interval": "250ms", "timeout": "200ms"},
    "retries": {"attempts": 3},
    "listener": {"address": "0.0.0.0", "port": 10000},
    "route": {"domains": ["orders.example.com"], "prefix": "/"},
    "sessions": {"ttl": "30m", "sync_delay": "0s", "max_bytes": 1048576},
}]}


def _parse(text: str) -> ModelSpec | None:
    started = time.monotonic()
    try:
        return parse_model(text, source="fuzz")
    except ModelError as exc:
        assert exc.problems and all(str(p) for p in exc.problems)
        assert len(str(exc)) < 200_000  # messages stay bounded, whatever the input
        return None
    finally:
        assert time.monotonic() - started < scaled(2.0)  # no input makes parsing crawl


@FUZZ
@given(st.text(max_size=2000))
def test_any_text_is_a_model_or_a_model_error(text: str) -> None:
    _parse(text)


@FUZZ
@given(st.lists(st.sampled_from(["{", "}", "[", "]", ":", ",", "- ", "\n", "  ", "&a ", "*a",
                                 "!!binary ", "!!timestamp ", "<<: ", "? ", "|", ">", "'",
                                 '"', "#", "%YAML 1.1\n", "---\n", "...\n", "2001-13-45",
                                 "1e400", "0x", "~", "clusters", "name", "members", "\t",
                                 "!!python/object:os.system ", "\x00", "\ufeff"]),
                max_size=60).map("".join))
def test_yaml_shaped_text_is_a_model_or_a_model_error(text: str) -> None:
    _parse(text)


@FUZZ
@given(data)
def test_any_data_is_a_model_or_a_model_error(value: Any) -> None:
    try:
        text = yaml.safe_dump(value)
    except (yaml.YAMLError, ValueError, OverflowError):
        assume(False)
        return
    _parse(text)


@st.composite
def mutated_models(draw: st.DrawFn) -> Any:
    """The valid model with one value somewhere replaced (or one key added)."""
    import copy

    model: Any = copy.deepcopy(VALID)
    node = model
    path: list[Any] = []
    while isinstance(node, dict | list) and node and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(node) if isinstance(node, dict)
                                   else list(range(len(node)))))
        path.append(key)
        if not isinstance(node[key], dict | list):
            break
        node = node[key]
    target = model
    for key in path[:-1]:
        target = target[key]
    new = draw(data)
    if path:
        target[path[-1]] = new
    elif isinstance(model, dict):
        model[draw(keys)] = new
    return model


@FUZZ
@given(mutated_models())
def test_a_valid_model_with_one_bad_value_is_a_model_or_a_model_error(value: Any) -> None:
    try:
        text = yaml.safe_dump(value)
    except (yaml.YAMLError, ValueError, OverflowError):
        assume(False)
        return
    _parse(text)


def test_the_fuzzed_valid_model_is_valid() -> None:
    """The mutations above start from a model that loads (or they test nothing)."""
    assert _parse(yaml.safe_dump(VALID)) is not None


@pytest.mark.parametrize("text", [
    "a: 2001-13-45",                          # an impossible date: PyYAML raises ValueError
    "clusters: [" * 5000,                     # deeper than PyYAML's recursion allows
    "- " * 20000 + "x",                       # the same, block style
    "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(  # a billion laughs
        f"{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, n in zip("abcdefgh", "bcdefghi", strict=True)) + "clusters: *i\n",
    "clusters: [{name: x, members: *x}]",      # an undefined alias
    "!!binary notbase64",
    "\ud800",                                 # a lone surrogate
    "a: !!float 1e400",
])
def test_known_troublemakers_are_model_errors(text: str) -> None:
    with pytest.raises(ModelError):
        parse_model(text)


def test_oversized_model_text_is_refused() -> None:
    text = "clusters: []\n" + "#" * (MAX_MODEL_BYTES + 1)
    with pytest.raises(ModelError, match="larger than"):
        parse_model(text)


@FUZZ
@given(st.binary(max_size=500))
def test_any_file_is_a_model_or_a_model_error(tmp_path_factory: pytest.TempPathFactory,
                                              content: bytes) -> None:
    path = tmp_path_factory.mktemp("model") / "model.yaml"
    path.write_bytes(content)
    try:
        load_model(path)
    except ModelError:
        pass


def test_unreadable_model_files_are_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read"):
        load_model(tmp_path / "missing.yaml")
    with pytest.raises(ModelError, match="cannot read"):
        load_model(tmp_path)  # a directory
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"clusters: []\n# caf\xe9\n")
    with pytest.raises(ModelError, match="UTF-8"):
        load_model(bad)
