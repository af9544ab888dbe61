"""The model's JSON Schema (``meshxl schema``, ``docs/model.schema.json``): generated
from the one declaration, committed equal to it, a valid JSON Schema that takes the
models meshxl ships and the plain form of every model ``validate`` accepts, and that
refuses what the declaration refuses field by field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import given

from meshxl.cli.root import main
from meshxl.model import ModelError, parse_model
from meshxl.model.schema import model_schema, schema_text
from tests.unit.test_model_lax import SETTINGS, models

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "docs" / "model.schema.json"
VALIDATOR = jsonschema.Draft202012Validator(model_schema())


def test_the_committed_schema_is_the_generated_one() -> None:
    """Regenerate it with ``meshxl schema > docs/model.schema.json``."""
    assert COMMITTED.read_text() == schema_text()


def test_the_command_prints_it() -> None:
    result = CliRunner().invoke(main, ["schema"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == model_schema()


def test_it_is_a_json_schema_that_says_what_each_field_is() -> None:
    schema = model_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    member = schema["$defs"]["Member"]
    assert member["additionalProperties"] is False
    assert set(member["required"]) == {"name", "address", "port"}
    assert (member["properties"]["port"]["minimum"],
            member["properties"]["port"]["maximum"]) == (1, 65535)
    assert "Share of the tier" in schema["$defs"]["Site"]["properties"]["weight"][
        "description"]
    ttl = schema["$defs"]["SessionSync"]["properties"]["ttl"]
    assert {"type": "string", "pattern": ttl["anyOf"][1]["pattern"]} in ttl["anyOf"]
    assert ttl["anyOf"][0]["exclusiveMinimum"] == 0


def shipped() -> list[Path]:
    found = [*ROOT.glob("deploy/**/model*.yaml"), *ROOT.glob("deploy/examples/*.yaml")]
    return sorted(p for p in found if "clusters" in p.read_text() or "pools" in p.read_text())


@pytest.mark.parametrize("path", shipped(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_model_meshxl_ships_passes_it(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not ({"clusters", "pools"} & set(data)):
        pytest.skip("not a model file")
    assert [e.message for e in VALIDATOR.iter_errors(data)] == []


def test_there_are_shipped_models() -> None:
    assert shipped()


@pytest.mark.parametrize(("data", "where"), [
    ({"clusters": [{"name": "c", "members": [{"name": "a", "address": "::1", "port": 0}]}]},
     "port"),
    ({"clusters": [{"name": "c", "bogus": 1}]}, "bogus"),
    ({"clusters": [{"name": "C"}]}, "name"),
    ({"clusters": [{"name": "c", "mode": "active-active"}]}, "mode"),
    ({"clusters": [{"name": "c", "sessions": {"ttl": "soon"}}]}, "ttl"),
    ({"clusters": [{"name": "c", "sessions": {"ttl": 0}}]}, "ttl"),
])
def test_it_refuses_what_the_declaration_refuses(data: dict[str, Any], where: str) -> None:
    errors = list(VALIDATOR.iter_errors(data))
    assert errors and any(where in json.dumps(list(e.absolute_path)) or where in e.message
                          for e in errors), [e.message for e in errors]
    with pytest.raises(ModelError):
        parse_model(yaml.safe_dump(data))


@SETTINGS
@given(models())
def test_a_model_validate_accepts_passes_it_in_plain_form(data: dict[str, Any]) -> None:
    """Written back as plain data (what ``meshxl validate`` read, in the schema's forms),
    every model ``validate`` accepts passes the schema: editors never flag a good model
    written plainly."""
    try:
        model = parse_model(yaml.safe_dump(data))
    except ModelError:
        return
    plain = msgspec.to_builtins(model)
    assert [e.message for e in VALIDATOR.iter_errors(plain)] == []
