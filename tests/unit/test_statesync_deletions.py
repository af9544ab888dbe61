"""The deletion record a delete through the API leaves in etcd (``meshxl.statesync.
deletions``, ``Keys.deletion``): its key and value round-trip, anything else under the
prefix is no record, and bytes from anywhere decode to a record or a ValueError."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshxl.etcd.keys import Keys
from meshxl.model.basics import NAME_PATTERN
from meshxl.statesync.deletions import MAX_RECORD, DeletionRecord
from meshxl.statesync.record import SESSION_ID

KEYS = Keys()
session_ids = st.from_regex(SESSION_ID, fullmatch=True).filter(lambda s: s not in (".", ".."))


@given(session_ids, st.integers(1, 2**63 - 1))
def test_a_deletion_key_round_trips(session: str, revision: int) -> None:
    key = KEYS.deletion("shop", session, revision)
    assert key.startswith(KEYS.deletions_prefix("shop"))
    assert not key.startswith(KEYS.sessions_prefix("shop"))  # no session to any cache
    assert KEYS.parse_deletion("shop", key) == (session, revision)
    assert KEYS.parse_deletion("shop2", key) is None


@pytest.mark.parametrize("rest", ["s1", "s1/", "/5", "s1/0", "s1/05", "s1/-5", "s1/5x",
                                  "a/b/5", "s1/²"])
def test_what_is_no_deletion_key(rest: str) -> None:
    assert KEYS.parse_deletion("shop", KEYS.deletions_prefix("shop") + rest) is None


def test_a_deletion_names_a_version() -> None:
    with pytest.raises(ValueError):
        KEYS.deletion("shop", "s1", 0)


@given(st.from_regex(NAME_PATTERN, fullmatch=True) | st.text(max_size=60),
       st.floats(allow_nan=False, allow_infinity=False))
def test_a_deletion_record_round_trips(member: str, at: float) -> None:
    """Every member name (and any text of that size, escaped) fits the bound."""
    record = DeletionRecord(member, at)
    assert DeletionRecord.decode(record.encode()) == record


@given(st.text(min_size=1, max_size=400), st.floats(allow_nan=False, allow_infinity=False))
def test_a_record_is_written_only_if_it_can_be_read(member: str, at: float) -> None:
    record = DeletionRecord(member, at)
    try:
        raw = record.encode()
    except ValueError as exc:
        assert f"(at most {MAX_RECORD})" in str(exc)
        return
    assert DeletionRecord.decode(raw) == record


@given(st.binary(max_size=MAX_RECORD + 8))
def test_any_bytes_are_a_record_or_a_value_error(raw: bytes) -> None:
    try:
        record = DeletionRecord.decode(raw)
    except ValueError:
        return
    assert isinstance(record.member, str) and math.isfinite(record.at)


@pytest.mark.parametrize("raw", [b'{"member": "a"}', b'{"member": 1, "at": 2}',
                                 b'{"member": "a", "at": true}', b'{"member": "a", "at": NaN}',
                                 b"[1]", b"\xff", b'{"member": "a", "at": 1e999}',
                                 b" " * (MAX_RECORD + 1)])
def test_what_is_no_deletion_record(raw: bytes) -> None:
    with pytest.raises(ValueError):
        DeletionRecord.decode(raw)
