"""Dapr keys as session ids (meshxl.statesync.dapr.keys): every key Dapr takes maps to
one storable session id and back, two keys never to one id, and a Dapr key under a
prefix never to a native session's id."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshxl.statesync.dapr.keys import MAX_KEY_BYTES, KeyMapping, KeyRefused, decode_key
from meshxl.statesync.record import storable_session_id, valid_session_id

keys = st.text(min_size=1, max_size=60).filter(lambda k: "||" not in k)


@settings(max_examples=300, deadline=None)
@given(keys, st.sampled_from([None, "orders", "my-app"]))
def test_a_key_maps_to_one_storable_id_and_back(key: str, prefix: str | None) -> None:
    mapping = KeyMapping(prefix)
    session_id = mapping.session_id(key)
    assert storable_session_id(session_id)
    assert mapping.key(session_id) == key
    if prefix is not None:
        assert not valid_session_id(session_id)  # never a native session's id
        assert KeyMapping("other").key(session_id) is None


@settings(max_examples=300, deadline=None)
@given(keys, keys)
def test_two_keys_never_share_an_id(a: str, b: str) -> None:
    for prefix in (None, "app"):
        mapping = KeyMapping(prefix)
        assert (mapping.session_id(a) == mapping.session_id(b)) == (a == b)


def test_with_no_prefix_a_key_of_the_id_alphabet_is_that_session() -> None:
    """keyPrefix none: the documented mapping shared with meshxl's own API."""
    none = KeyMapping(None)
    assert none.session_id("cart-1") == "cart-1"
    assert none.session_id("{user42}:cart") == "{user42}:cart"
    assert none.session_id("a b") == "a%20b" and not valid_session_id("a%20b")
    assert none.session_id("a%20b") == "a%2520b"
    assert none.session_id(".") == "%2E" and decode_key("%2E%2E") == ".."
    assert KeyMapping("app").session_id("cart/1") == "app||cart%2F1"


@pytest.mark.parametrize("key", ["", "a||b", "x" * (MAX_KEY_BYTES + 1),
                                 "\u00e9" * (MAX_KEY_BYTES // 2 + 1)])
def test_keys_dapr_refuses_are_refused(key: str) -> None:
    with pytest.raises(KeyRefused):
        KeyMapping("app").session_id(key)
