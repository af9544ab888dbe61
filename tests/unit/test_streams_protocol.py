"""The resumable stream protocol's frames and a stream's record: property round trips and
hostile input (docs/streams.md). Pure: no socket, no process."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshxl.streams.protocol import (
    ACK,
    END,
    ERROR,
    MESSAGE,
    OPEN,
    READY,
    REFUSALS,
    RESUME,
    Frame,
    Limits,
    ProtocolError,
    compact_json,
    decode_binary,
    decode_frame,
    encode_binary,
    encode_frame,
    new_token,
    refusal_of_close,
    valid_token,
)
from meshxl.streams.record import StateText, StreamRecord

SEQ = st.integers(min_value=1, max_value=(1 << 53) - 1)
COUNT = st.integers(min_value=0, max_value=(1 << 53) - 1)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 53), max_value=1 << 53)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=4),
    max_leaves=12)
TOKENS = st.builds(lambda _: new_token(), st.integers())


@given(st.one_of(
    st.builds(lambda s, d: Frame(MESSAGE, seq=s, payload=d), SEQ, JSON),
    st.builds(lambda s, a, d: Frame(MESSAGE, seq=s, payload=d, ack=a), SEQ, COUNT, JSON),
    st.builds(lambda s: Frame(ACK, seq=s), COUNT),
    st.builds(lambda s: Frame(END, seq=s), COUNT),
    st.just(Frame(OPEN)),
    st.builds(lambda t, r: Frame(RESUME, token=t, recv=r), TOKENS, COUNT),
    st.builds(lambda t, c, o: Frame(READY, token=t, consumed=c, last=o), TOKENS, COUNT, COUNT),
    st.builds(lambda r: Frame(ERROR, refusal=r, message=r.meaning), st.sampled_from(REFUSALS)),
))
def test_every_frame_round_trips(frame: Frame) -> None:
    assert decode_frame(encode_frame(frame)) == frame


@given(SEQ, st.binary(max_size=64))
def test_binary_messages_round_trip(seq: int, data: bytes) -> None:
    assert decode_binary(encode_binary(seq, data)) == (seq, data)


@given(SEQ, st.binary(max_size=64), st.none() | COUNT)
def test_binary_messages_round_trip_in_text_frames(seq: int, data: bytes,
                                                   ack: int | None) -> None:
    """Where frames are text lines (an event stream's upload), bytes travel as base64."""
    text = encode_frame(Frame(MESSAGE, seq=seq, payload=data, ack=ack), text_bytes=True)
    assert "\n" not in text
    assert decode_frame(text) == Frame(MESSAGE, seq=seq, payload=data, ack=ack)
    with pytest.raises(ValueError):
        encode_frame(Frame(MESSAGE, seq=seq, payload=data))  # a WebSocket's binary frame


@pytest.mark.parametrize("text", [
    "", "[]", "null", '{"t": "x"}', '{"t": "m", "s": 0, "d": 1}', '{"t": "m", "s": 1}',
    '{"t": "m", "s": 1, "b": "not base64!"}', '{"t": "m", "s": 1, "b": 5}',
    '{"t": "m", "s": true, "d": 1}', '{"t": "m", "s": 9007199254740992, "d": 1}',
    '{"t": "a", "s": -1}', '{"t": "resume", "id": "short", "recv": 0}',
    '{"t": "resume", "id": "AAAAAAAAAAAAAAAAAAAAA+", "recv": 0}',
    '{"t": "error", "code": "nope"}', '{"t": "m", "s": 1, "d": NaN}',
    "[" * 10_000 + "]" * 10_000, '{"t": "m", "s": 1.5, "d": 1}',
    '{"t": "m", "s": 1, "a": -1, "d": 1}', '{"t": "m", "s": 1, "a": "3", "d": 1}',
    '{"t": "m", "s": 1, "a": null, "d": 1}', '{"t": "m", "s": 1, "a": 2.5, "d": 1}',
])
def test_malformed_frames_are_protocol_errors(text: str) -> None:
    with pytest.raises(ProtocolError):
        decode_frame(text)


def test_binary_frames_need_their_number_first() -> None:
    for frame in (b"", b"\x00" * 7, b"\x00" * 8):  # too short; message number 0
        with pytest.raises(ProtocolError):
            decode_binary(frame)


def test_tokens_are_128_random_bits_in_base64url() -> None:
    tokens = {new_token() for _ in range(1000)}
    assert len(tokens) == 1000 and all(valid_token(t) for t in tokens)
    assert not valid_token(next(iter(tokens))[:-1] + "=")
    assert not valid_token("A" * 21 + "B")  # 128 bits and a stray: not canonical


def test_each_refusal_has_its_own_close_code_in_the_private_range() -> None:
    codes = [r.close_code for r in REFUSALS]
    assert len(set(codes)) == len(codes) and all(4000 <= c <= 4999 for c in codes)
    for refusal in REFUSALS:
        assert refusal_of_close(refusal.close_code) is refusal
    assert refusal_of_close(1000) is None and refusal_of_close(None) is None


def test_moved_is_no_failure_of_the_member_that_says_it() -> None:
    """``moved`` is the protocol at work during every move (a drained member hands its
    streams on; an acknowledgement or a POST reaches a member that does not serve its
    stream). Said as a 5xx or UNAVAILABLE, Envoy sent it again on another member (the
    backup site), outlier detection counted it towards ejecting the member, and the
    judge of predictive failover a failure of the member: the new owner of a drain's
    streams was ejected, or degraded."""
    import grpc

    from meshxl.model.traffic import GRPC_RETRY_CONDITIONS
    from meshxl.streams.grpc_client import _RESUMABLE
    from meshxl.streams.protocol import MOVED
    from meshxl.xds.accesslog import http_sample

    assert 400 <= MOVED.http_status < 500  # no gateway error, no 5xx
    assert MOVED.grpc_status.lower().replace("_", "-") not in GRPC_RETRY_CONDITIONS
    code = getattr(grpc.StatusCode, MOVED.grpc_status)
    assert http_sample(_logged_grpc(code.value[0])) == ("demo", "127.0.0.2:80", 0.001, False)
    assert http_sample(_logged_grpc(grpc.StatusCode.UNAVAILABLE.value[0]))[3]  # counted
    # ...and the client library still resumes after it, its name in the trailers or not.
    assert {getattr(grpc.StatusCode, r.grpc_status) for r in REFUSALS if r.retry} \
        <= _RESUMABLE


def _logged_grpc(status: int) -> Any:
    """Envoy's access log entry of a gRPC call that ended with ``status`` in its
    trailers (what the judge reads): an answer of 200 with the status in its trailers."""
    from tests.harness.als import entry

    logged = entry("demo", "127.0.0.2:80", 0.001)
    logged.response.response_trailers["grpc-status"] = str(status)
    return logged


@pytest.mark.parametrize("bad", [
    {"max_unacked_bytes": 0}, {"max_message_bytes": 10, "max_unacked_bytes": 5},
    {"lag_timeout": float("inf")}, {"ack_delay": float("nan")}, {"ack_every": True},
    {"max_unacked_bytes": 2 << 20}, {"detached_timeout": -1},
])
def test_limits_refuse_what_cannot_work(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Limits(**bad)


RECORDS = st.builds(
    lambda session, kind, epoch, consumed, acked, payloads, done, state: StreamRecord(
        session=session, kind=kind, epoch=epoch, consumed=consumed,
        out=acked + len(payloads), acked=acked, done=done, state=state, created=1.5,
        journal=[(acked + 1 + i, p) for i, p in enumerate(payloads)]),
    st.text(min_size=1, max_size=20), st.sampled_from(["websocket", "sse", "grpc"]),
    st.integers(0, 1000), st.integers(0, 1000), st.integers(0, 1000),
    st.lists(JSON | st.binary(max_size=16), max_size=6), st.booleans(), JSON)


@settings(max_examples=200)
@given(RECORDS)
def test_records_round_trip(record: StreamRecord) -> None:
    assert StreamRecord.decode(record.encode()) == record
    assert StreamRecord.decode(json.loads(record.encode())) == record


@given(RECORDS, st.integers(0, 2000))
def test_an_acknowledgement_drops_exactly_what_the_client_has(record: StreamRecord,
                                                              seq: int) -> None:
    before = list(record.journal)
    record.acknowledge(seq)
    assert record.journal == [(s, p) for s, p in before if s > seq]
    assert record.acked == max(min(seq, record.out), record.acked)
    assert StreamRecord.decode(record.encode()) == record


def _whole(record: StreamRecord) -> dict[str, Any]:
    """The record's text as one JSON encoding of all its fields makes it."""
    return {"v": 1, "session": record.session, "kind": record.kind, "epoch": record.epoch,
            "in": record.consumed, "out": record.out, "acked": record.acked,
            "done": record.done, "failure": record.failure, "state": record.state,
            "created": record.created,
            "journal": [[s, "b", base64.b64encode(p).decode()] if isinstance(p, bytes)
                        else [s, "j", p] for s, p in record.journal]}


@given(RECORDS, st.integers(0, 2000), st.lists(JSON | st.binary(max_size=16), max_size=4))
def test_a_records_text_is_the_same_whether_its_entries_are_made_once_or_anew(
        record: StreamRecord, seq: int, more: list[Any]) -> None:
    """Each journal entry's text is made once and shared by the stream's next records
    (they only add messages at the end and drop acknowledged ones): the record's text
    is byte for byte the one a single encoding of the whole record gives."""
    first = record.encode()
    assert first == compact_json(_whole(record)).encode()
    assert record.encode() == first
    live = StreamRecord(session=record.session, kind=record.kind, epoch=record.epoch,
                        consumed=record.consumed, out=record.out, acked=record.acked,
                        done=record.done, created=record.created, journal=record.journal,
                        state=StateText(compact_json(record.state)))  # a live stream's
    assert live.encode() == first
    later = StreamRecord(session=record.session, kind=record.kind, epoch=record.epoch,
                         consumed=record.consumed, out=record.out + len(more),
                         acked=record.acked, done=record.done, state=record.state,
                         created=record.created, fragments=record.fragments,
                         journal=[*record.journal, *((record.out + 1 + i, p)
                                                     for i, p in enumerate(more))])
    later.acknowledge(seq)
    assert later.encode() == compact_json(_whole(later)).encode()
    assert set(later.fragments) == {s for s, _ in later.journal}


def test_a_journal_entry_is_encoded_once_across_the_streams_records(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import meshxl.streams.record as module

    encoded: list[bytes] = []
    real = module.base64.b64encode
    monkeypatch.setattr(module.base64, "b64encode",
                        lambda data: encoded.append(bytes(data)) or real(data))
    record = StreamRecord(session="s", kind="grpc", out=2, journal=[(1, b"a"), (2, b"b")])
    record.encode()
    nxt = StreamRecord(session="s", kind="grpc", out=3, fragments=record.fragments,
                       journal=[*record.journal, (3, b"c")])
    nxt.encode()
    nxt.encode()
    assert encoded == [b"a", b"b", b"c"]


@pytest.mark.parametrize("change", [
    {"v": 2}, {"session": ""}, {"kind": "tcp"}, {"out": 2}, {"acked": 5},
    {"journal": [[2, "j", 1]]}, {"journal": [[1, "x", 1]]}, {"journal": [[1, "b", "%%"]]},
    {"epoch": -1}, {"created": "now"}, {"done": "yes"}, {"failure": "oops"},
])
def test_a_damaged_record_is_refused(change: dict[str, Any]) -> None:
    doc = json.loads(StreamRecord(session="s", kind="websocket", out=1,
                                  journal=[(1, "x")]).encode())
    doc.update(change)
    with pytest.raises(ValueError):
        StreamRecord.decode(json.dumps(doc))
