"""The model's stored JSON form (``mesh/model.json``, meshxl/model/text.py): read only
when written with the text (one mod_revision), exactly the text's data, checked like
text, and never stored for data JSON cannot hold."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshxl.etcd.keys import Keys
from meshxl.etcd.mesh import EtcdMeshSource, model_input
from meshxl.model import parse_model
from meshxl.model.basics import ModelError
from meshxl.model.load import parse_unexpanded
from meshxl.model.text import MAX_DEPTH, ModelForm, json_form, model_data, read_form
from tests.unit.test_sources import GOOD

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                            allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@given(st.dictionaries(st.text(), _json, max_size=5))
def test_a_form_reads_back_as_the_data_it_was_made_of(data: dict[str, Any]) -> None:
    form = json_form(data)
    assert form is not None
    found = read_form(form)
    assert found is not None and found.data == data


@pytest.mark.parametrize("text", [
    "clusters: []\nwhen: 2026-11-25\n",          # a date
    "clusters: []\nraw: !!binary aGVsbG8=\n",    # bytes
    "clusters: []\n1: one\n",                    # a key that is not a string
    "clusters: []\nx: .nan\n",                   # not a JSON number
])
def test_no_form_for_data_json_cannot_hold(text: str) -> None:
    assert json_form(model_data(text)) is None


def test_the_form_is_read_only_beside_the_text_it_was_written_with() -> None:
    form = json_form(model_data(GOOD))
    assert form is not None
    assert isinstance(model_input(GOOD, form, 7, 7), ModelForm)
    assert model_input(GOOD, form, 8, 7) == GOOD      # the text written alone later
    assert model_input(GOOD, None, 7, None) == GOOD   # no form (an older meshxl, by hand)
    assert model_input(GOOD, b"[1, 2]", 7, 7) == GOOD  # not a form
    assert model_input(GOOD, b"{not json", 7, 7) == GOOD


def test_a_form_parses_to_the_same_model_as_its_text() -> None:
    form = read_form(json_form(model_data(GOOD)) or b"")
    assert form is not None
    assert parse_model(form) == parse_model(GOOD)
    assert parse_unexpanded(form) == parse_unexpanded(GOOD)


def test_a_form_is_checked_as_text_is() -> None:
    deep: Any = []
    for _ in range(MAX_DEPTH + 2):
        deep = [deep]
    with pytest.raises(ModelError, match="nested deeper"):
        model_data(ModelForm({"clusters": deep}))
    with pytest.raises(ModelError, match="not a mapping|clusters"):
        parse_model(ModelForm({"clusters": "web"}))


def test_the_mesh_watch_reads_the_form_written_with_the_text() -> None:
    keys = Keys()
    mesh = EtcdMeshSource(None, keys, lambda: None)  # type: ignore[arg-type]
    form = json_form(model_data(GOOD))
    assert form is not None
    # The form alone names another cluster: which of the two was read shows.
    other = json.loads(form)
    other["clusters"][0]["name"] = "from-the-form"
    mesh._values = {keys.model: GOOD.encode(), keys.model_form: json.dumps(other).encode()}
    mesh._revisions = {keys.model: 5, keys.model_form: 5}
    mesh._rebuild()
    assert mesh.model is not None and mesh.model.clusters[0].name == "from-the-form"
    # The text rewritten alone (etcdctl put): the stale form is passed over.
    mesh._values = {**mesh._values, keys.model: GOOD.encode() + b"\n"}
    mesh._revisions = {keys.model: 9, keys.model_form: 5}
    mesh._rebuild()
    assert mesh.model is not None and mesh.model.clusters[0].name != "from-the-form"
