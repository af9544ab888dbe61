"""A merge patch (RFC 7386) of a stored session keeps every value it does not touch as
the application wrote it, and nothing but JSON is ever stored: property tests over
generated documents whose numbers are written in every way JSON allows."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshxl import httpbase
from meshxl.statesync import mergepatch

# JSON number literals as applications write them: exponents in either case, signs,
# leading and trailing zeros in fractions, -0.
_number = st.one_of(
    st.integers(-10**30, 10**30).map(str),
    st.from_regex(r"-?(0|[1-9][0-9]{0,8})(\.[0-9]{1,8})?([eE][+-]?[0-9]{1,3})?",
                  fullmatch=True).filter(lambda t: abs(float(t)) < float("inf")),
    st.sampled_from(["-0", "-0.0", "1E2", "1e-07", "1.10", "100.0", "0e0"]),
)
_text = st.text(max_size=12)
_leaf = st.one_of(_number.map(lambda t: ("num", t)), _text.map(lambda t: ("str", t)),
                  st.sampled_from([("lit", "true"), ("lit", "false"), ("lit", "null")]))


def _render(tree: Any) -> str:
    """A document as text: leaves as written, compact, UTF-8 strings."""
    if isinstance(tree, dict):
        return "{" + ",".join(f"{json.dumps(k, ensure_ascii=False)}:{_render(v)}"
                              for k, v in tree.items()) + "}"
    if isinstance(tree, list):
        return "[" + ",".join(_render(v) for v in tree) + "]"
    kind, text = tree
    return json.dumps(text, ensure_ascii=False) if kind == "str" else text


_tree = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(_text, inner, max_size=4), max_leaves=16)
_document = st.dictionaries(st.text(min_size=1, max_size=8), _tree, min_size=1, max_size=6)


@settings(max_examples=300, deadline=None)
@given(document=_document, key=st.text(min_size=1, max_size=8), value=st.integers())
def test_untouched_members_are_kept_byte_for_byte(document: dict[str, Any], key: str,
                                                  value: int) -> None:
    text = _render(document)
    merged = mergepatch.merge(text.encode(), {key: value}).decode()
    expected = dict(document)
    expected[key] = ("num", str(value))
    assert merged == _render(expected)
    assert json.loads(merged)[key] == value


@settings(max_examples=200, deadline=None)
@given(document=_document)
def test_a_patch_removing_a_member_keeps_the_rest(document: dict[str, Any]) -> None:
    key = next(iter(document))
    merged = mergepatch.merge(_render(document).encode(), {key: None})
    rest = {k: v for k, v in document.items() if k != key}
    assert merged.decode() == _render(rest)


@pytest.mark.parametrize("stored", [b'{"n":NaN}', b'{"n":Infinity}', b'{"n":1e400}',
                                    b'{"n":-Infinity}', b"[1,", b"\xff"])
def test_a_stored_document_that_is_not_json_is_not_patched(stored: bytes) -> None:
    with pytest.raises(ValueError):
        mergepatch.merge(stored, {"a": 1})


@pytest.mark.parametrize("body", [b'{"n":1e400}', b'{"n":-1e999}', b'{"n":NaN}',
                                  b'{"n":Infinity}', b'[-Infinity]'])
def test_non_finite_numbers_are_not_json_anywhere(body: bytes) -> None:
    """The one parser of request bodies refuses them, so no write path can store one;
    the fast check of a PUT's JSON state agrees."""
    with pytest.raises(httpbase.BadJson, match="not JSON"):
        httpbase.loads(body)
    with pytest.raises(httpbase.BadJson):
        httpbase.check_json(body)


def test_a_patch_keeps_numbers_and_writes_utf8() -> None:
    merged = mergepatch.merge('{"a":1E2,"b":-0,"c":1.10,"s":"é\\u00e9"}'.encode(),
                              {"d": [1.5, "ü"], "c": None})
    assert merged == '{"a":1E2,"b":-0,"s":"éé","d":[1.5,"ü"]}'.encode()
