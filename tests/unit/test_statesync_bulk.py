"""The multi-session API's pure parts (meshxl.statesync.bulk): requests checked with
errors naming the item and field, states carried as JSON or base64 and read back
exactly, answers that are always valid JSON."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshxl.errors import InputError, PreconditionFailed, TooLarge
from meshxl.statesync import bulk
from meshxl.statesync.record import SessionRecord
from meshxl.statesync.writes import DELETE, PUT, Stored


def body(value: Any) -> bytes:
    return json.dumps(value).encode()


def save(*items: dict[str, Any], max_bytes: int = 1_048_576) -> list[bulk.Item]:
    return bulk.parse_save(body({"items": list(items)}), max_bytes)


def strict(text: bytes) -> Any:
    def reject(name: str) -> Any:
        raise ValueError(name)

    return json.loads(text, parse_constant=reject)


def stored(data: bytes, content_type: str) -> Stored:
    return Stored(session_id="s", etag="7", source="cache", record=SessionRecord(
        owner="a", content_type=content_type, created=1.0, updated=2.0, data=data))


# -- requests -----------------------------------------------------------------------------


def test_save_items_get_their_defaults_and_exact_bytes() -> None:
    raw = bytes(range(256))
    json_item, bytes_item, typed = save(
        {"session": "a", "data": {"b": [1, 2.5, "é"]}},
        {"session": "b", "data": base64.b64encode(raw).decode(), "encoding": "base64"},
        {"session": "c", "data": base64.b64encode(b'{ "x" : 1 }').decode(),
         "encoding": "base64", "content_type": "application/vnd.x+json",
         "if_match": 'W/"12"'},
    )
    assert json_item.data == '{"b":[1,2.5,"é"]}'.encode() and json_item.content_type == \
        "application/json"
    assert bytes_item.data == raw and bytes_item.content_type == "application/octet-stream"
    assert typed.data == b'{ "x" : 1 }' and typed.if_match == 'W/"12"'
    assert [i.index for i in (json_item, bytes_item, typed)] == [0, 1, 2]
    (fresh,) = save({"session": "d", "data": None, "if_none_match": "*"})
    assert fresh.create_only and fresh.data == b"null" and fresh.op == PUT
    assert bulk.operation(fresh) == "upsert"
    (local,) = save({"session": "e", "data": 1, "if_match": '"L3"'})
    assert local.if_match == '"L3"'


@pytest.mark.parametrize("item,field", [
    ({"session": "a/b", "data": 1}, "items[1].session"),
    ({"session": "..", "data": 1}, "items[1].session"),
    ({"session": 5, "data": 1}, "items[1].session"),
    ({"session": "x"}, "items[1].data"),
    ({"session": "x", "data": 1, "extra": 2}, "items[1].extra"),
    ({"session": "x", "data": 1, "encoding": "hex"}, "items[1].encoding"),
    ({"session": "x", "data": "a", "content_type": "text/plain"}, "items[1].encoding"),
    ({"session": "x", "data": 1, "content_type": "bad\ntype"}, "items[1].content_type"),
    ({"session": "x", "data": 1, "content_type": ""}, "items[1].content_type"),
    ({"session": "x", "data": "!!", "encoding": "base64"}, "items[1].data"),
    ({"session": "x", "data": 12, "encoding": "base64"}, "items[1].data"),
    ({"session": "x", "data": "e30", "encoding": "base64"}, "items[1].data"),  # unpadded
    ({"session": "x", "data": base64.b64encode(b"{bad").decode(), "encoding": "base64",
      "content_type": "application/json"}, "items[1].data"),
    ({"session": "x", "data": 1e400}, "items[1].data"),  # Infinity is not JSON
    ({"session": "x", "data": 1, "if_match": 12}, "items[1].if_match"),
    ({"session": "x", "data": 1, "if_match": '"1","2"'}, "items[1].if_match"),
    ({"session": "x", "data": 1, "if_match": '"-3"'}, "items[1].if_match"),
    ({"session": "x", "data": 1, "if_match": '"La"'}, "items[1].if_match"),
    ({"session": "x", "data": 1, "if_none_match": '"3"'}, "items[1].if_none_match"),
    ({"session": "x", "data": 1, "if_none_match": "*", "if_match": "*"},
     "items[1].if_none_match"),
    ("x", "items[1].session"),
    ({"session": "ok", "data": 1}, "items[1].session"),  # named twice
])
def test_bad_save_items_are_named(item: Any, field: str) -> None:
    with pytest.raises(InputError) as caught:
        save({"session": "ok", "data": 1}, item)
    assert caught.value.details["field"] == field
    assert caught.value.details["item"] == 1
    assert str(caught.value).startswith(f"{field}: ")


@pytest.mark.parametrize("raw,field", [
    (b"[1", "body"), (b"[]", "body"), (b'{"items": []}', "items"),
    (b'{"items": {}}', "items"), (b'{"items": [], "more": 1}', "more"), (b"{}", "items"),
    (b"[" * 100 + b"]" * 100, "body"),
])
def test_bad_request_bodies_are_named(raw: bytes, field: str) -> None:
    with pytest.raises(InputError) as caught:
        bulk.parse_save(raw, 100)
    assert caught.value.details["field"] == field


def test_sizes_are_bounded_per_item_count_and_transaction() -> None:
    with pytest.raises(TooLarge) as caught:
        save({"session": "a", "data": "x" * 9}, {"session": "b", "data": "x" * 99},
             max_bytes=100)
    assert caught.value.details["field"] == "items[1].data"
    assert caught.value.details["limit"] == 100
    assert len(save(*({"session": f"s{i}", "data": i} for i in range(bulk.MAX_ITEMS)))) == \
        bulk.MAX_ITEMS
    with pytest.raises(TooLarge, match="the limit is 128"):
        save(*({"session": f"s{i}", "data": i} for i in range(bulk.MAX_ITEMS + 1)))
    half = base64.b64encode(b"x" * (bulk.MAX_TXN_BYTES // 2)).decode()
    operations = [{"session": s, "data": half, "encoding": "base64"} for s in ("a", "b")]
    with pytest.raises(TooLarge) as caught:
        bulk.parse_transaction(body({"operations": operations}), 1_048_576)
    assert caught.value.details["field"] == "operations"
    assert bulk.parse_transaction(body({"operations": operations[:1]}), 1_048_576)


def test_transaction_operations() -> None:
    upsert, delete = bulk.parse_transaction(body({"operations": [
        {"session": "a", "data": {"n": 1}, "if_match": '"4"'},
        {"operation": "delete", "session": "b", "if_match": "*"}]}), 1000)
    assert (upsert.op, upsert.data, upsert.if_match) == (PUT, b'{"n":1}', '"4"')
    assert (delete.op, delete.if_match) == (DELETE, "*")
    assert [bulk.operation(w) for w in (upsert, delete)] == ["upsert", "delete"]
    for operation, field in (({"operation": "delete", "session": "b", "data": 1},
                              "operations[0].data"),
                             ({"operation": "rename", "session": "b"},
                              "operations[0].operation"),
                             ({"operation": "delete"}, "operations[0].session"),
                             ({"operation": "delete", "session": "b",
                               "if_none_match": "*"}, "operations[0].if_none_match"),
                             (["delete"], "operations[0].operation")):
        with pytest.raises(InputError) as caught:
            bulk.parse_transaction(body({"operations": [operation]}), 1000)
        assert caught.value.details["field"] == field, operation
    with pytest.raises(InputError, match=r"operations\[1\].session: session 'a' is named"):
        bulk.parse_transaction(body({"operations": [
            {"session": "a", "data": 1}, {"operation": "delete", "session": "a"}]}), 1000)


def test_bulk_get_ids() -> None:
    assert bulk.parse_get(body({"sessions": ["a", "b-1"]})) == ["a", "b-1"]
    for sessions, field in ((["a", "a"], "sessions[1]"), (["a", "x/y"], "sessions[1]"),
                            (["a", None], "sessions[1]"), ([], "sessions"),
                            ("a", "sessions")):
        with pytest.raises(InputError) as caught:
            bulk.parse_get(body({"sessions": sessions}))
        assert caught.value.details["field"] == field


# -- answers ------------------------------------------------------------------------------


@pytest.mark.parametrize("data,ok", [
    (b'{"a": [1, 2]}', True), (b" 3 ", True), (b'"\\ud800"', True),
    (b'{"a": NaN}', False), (b"[Infinity]", False), (b"\xef\xbb\xbf{}", False),
    ('{"a": 1}'.encode("utf-16"), False), (b"\xff", False), (b"", False), (b"{", False),
])
def test_embeddable(data: bytes, ok: bool) -> None:
    assert bulk.embeddable(data) is ok


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                          allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(value=JSON)
def test_json_states_round_trip_as_values(value: Any) -> None:
    (item,) = save({"session": "s", "data": value})
    assert item.data is not None
    answer = strict(bulk.read_item(stored(item.data, item.content_type)))
    assert answer["encoding"] == "json" and answer["data"] == value
    assert json.loads(item.data) == value  # what a single GET returns


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64),
       content_type=st.sampled_from(["application/json", "text/plain",
                                     "application/problem+json", "application/octet-stream"]))
def test_any_stored_bytes_read_back_exactly_in_valid_json(data: bytes,
                                                          content_type: str) -> None:
    answer = strict(bulk.read_item(stored(data, content_type)))
    assert answer["content_type"] == content_type and answer["etag"] == "7"
    if answer["encoding"] == "base64":
        assert base64.b64decode(answer["data"]) == data
    else:
        assert answer["data"] == json.loads(data)
    # What base64 carries in, it reads back byte for byte.
    (item,) = save({"session": "s", "data": base64.b64encode(data).decode(),
                    "encoding": "base64", "content_type": "application/octet-stream"})
    assert item.data == data


_TEXT = st.text(st.characters() | st.sampled_from(
    ["\x7f", "\n", "\x00", "\x1f", "\ud800", "\u00e9", "\u2028", '"', "\\", "u"])) \
    | st.just("a\\u0041")
_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                          allow_infinity=False) | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=12)


@given(_JSON_VALUES)
@settings(max_examples=400, deadline=None)
def test_stored_json_is_the_compact_utf8_encoding_byte_for_byte(value: Any) -> None:
    """A JSON state is stored compact, in UTF-8 (lone surrogates, which UTF-8 cannot
    carry, escaped), whatever its strings hold: control characters, DEL, escapes."""
    assert_stored_compact(value)


def assert_stored_compact(value: Any) -> None:
    """Saved (parsed from a request, re-encoded), ``value`` is stored as the standard
    library's compact encoding, byte for byte."""
    compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    try:
        expected = compact.encode(value).encode()
    except UnicodeEncodeError:
        expected = json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    (item,) = save({"session": "s", "data": value})
    assert item.data == expected
    assert bulk.encode_json(bulk._Where("items", 0), value) == expected  # not plain


