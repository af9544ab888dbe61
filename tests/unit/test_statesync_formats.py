"""Every format the sidecar stores reads back (hypothesis round trips), and what it cannot
read is refused with a ValueError, never another exception.

Formats: the session record, the member registration (with problem reports), the sync
statistics, the failover records it reads and the trace context it keeps; plus the
entry checks (trace context, content type, problem detail, bounded JSON).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from aetcd import rpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshxl import httpbase
from meshxl.errors import InputError
from meshxl.etcd.keys import Keys
from meshxl.model import Registration, check_member_address
from meshxl.operator.views.read import load_record
from meshxl.statesync.api import MAX_PROBLEM_DETAIL, _problem_detail
from meshxl.statesync.cache import SessionCache
from meshxl.statesync.membership import registration_document
from meshxl.statesync.mesh_reads import sync_stats_value
from meshxl.statesync.record import (
    HEADER_LIMIT,
    SessionRecord,
    served_content_type,
    valid_content_type,
    valid_session_id,
    valid_traceparent,
)
from meshxl.statesync.tracing import TakeoverTracer, _offer

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

names = st.from_regex(r"[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?", fullmatch=True)
hexes = st.text("0123456789abcdef", min_size=1)
traceparents = st.builds(
    lambda v, t, s, f: f"{v}-{t}-{s}-{f}",
    st.from_regex(r"[0-9a-e][0-9a-f]", fullmatch=True),
    st.from_regex(r"[0-9a-f]{32}", fullmatch=True).filter(lambda t: t != "0" * 32),
    st.from_regex(r"[0-9a-f]{16}", fullmatch=True).filter(lambda s: s != "0" * 16),
    st.from_regex(r"[0-9a-f]{2}", fullmatch=True))
content_types = st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1,
                        max_size=255)
times = st.floats(min_value=0, max_value=4e9, allow_nan=False)
records = st.builds(SessionRecord, owner=names, content_type=content_types, created=times,
                    updated=times, data=st.binary(max_size=2000),
                    traceparent=st.none() | traceparents,
                    ttl=st.none() | st.just(-1) | st.integers(1, 10 * 365 * 86_400))


@FAST
@given(records)
def test_session_record_round_trips(record: SessionRecord) -> None:
    raw = record.encode()
    assert raw.index(b"\n") < HEADER_LIMIT
    assert SessionRecord.decode(raw) == record


@FAST
@given(st.binary(max_size=300) | st.builds(lambda h, d: h + b"\n" + d,
                                           st.binary(max_size=200), st.binary(max_size=20)))
def test_session_record_decode_refuses_junk_with_value_error(raw: bytes) -> None:
    try:
        record = SessionRecord.decode(raw)
    except ValueError:
        return
    assert SessionRecord.decode(record.encode()) == record  # what decodes re-encodes


@FAST
@given(st.dictionaries(st.sampled_from(["owner", "type", "created", "updated",
                                        "traceparent", "ttl", "x"]),
                       st.none() | st.booleans() | st.integers() | st.floats()
                       | st.text(max_size=80) | st.lists(st.integers(), max_size=2)),
       st.binary(max_size=20))
def test_session_record_decode_checks_every_header_field(header: dict[str, Any],
                                                         data: bytes) -> None:
    raw = json.dumps(header).encode() + b"\n" + data
    try:
        record = SessionRecord.decode(raw)
    except ValueError:
        return
    assert isinstance(record.owner, str) and isinstance(record.content_type, str)
    assert math.isfinite(record.created) and math.isfinite(record.updated)
    assert record.traceparent is None or valid_traceparent(record.traceparent)
    assert record.ttl is None or record.ttl == -1 or record.ttl > 0
    SessionRecord.decode(record.encode())


def test_a_records_own_ttl_ends_it_exactly_and_minus_one_never() -> None:
    """A per-write TTL (Dapr's ttlInSeconds) is kept in the record's header and ends it
    ``ttl`` seconds after the write; -1 keeps it; none: the cluster's TTL decides."""
    timed = SessionRecord(owner="a", content_type="text/plain", created=5.0, updated=10.0,
                          data=b"x", ttl=2)
    assert SessionRecord.decode(timed.encode()) == timed
    assert timed.expires == 12.0
    assert not timed.expired(11.999) and timed.expired(12.0)
    kept = SessionRecord(owner="a", content_type="text/plain", created=5.0, updated=10.0,
                         data=b"x", ttl=-1)
    assert kept.expires is None and not kept.expired(1e12)
    plain = SessionRecord(owner="a", content_type="text/plain", created=5.0,
                          updated=10.0, data=b"x")
    assert b"ttl" not in plain.encode()  # the API's own records are unchanged
    for bad in (0, -2, 10 * 365 * 86_400 + 1):
        with pytest.raises(ValueError):
            SessionRecord(owner="a", content_type="t/p", created=1.0, updated=1.0,
                          data=b"", ttl=bad)


@FAST
@given(st.text(max_size=120) | traceparents)
def test_trace_context_is_kept_only_when_valid(value: str) -> None:
    kept = valid_traceparent(value)
    assert kept is None or (kept == value and len(value) == 55)
    if kept is None:
        with pytest.raises(ValueError):
            SessionRecord(owner="a", content_type="text/plain", created=1.0, updated=1.0, data=b"",
                          traceparent=value)


@pytest.mark.parametrize("value", [
    "00-" + "a" * 6000, "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", ""])
def test_invalid_trace_contexts(value: str) -> None:
    assert valid_traceparent(value) is None


@FAST
@given(st.text(max_size=300))
def test_content_type_check_bounds_what_is_stored(value: str) -> None:
    if valid_content_type(value):
        SessionRecord(owner="a", content_type=value, created=1.0, updated=1.0, data=b"").encode()
        assert len(value) <= 255 and "/" in value and value.isascii() and value.isprintable()
    else:
        assert served_content_type(value) == "application/octet-stream"


@pytest.mark.parametrize("value,ok", [
    ("application/json", True), ("text/plain; charset=utf-8", True),
    ('text/plain;charset="a \\"b\\""', True), ("application/vnd.api+json", True),
    ("a/b;x=y; z=w", True), ("#3](j", False), ("", False), ("text", False),
    ("text/", False), ("/json", False), ("text/plain;", False), ("text/plain; charset", False),
    ("text/pl ain", False), ("text/plain\n", False), ("x/" + "y" * 254, False),
    ('a/b;c="open', False), ("a/b;c=\u00e9", False)])
def test_a_content_type_is_a_media_type(value: str, ok: bool) -> None:
    """Sent back as the session's Content-Type: RFC 9110's type/subtype and parameters,
    whatever else is printable is refused (a client could not read it as a media type)."""
    assert valid_content_type(value) is ok
    assert served_content_type(value) == (value if ok else "application/octet-stream")


problems = st.dictionaries(
    st.from_regex(r"[A-Za-z0-9._~-]{1,63}", fullmatch=True).filter(valid_session_id),
    st.fixed_dictionaries({"detail": st.text(max_size=MAX_PROBLEM_DETAIL).filter(
        str.isprintable), "since": st.just("2026-01-01T00:00:00.000+00:00")}),
    max_size=32)


member_addresses = (st.ip_addresses().map(str)
                    | st.from_regex(r"[a-z]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z]{1,10}){0,3}",
                                    fullmatch=True))


@FAST
@given(address=st.from_regex(r"[a-z0-9.:-]{1,60}", fullmatch=True))
def test_registration_refuses_what_the_control_plane_refuses(address: str) -> None:
    """A registration decodes exactly when its address is a valid member address."""
    doc = registration_document(address=address, port=80, site=None, weight=None,
                                ready=True, problems={}, sidecar="127.0.0.1:7070",
                                pid=1, since="s", updated="u")
    try:
        check_member_address(address)
    except ValueError:
        with pytest.raises(ValueError, match="registration address"):
            Registration.from_dict(doc)
    else:
        assert Registration.from_dict(doc).address == address


@FAST
@given(address=member_addresses,
       port=st.integers(1, 65535), site=st.none() | names,
       weight=st.none() | st.integers(1, 10_000), ready=st.booleans(), problems=problems,
       overload=st.none() | st.fixed_dictionaries({
           "detail": st.text(max_size=MAX_PROBLEM_DETAIL).filter(str.isprintable),
           "since": st.just("2026-01-01T00:00:00.000+00:00")}),
       sync_delay=st.just(0.0) | st.floats(0.001, 86_400.0),
       istio=st.none() | st.fixed_dictionaries({
           "tls_mode": st.sampled_from(["", "istio", "disabled"]),
           "workload": st.builds(";".join, st.tuples(names, names, names,
                                                     st.just("") | names))}))
def test_registration_round_trips(address: str, port: int, site: str | None,
                                  weight: int | None, ready: bool,
                                  problems: dict[str, dict[str, str]],
                                  overload: dict[str, str] | None, sync_delay: float,
                                  istio: dict[str, str] | None) -> None:
    doc = registration_document(address=address, port=port, site=site, weight=weight,
                                ready=ready, problems=problems, sidecar="127.0.0.1:7070",
                                pid=1, since="s", updated="u", overload=overload,
                                sync_delay=sync_delay, istio=istio)
    raw = json.dumps(doc, sort_keys=True).encode()
    back = json.loads(raw)
    assert back == doc and back["problem_details"] == problems
    reg = Registration.from_dict(back)
    assert (reg.address, reg.port, reg.site, reg.weight, reg.ready) == (
        address, port, site, weight, ready)
    assert reg.problems == tuple(sorted(problems))
    assert reg.overloaded is (overload is not None)
    assert reg.sync_delay == sync_delay and ("sync_delay" in doc) is (sync_delay > 0)
    assert (None if reg.istio is None else vars(reg.istio)) == istio
    assert len(raw) < 200_000  # far below etcd's request limit, even at the bounds


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                          allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10),
                                                                inner, max_size=4),
    max_leaves=20)


