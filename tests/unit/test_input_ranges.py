"""Every number meshxl takes from outside is finite and in range, or refused naming its
input: each numeric option of every ``meshxl`` command (found by click's introspection,
so a new one is covered without a line here), the sidecar's own reader of its command
line and environment, the configuration objects the servers are built from, every
numeric field of the model (found in its declaration, which the sidecar reads too)."""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import msgspec
import pytest
from click.testing import CliRunner

from meshxl.cli import entry
from meshxl.cli.root import main
from meshxl.model import document, limits
from meshxl.model.basics import ModelError
from meshxl.model.decode import decode
from meshxl.statesync.config import StatesyncConfig
from meshxl.xds.config import ControlPlaneConfig

NOT_NUMBERS = ("nan", "NaN", "inf", "-inf", "Infinity", "1e400", "-1e400")
OUT_OF_RANGE = ("-1", "-0.5", "1e300", "1" + "0" * 30)
BAD = NOT_NUMBERS + OUT_OF_RANGE


def _commands(command: click.Command, path: tuple[str, ...]) -> Iterator[
        tuple[tuple[str, ...], click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        for name in command.list_commands(click.Context(command)):
            sub = command.get_command(click.Context(command), name)
            assert sub is not None, name
            yield from _commands(sub, (*path, name))


def numeric_options() -> list[tuple[tuple[str, ...], click.Option]]:
    found = []
    for path, command in _commands(main, ()):
        for param in command.params:
            if isinstance(param, click.Option) and not param.is_flag and \
                    isinstance(param.type, click.types.IntParamType | click.types.FloatParamType):
                found.append((path, param))
    return found


NUMERIC = numeric_options()


def test_the_commands_have_numeric_options() -> None:
    names = {(" ".join(path), param.opts[0]) for path, param in NUMERIC}
    assert ("serve statesync", "--session-ttl") in names
    assert ("serve xds", "--debounce") in names
    assert len(names) >= 25, names


def error_line(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    assert "Traceback" not in output
    return errors[0]


@pytest.mark.parametrize(("path", "param"), NUMERIC,
                         ids=[f"{' '.join(p)} {o.opts[0]}" for p, o in NUMERIC])
def test_every_numeric_option_refuses_what_is_not_a_finite_number_in_range(
        path: tuple[str, ...], param: click.Option) -> None:
    runner = CliRunner()
    for value in BAD:
        result = runner.invoke(main, [*path, f"{param.opts[0]}={value}"])
        assert result.exit_code == 2, (value, result.output, result.exception)
        line = error_line(result.output)
        assert f"'{param.opts[0]}'" in line and value in line, (value, line)


@pytest.mark.parametrize(("path", "param"), NUMERIC,
                         ids=[f"{' '.join(p)} {o.opts[0]}" for p, o in NUMERIC])
def test_every_numeric_option_has_a_finite_range(path: tuple[str, ...],
                                                 param: click.Option) -> None:
    kind = param.type
    assert isinstance(kind, click.IntRange | click.FloatRange), param.opts
    assert kind.min is not None and kind.max is not None, param.opts
    assert math.isfinite(kind.min) and math.isfinite(kind.max), param.opts


def test_a_numeric_environment_variable_is_refused_alike() -> None:
    with_env = [(path, param) for path, param in NUMERIC if param.envvar]
    assert with_env
    for path, param in with_env:
        for value in BAD:
            envvar = param.envvar
            assert isinstance(envvar, str)
            args = [*path]
            if path == ("serve", "statesync"):
                args += ["--member", "a", "--app", "127.0.0.1:1"]
            result = CliRunner().invoke(main, args, env={envvar: value})
            assert result.exit_code == 2, (envvar, value, result.output)
            assert param.opts[0] in error_line(result.output), (envvar, value)


# -- the sidecar's own reader agrees: it refers every one of them to click ---------------

STATESYNC = ["--cluster", "c", "--member", "a", "--app", "127.0.0.1:1"]
LEAN_NUMERIC = [name for name, opt in entry._options().items()
                if opt.kind in (entry._INT, entry._FLOAT)]


def test_the_lean_reader_knows_every_numeric_option() -> None:
    clicked = {param.opts[0] for path, param in NUMERIC if path == ("serve", "statesync")}
    assert set(LEAN_NUMERIC) == clicked


@pytest.mark.parametrize("flag", LEAN_NUMERIC)
@pytest.mark.parametrize("value", BAD)
def test_the_lean_reader_refers_bad_numbers_to_click(
        flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert entry.statesync_values([*STATESYNC, flag, value], {}) is None
    envvar = entry._options()[flag].envvar
    if envvar:
        assert entry.statesync_values(STATESYNC, {envvar: value}) is None
    with pytest.raises(SystemExit) as exited:
        entry.main(["serve", "statesync", *STATESYNC, f"{flag}={value}"], prog_name="meshxl")
    assert exited.value.code == 2
    assert f"'{flag}'" in error_line(capsys.readouterr().err)


# -- the configuration objects ------------------------------------------------------------

def _numeric_fields(cls: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls)
            if {int, float} & set(typing.get_args(hints[f.name]) or (hints[f.name],))]


ALIASES = {"max_bytes": "max_session_bytes"}
"""A setting named otherwise on the command line."""
CONFIGS: list[tuple[type, dict[str, Any]]] = [
    (StatesyncConfig, {"cluster": "c", "member": "a", "app": "127.0.0.1:1",
                       "etcd": "http://127.0.0.1:2379"}),
    (ControlPlaneConfig, {"config_path": Path("model.yaml")}),
]


@pytest.mark.parametrize(("cls", "given"), CONFIGS, ids=lambda c: getattr(c, "__name__", ""))
def test_every_numeric_setting_of_a_server_is_checked(cls: type, given: dict[str, Any]) -> None:
    cls(**given)
    fields = _numeric_fields(cls)
    assert len(fields) >= 6, fields
    for name in fields:
        for value in (math.nan, math.inf, -math.inf, -1, 10**30):
            with pytest.raises(ValueError) as refused:
                cls(**given, **{name: value})
            said = str(refused.value).replace("-", "_")
            assert ALIASES.get(name, name) in said, (name, value, refused.value)


# -- the model ----------------------------------------------------------------------------

def _model_classes() -> list[type[msgspec.Struct]]:
    seen: dict[str, type[msgspec.Struct]] = {}

    def walk(cls: type[msgspec.Struct]) -> None:
        if cls.__qualname__ in seen:
            return
        seen[cls.__qualname__] = cls
        for field in msgspec.structs.fields(cls):
            for arg in _flatten(field.type):
                if isinstance(arg, type) and issubclass(arg, msgspec.Struct):
                    walk(arg)

    walk(document.ModelSpec)
    return list(seen.values())


def _flatten(annotation: Any) -> Iterator[Any]:
    yield annotation
    for arg in typing.get_args(annotation):
        yield from _flatten(arg)


MODEL_NUMERIC = [(cls, field.name) for cls in _model_classes()
                 for field in msgspec.structs.fields(cls)
                 if {int, float} & set(_flatten(field.type))]


def test_the_model_has_numeric_fields() -> None:
    assert len(MODEL_NUMERIC) >= 40, MODEL_NUMERIC


@pytest.mark.parametrize(("cls", "name"), MODEL_NUMERIC,
                         ids=[f"{c.__name__}.{n}" for c, n in MODEL_NUMERIC])
def test_every_numeric_model_field_refuses_non_finite_and_out_of_range(
        cls: type[msgspec.Struct], name: str) -> None:
    for value in (math.nan, math.inf, -math.inf, "nan", "inf", ".inf", -1, 10**30, 1e300):
        with pytest.raises(ModelError) as refused:
            decode({name: value}, cls)
        mine = [p for p in refused.value.problems if p.path.split("[")[0] == name]
        assert mine and all("required" not in p.message for p in mine), (name, value)


@pytest.mark.parametrize(("cls", "name"), MODEL_NUMERIC,
                         ids=[f"{c.__name__}.{n}" for c, n in MODEL_NUMERIC])
def test_every_numeric_model_field_takes_its_range_from_one_bound(
        cls: type[msgspec.Struct], name: str) -> None:
    """Each number of the model has both ends of its range, and they are those of a
    :class:`~meshxl.model.limits.Bound` (defined once, in limits.py), not typed again."""
    field = next(f for f in msgspec.structs.fields(cls) if f.name == name)
    metas = [a for a in _flatten(field.type) if isinstance(a, msgspec.Meta)]
    low = next(m.ge if m.ge is not None else m.gt for m in metas
               if m.ge is not None or m.gt is not None)
    high = next(m.le for m in metas if m.le is not None)
    above = any(m.gt is not None for m in metas)
    bounds = [b for b in vars(limits).values() if isinstance(b, limits.Bound)]
    assert any((b.low, b.high, b.above) == (low, high, above) for b in bounds), (name, low, high)


def test_a_model_number_without_a_range_is_still_finite() -> None:
    """Reading the model refuses NaN and infinities in any number field, so a field added
    without a range (or with only one bound) cannot take them."""
    from meshxl.model.fields import SpecModel

    class Future(SpecModel, kw_only=True):
        share: float = 0.0
        at_least: typing.Annotated[float, msgspec.Meta(ge=0)] | None = None

    for name in ("share", "at_least"):
        for value in (math.nan, math.inf, -math.inf, "nan", "-inf"):
            with pytest.raises(ModelError) as refused:
                decode({name: value}, Future)
            assert refused.value.problems[0].path == name, (name, value)


def test_a_sync_delay_the_control_plane_would_not_believe_is_refused() -> None:
    """A registration's ``sync_delay`` above a day counts as 0 to the control plane,
    which would then move sessions the member still keeps alone: the model refuses it."""
    from meshxl.model import parse_model

    text = """\
clusters:
- name: c
  members: [{name: a, address: 127.0.0.1, port: 1}]
  sessions: {sync_delay: 86401}
"""
    with pytest.raises(ModelError, match=r"clusters\[0\]\.sessions\.sync_delay"):
        parse_model(text)


# -- the session API ------------------------------------------------------------------------

@pytest.mark.parametrize("ttl", ['"nan"', '"inf"', '"-inf"', '"Infinity"', "-1", "0.5",
                                 "86401", "1" + "0" * 30, '"1e400"', '"400d"', "true"])
def test_a_problem_reports_ttl_is_finite_and_in_range(ttl: str) -> None:
    from meshxl.errors import InputError
    from meshxl.statesync import api

    body = f'{{"detail": "disk", "ttl": {ttl}}}'.encode()
    with pytest.raises(InputError) as refused:
        api._problem_report(body, "application/json")
    assert refused.value.details["field"] == "ttl" and str(refused.value).startswith("ttl: ")


@pytest.mark.parametrize("ttl", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_a_problem_reports_ttl_that_is_no_json_number_is_refused(ttl: str) -> None:
    from meshxl.errors import InputError
    from meshxl.statesync import api

    with pytest.raises(InputError):  # a 400 with a JSON body (httpbase)
        api._problem_report(f'{{"ttl": {ttl}}}'.encode(), "application/json")


def test_the_api_documents_the_range_it_checks() -> None:
    import json

    from meshxl.model.limits import PROBLEM_TTL
    from meshxl.statesync import api

    document = json.loads((Path(api.__file__).parent / "openapi.json").read_text())
    for path in ("/v1/problems/{name}", "/v1/clusters/{cluster}/problems/{name}"):
        body = document["paths"][path]["put"]["requestBody"]["content"]["application/json"]
        number = body["schema"]["properties"]["ttl"]["oneOf"][0]
        assert (number["minimum"], number["maximum"]) == (PROBLEM_TTL.low, PROBLEM_TTL.high)


# -- numbers stored in etcd by whoever may write the key ----------------------------------

@pytest.mark.parametrize("field", ["port", "weight"])
@pytest.mark.parametrize("number", ["1e400", "-1e400", "Infinity", "NaN", "true", "80.5",
                                    "0", "-1", "70000", "1" + "0" * 30, '"1e400"'])
def test_a_registrations_number_out_of_range_skips_it_and_nothing_else(
        field: str, number: str) -> None:
    """A registration is written by its member's sidecar, i.e. by anyone holding that
    cluster's etcd credential: ``"port": 1e400`` (JSON for infinity) must cost that
    registration, never the reading of every cluster's runtime state."""
    from meshxl.etcd.keys import Keys
    from meshxl.etcd.mesh import runtime_from_values

    keys = Keys()
    fields = {"address": '"127.0.0.1"', "port": "8080", "weight": "5", field: number}
    bad = "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"
    values = {keys.member("c", "bad"): bad.encode(),
              keys.member("d", "good"): b'{"address": "127.0.0.2", "port": 80}'}
    runtime = runtime_from_values(keys, values)
    assert set(runtime.registrations) == {("d", "good")}


@pytest.mark.parametrize("extra", ['"problems": 5', '"problems": {"a": 1}', '"site": 5',
                                   '"site": ["a"]', '"istio": 5'])
def test_a_registration_of_the_wrong_shape_skips_it_and_nothing_else(extra: str) -> None:
    """As with numbers: a field of the wrong type is that registration's problem only
    (``"problems": 5`` raised TypeError past the per-key guard)."""
    from meshxl.etcd.keys import Keys
    from meshxl.etcd.mesh import runtime_from_values

    keys = Keys()
    bad = '{"address": "127.0.0.1", "port": 8080, ' + extra + "}"
    values = {keys.member("c", "bad"): bad.encode(),
              keys.member("d", "good"): b'{"address": "127.0.0.2", "port": 80}'}
    assert set(runtime_from_values(keys, values).registrations) == {("d", "good")}
