"""The clients' answer parsing (meshxl.client.framing.AnswerReader, under both the
async transport and the blocking client) against h11, the reference implementation of
RFC 9112's framing, on generated inputs: sequences of pipelined answers of any size
(bodies past 64 KiB included), framed by Content-Length or chunked (extensions,
trailers), after interim 1xx answers, delivered in any pieces; then the same cut short
by a close at any point, and the framings a hostile peer sends.

The property: the reader hands over exactly the answers h11 completes, with the same
status, headers and body, and refuses (or finds incomplete at the close) exactly what
h11 refuses. Two deliberate differences are asserted as such: an answer framed by
neither Content-Length nor chunked (its end is the close, where a cut could not be told
from its end) is refused where h11 reads until the close, and heads, bodies and interim
answers are bounded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshxl.client.framing import HEAD_SLICE, MAX_HEAD, MAX_INTERIM, AnswerReader, Broken
from meshxl.client.plans import Answer

EXAMPLES = int(os.environ.get("MESHXL_FUZZ_EXAMPLES", "100"))

_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                 "!#$%&'*+-.^_`|~", min_size=1, max_size=16)
_VISIBLE = "".join(chr(c) for c in range(0x21, 0x7f))
_VALUE = st.builds(lambda first, rest: first + rest.rstrip(),
                   st.sampled_from(_VISIBLE), st.text(alphabet=_VISIBLE + " \t", max_size=30))
_RESERVED = {"content-length", "transfer-encoding", "connection", "upgrade", "keep-alive",
             "proxy-connection", "trailer"}
# Bodies: mostly small, some around and past the reads' and the old head bound's sizes.
_BODY_SIZES = st.one_of(st.integers(0, 300), st.integers(300, 5000),
                        st.sampled_from([4200, 65535, 65536, 65537, 70_000, 200_000]))


@dataclass(frozen=True)
class Wire:
    """Answers as bytes, and what h11 and the reader should make of them."""

    data: bytes
    expected: list[Answer]
    closes: bool  # the last answer ends the connection


def _chunked(body: bytes, sizes: list[int], extensions: bool,
             trailers: list[tuple[str, str]]) -> bytes:
    out, pos, i = [], 0, 0
    while pos < len(body):
        size = max(1, sizes[i % len(sizes)]) if sizes else len(body)
        piece = body[pos:pos + size]
        ext = ";a=b" if extensions and i % 2 else ""
        out.append(b"%x%s\r\n%s\r\n" % (len(piece), ext.encode(), piece))
        pos += size
        i += 1
    out.append(b"0\r\n" + b"".join(f"{n}: {v}\r\n".encode() for n, v in trailers) + b"\r\n")
    return b"".join(out)


@st.composite
def answer(draw: st.DrawFn, last: bool) -> tuple[bytes, Answer, bool]:
    status = draw(st.one_of(st.integers(200, 599), st.sampled_from([200, 201, 204, 304,
                                                                    404, 409, 412])))
    names = draw(st.lists(_TOKEN.filter(lambda n: n.lower() not in _RESERVED), max_size=6,
                          unique_by=str.lower))
    headers = {name: draw(_VALUE) for name in names}
    size = 0 if status in (204, 304) else draw(_BODY_SIZES)
    body = draw(st.binary(min_size=size, max_size=size)) if size < 5000 else \
        bytes(draw(st.integers(0, 255)) for _ in range(1)) * size
    chunked = status not in (204, 304) and draw(st.booleans())
    closes = last and draw(st.booleans())
    interim = draw(st.lists(st.sampled_from([100, 102, 103]), max_size=3))
    reason = draw(st.sampled_from(["OK", "Some Reason", ""]))
    head = "".join(f"HTTP/1.1 {code} Info\r\nX-Hint: {code}\r\n\r\n" for code in interim)
    head += f"HTTP/1.1 {status} {reason}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    seen = {name.lower(): value for name, value in headers.items()}
    if closes:
        head += "Connection: close\r\n"
        seen["connection"] = "close"
    if chunked:
        head += "Transfer-Encoding: chunked\r\n"
        seen["transfer-encoding"] = "chunked"
        sizes = draw(st.lists(st.integers(1, 70_000), min_size=1, max_size=4))
        trailers = draw(st.lists(st.tuples(_TOKEN.filter(
            lambda n: n.lower() not in _RESERVED), _VALUE), max_size=2))
        payload = _chunked(body, sizes, draw(st.booleans()), trailers)
    else:
        head += f"Content-Length: {len(body)}\r\n"
        seen["content-length"] = str(len(body))
        payload = b"" if status in (204, 304) else body
    wire = (head + "\r\n").encode("latin-1") + payload
    return wire, Answer(status, seen, b"" if status in (204, 304) else body), closes


@st.composite
def wires(draw: st.DrawFn, max_answers: int = 16) -> Wire:
    count = draw(st.integers(1, max_answers))
    parts = [draw(answer(last=i == count - 1)) for i in range(count)]
    return Wire(b"".join(p[0] for p in parts), [p[1] for p in parts], parts[-1][2])


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


@dataclass
class Outcome:
    answers: list[Answer]
    refused: bool  # an error (framing, bounds) or a close before the answers were whole
    keep: bool


def reader_outcome(data: bytes, count: int, cuts: list[int], *, close: bool) -> Outcome:
    got: list[Answer] = []
    reader = AnswerReader(got.append)
    for _ in range(count):
        reader.expect()
    try:
        for piece in _pieces(data, cuts):
            reader.feed(piece)
        if close:
            reader.eof()
    except Broken:
        return Outcome(got, True, False)
    return Outcome(got, len(got) < count, reader.keep)


def h11_outcome(data: bytes, count: int, *, close: bool) -> Outcome:
    conn = h11.Connection(our_role=h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    got: list[Answer] = []
    conn.receive_data(data)
    if close:
        conn.receive_data(b"")
    try:
        for i in range(count):
            if i:
                conn.start_next_cycle()
            conn.send(h11.Request(method="GET", target="/", headers=[("Host", "sidecar")]))
            conn.send(h11.EndOfMessage())
            status, headers, body = 0, {}, bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED or \
                        isinstance(event, h11.ConnectionClosed):
                    return Outcome(got, True, False)
                if isinstance(event, h11.Response):
                    status = event.status_code
                    headers = {k.decode(): v.decode("latin-1") for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    got.append(Answer(status, headers, bytes(body)))
                    break
    except h11.RemoteProtocolError:
        return Outcome(got, True, False)
    return Outcome(got, False, conn.their_state is not h11.MUST_CLOSE)


# -- valid answers, any pieces --------------------------------------------------------------


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(wires(), st.lists(st.integers(0, 1_000_000), max_size=12))
def test_pipelined_answers_as_h11_reads_them(wire: Wire, cuts: list[int]) -> None:
    count = len(wire.expected)
    reference = h11_outcome(wire.data, count, close=False)
    assert not reference.refused and reference.answers == wire.expected  # the oracle agrees
    ours = reader_outcome(wire.data, count, cuts, close=False)
    assert ours.answers == reference.answers
    assert not ours.refused
    assert ours.keep == reference.keep == (not wire.closes)


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(wires(max_answers=6), st.data())
def test_a_close_anywhere_is_found_as_h11_finds_it(wire: Wire, data: Any) -> None:
    """Cut the answers at any byte and close: the answers complete before the cut are
    handed over, and the rest is an error, never an answer."""
    cut = data.draw(st.integers(0, len(wire.data)))
    cuts = data.draw(st.lists(st.integers(0, cut), max_size=6))
    count = len(wire.expected)
    reference = h11_outcome(wire.data[:cut], count, close=True)
    ours = reader_outcome(wire.data[:cut], count, cuts, close=True)
    assert ours.answers == reference.answers
    assert ours.refused == reference.refused == (cut < len(wire.data))


def test_the_sixteen_pipelined_gets_of_the_report_in_one_read() -> None:
    """16 answers of 4,200-byte sessions arrive in one read of about 70 KB: the end of
    the read lands in no head, the reads' size is no head's (a read over 64 KiB was
    taken as one answer's head, and refused when the cut fell in a later one's)."""
    state = b'{"cart": "' + b"x" * 4186 + b'"}'
    one = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nETag: \"7\"\r\n"
           b"Content-Length: %d\r\n\r\n" % len(state)) + state
    data = one * 16
    assert len(data) > 64 * 1024
    for cut in range(0, len(one), 97):  # wherever the reads end
        ours = reader_outcome(data, 16, [len(data) - cut], close=False)
        assert not ours.refused and [a.body for a in ours.answers] == [state] * 16


# -- what the reader refuses ------------------------------------------------------------------


HOSTILE = {
    "bad content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\nx",
    "two content-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n"
                           b"\r\nxx",
    "negative chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nx\r\n0\r\n"
                      b"\r\n",
    "chunk size overflow": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"fffffffffffffffffff\r\nx\r\n0\r\n\r\n",
    "chunk without CRLF": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nxy0\r\n"
                          b"\r\n",
    "no colon": b"HTTP/1.1 200 OK\r\nBroken header\r\nContent-Length: 0\r\n\r\n",
    "space before colon": b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n",
    "status of 4 digits": b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    "status not a number": b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    "not HTTP": b"SSH-2.0-OpenSSH_9.2\r\n",
    "NUL in a header": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
    "switching protocols": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n"
                           b"Connection: upgrade\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_framings_refused_like_h11(name: str) -> None:
    data = HOSTILE[name]
    reference = h11_outcome(data, 1, close=True)
    ours = reader_outcome(data, 1, [], close=True)
    assert reference.refused, f"h11 takes {name!r}: the case is no refusal"
    assert ours.refused and not ours.answers, name


def test_folded_header_lines_are_refused() -> None:
    """obs-fold, the line folding RFC 9112 retired: h11 unfolds it, llhttp (strict)
    refuses it, and so does the reader: no server may send it and the sidecar does not;
    a folded line is how smuggled headers have hidden from one parser and not another."""
    data = b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n"
    assert not h11_outcome(data, 1, close=True).refused
    assert reader_outcome(data, 1, [], close=True).refused


def test_another_http_version_is_not_kept_alive() -> None:
    """An answer labelled HTTP/1.0 or 2.0 is read as h11 reads it, and its connection
    not reused (only HTTP/1.1 answers keep it)."""
    for version in (b"1.0", b"2.0"):
        data = b"HTTP/" + version + b" 200 OK\r\nContent-Length: 2\r\n\r\nok"
        reference = h11_outcome(data, 1, close=False)
        ours = reader_outcome(data, 1, [], close=False)
        assert ours.answers == reference.answers and not ours.refused
        assert not ours.keep


@pytest.mark.parametrize("cuts", [[], [7], list(range(0, 80, 3))])
def test_an_answer_framed_by_the_close_is_refused(cuts: list[int]) -> None:
    """h11 reads it until the close; the reader refuses it as soon as its head is whole:
    its end, and so any cut of it, cannot be told (the sidecar always frames)."""
    data = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"n\": 1}"
    reference = h11_outcome(data, 1, close=True)
    assert not reference.refused and reference.answers[0].body == b'{"n": 1}'
    got: list[Answer] = []
    reader = AnswerReader(got.append)
    reader.expect()
    with pytest.raises(Broken, match="neither Content-Length nor chunked"):
        for piece in _pieces(data, cuts):
            reader.feed(piece)
    assert not got


def test_bytes_nobody_asked_for_and_after_a_closing_answer_are_refused() -> None:
    reader = AnswerReader(lambda _: None)
    with pytest.raises(Broken, match="nobody asked for"):
        reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    got: list[Answer] = []
    reader = AnswerReader(got.append)
    reader.expect()
    reader.expect()
    with pytest.raises(Broken, match="after an answer that closed the connection"):
        reader.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert len(got) == 1 and not reader.keep


@pytest.mark.parametrize("pieces", [1, 7, 4096])
def test_bounds_whatever_the_pieces(pieces: int) -> None:
    def fed(data: bytes, **limits: int) -> tuple[list[Answer], str]:
        got: list[Answer] = []
        reader = AnswerReader(got.append, **limits)
        reader.expect()
        try:
            for i in range(0, len(data), max(1, len(data) // pieces)):
                reader.feed(data[i:i + max(1, len(data) // pieces)])
        except Broken as exc:
            return got, str(exc)
        return got, ""

    fits = b"HTTP/1.1 200 OK\r\nX-Big: " + b"h" * (MAX_HEAD - 60) + b"\r\nContent-Length: 0\r\n\r\n"
    assert len(fits) <= MAX_HEAD and fed(fits) == (fed(fits)[0], "") and fed(fits)[0]
    big_head = b"HTTP/1.1 200 OK\r\nX-Big: " + b"h" * (MAX_HEAD + HEAD_SLICE) + b"\r\n\r\n"
    assert fed(big_head)[1] == f"the answer's head is larger than {MAX_HEAD} bytes"
    endless = b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 20_000
    assert "head is larger" in fed(endless)[1]
    declared = b"HTTP/1.1 200 OK\r\nContent-Length: 300000000\r\n\r\nxx"
    assert fed(declared, max_body=1 << 20)[1] == \
        "the answer is larger than 1048576 bytes (Content-Length: 300000000)"
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + \
        (b"1000\r\n" + b"x" * 4096 + b"\r\n") * 2
    assert fed(chunked, max_body=5000)[1] == "the answer is larger than 5000 bytes"
    trailers = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + \
        b"X-T: v\r\n" * 10_000
    assert "trailers are larger" in fed(trailers)[1]
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" * (MAX_INTERIM + 1)
    assert fed(interim)[1] == f"more than {MAX_INTERIM} interim (1xx) answers before the " \
                              "answer"
    some = b"HTTP/1.1 100 Continue\r\n\r\n" * MAX_INTERIM + \
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"
    got, error = fed(some)
    assert not error and got == [Answer(200, {"content-length": "1"}, b"x")]


def test_an_answer_to_head_has_no_body_and_ends_the_connection() -> None:
    got: list[Answer] = []
    reader = AnswerReader(got.append)
    reader.expect(head_only=True)
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert got == [Answer(200, {"content-length": "5"}, b"")] and not reader.keep