@FAST
@given(st.dictionaries(st.text(max_size=20), json_values, max_size=10), times)
def test_sync_statistics_round_trip(stats: dict[str, Any], published: float) -> None:
    assert load_record(sync_stats_value(stats, published)) == {**stats, "published": published}


@FAST
@given(st.binary(max_size=200) | st.builds(lambda m, t: json.dumps(
    {"member": m, "traceparent": t}).encode(), json_values, json_values | traceparents))
def test_failover_records_of_any_shape_are_ignored_or_used(raw: bytes) -> None:
    tracer = TakeoverTracer("c", "a")
    _offer(tracer, raw)  # never raises


@FAST
@given(json_values)
def test_bounded_json_reads_back_what_is_not_too_deep(value: Any) -> None:
    raw = json.dumps(value).encode()
    assert httpbase.loads(raw) == value


@pytest.mark.parametrize("depth", [65, 1000, 200_000])
def test_bounded_json_refuses_deep_nesting(depth: int) -> None:
    for raw in (b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth):
        with pytest.raises(httpbase.BadJson, match="nests deeper"):
            httpbase.loads(raw)
    assert httpbase.json_depth(json.loads(b"[" * 64 + b"]" * 64)) == 64


@FAST
@given(st.binary(max_size=500))
def test_bounded_json_refuses_junk_with_bad_json(raw: bytes) -> None:
    try:
        httpbase.loads(raw)
    except httpbase.BadJson:
        pass


