"""meshxl.httpbase, what both HTTP stacks share: bounded JSON (check_json gives loads'
verdict at orjson's speed), the error family's statuses, the error body's shape."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshxl import errors, httpbase

# -- check_json: loads' verdict, at orjson's speed ----------------------------------------


def _verdict(check: Any, data: bytes) -> str | None:
    try:
        check(data)
    except httpbase.BadJson as exc:
        return str(exc)
    return None


_JSONISH = st.lists(st.sampled_from([
    b"{", b"}", b"[", b"]", b",", b":", b'"', b"a", b"\\", b"\\u", b"d800", b"dc00", b"0",
    b"1", b"-", b".", b"e", b"E", b"+", b"99999999999999999999", b"1e400", b"NaN",
    b"Infinity", b"true", b"null", b" ", b"\n", b"\x00", b"\x1f", b"\xef\xbb\xbf", b"\xff",
    b"\xc3\xa9", b'"k"', b'{"a":1}', b"[[[[", b"]]]]"]), max_size=24).map(b"".join)


@settings(max_examples=2000, deadline=None)
@given(data=_JSONISH | st.binary(max_size=32)
       | st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                      lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                      max_leaves=10).map(lambda v: json.dumps(v).encode()))
def test_check_json_accepts_exactly_what_loads_accepts(data: bytes) -> None:
    """The fast check of a PUT's state says what the standard library says: the same
    verdict for NaN, numbers beyond 64 bits, lone surrogates, byte order marks, UTF-16,
    nesting, and anything else generated."""
    assert _verdict(httpbase.check_json, data) == _verdict(httpbase.loads, data)


@pytest.mark.parametrize("data", [
    b'{"x": NaN}', b"[Infinity]", b"1e400", b"123456789012345678901234567890",
    b'"\\ud800"', b"\xef\xbb\xbf{}", '{"a": 1}'.encode("utf-16"), b"[" * 65 + b"]" * 65,
    b"[" * 64 + b"]" * 64, b"{", b"", b"\xff"])
def test_check_json_on_what_orjson_and_the_standard_library_disagree(data: bytes) -> None:
    assert _verdict(httpbase.check_json, data) == _verdict(httpbase.loads, data)


def test_an_error_answer_is_the_family_members_status_with_its_details() -> None:
    assert httpbase.error_answer(errors.PreconditionFailed("stale", current=7), "/p") == \
        (412, {"error": "stale", "status": 412, "current": 7})
    # A bug's answer names its type only: the message may hold what must not leave.
    assert httpbase.error_answer(KeyError("secret"), "/p") == \
        (500, {"error": "internal error: KeyError", "status": 500, "path": "/p"})


def test_reason_phrases() -> None:
    assert httpbase.REASONS[404] == b"Not Found" and 599 not in httpbase.REASONS