@pytest.mark.parametrize("value", [
    1e-7, [1.5e-05, 2.5e-300], {"a": None}, "one-time", [2**64, -(2**70)], "\ud800",
    {"k": [None, 1e-5, "e-"]}, 1e16, 5e-324])
def test_stored_json_where_orjson_writes_other_bytes(value: Any) -> None:
    """Where orjson's bytes would differ from the standard library's (an exponent
    without its leading zero) or it refuses (lone surrogates, integers beyond 64 bits),
    the bytes stored are still the standard library's."""
    assert_stored_compact(value)


@pytest.mark.parametrize("data", [b"NaN", b"[Infinity]", b'{"x": -Infinity}', b"1e400",
                                  b"[1, -1e999]"])
def test_nan_and_infinity_are_refused_not_stored_as_null(data: bytes) -> None:
    with pytest.raises(InputError, match="not JSON") as caught:
        bulk.parse_save(b'{"items": [{"session": "s", "data": ' + data + b"}]}", 1 << 20)
    assert caught.value.details["field"] == "items[0].data"


def test_lone_surrogates_are_stored_escaped() -> None:
    (item,) = save({"session": "s", "data": {"k": "\ud800x"}})
    assert item.data == b'{"k":"\\ud800x"}'
    assert strict(bulk.read_item(stored(item.data, "application/json")))["data"] == {
        "k": "\ud800x"}


def test_error_items_carry_what_the_single_api_answers() -> None:
    failure = PreconditionFailed("session 's' is at revision 9, not \"3\"", current=9)
    assert bulk.error_fields("s", failure) == {
        "session": "s", "status": 412, "error": "session 's' is at revision 9, not \"3\"",
        "current": 9}