@FAST
@given(st.binary(max_size=1200) | st.builds(
    lambda d: json.dumps({"detail": d}).encode(), json_values | st.text(max_size=1100)),
    st.sampled_from(["application/json", "text/plain", ""]))
def test_problem_detail_is_bounded_printable_text(raw: bytes, content_type: str) -> None:
    try:
        detail = _problem_detail(raw, content_type)
    except InputError as exc:
        assert httpbase.http_status(exc) == 400
        return
    assert isinstance(detail, str) and len(detail) <= MAX_PROBLEM_DETAIL
    assert detail.isprintable()


PREFIX = "/meshxl/v1/sessions/c/"


@FAST
@given(st.binary(min_size=1, max_size=40), st.binary(max_size=100))
def test_cache_skips_foreign_keys_and_records(suffix: bytes, value: bytes) -> None:
    cache = SessionCache(None, PREFIX)  # type: ignore[arg-type]  # never touches etcd
    kv = rpc.KeyValue(key=PREFIX.encode() + suffix, value=value, mod_revision=3)
    cache._apply(rpc.Event(type=rpc.Event.PUT, kv=kv))
    assert cache.applied == 3
    for session_id, entry in cache.entries.items():
        assert valid_session_id(session_id) and entry.revision == 3
    assert len(cache.entries) + cache.bad_records == 1
    assert set(cache.undecodable) <= {suffix.decode(errors="replace")}


def test_cache_counts_undecodable_sessions_until_replaced_or_deleted() -> None:
    cache = SessionCache(None, PREFIX)  # type: ignore[arg-type]
    good = SessionRecord(owner="a", content_type="text/plain", created=1.0, updated=1.0,
                         data=b"x").encode()
    for revision, (kind, value) in enumerate([("PUT", good), ("PUT", b"junk"),
                                              ("PUT", good), ("PUT", b"junk"),
                                              ("DELETE", b"")], start=2):
        kv = rpc.KeyValue(key=(PREFIX + "s").encode(), value=value, mod_revision=revision)
        cache._apply(rpc.Event(type=rpc.Event.PUT if kind == "PUT" else rpc.Event.DELETE,
                                kv=kv))
        broken = value == b"junk"
        assert cache.undecodable == ({"s": revision} if broken else {})
        assert (cache.get("s") is None) == (broken or kind == "DELETE")


def test_session_ids_in_keys_are_validated() -> None:
    with pytest.raises(ValueError):
        Keys().session("c", "a/b")
