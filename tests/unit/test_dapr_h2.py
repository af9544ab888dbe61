"""The sidecar's HTTP/2 server of Dapr's gRPC API (meshxl.statesync.dapr.h2) without a
socket: a client's bytes in, frames out, read with hpack (the library it decodes with)
as a client reads them. Calls are answered with gRPC's framing and status trailers,
within the client's flow-control windows; what breaks the protocol ends the connection
with GOAWAY, never an exception out of the connection."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import hpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshxl.statesync.dapr import h2

PREFACE = h2.PREFACE


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.sent = bytearray()
        self.closed = False

    def write(self, data: Any) -> None:
        self.sent += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">BHBBL", len(payload) >> 16, len(payload) & 0xFFFF, kind, flags,
                       stream) + payload


def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        size = int.from_bytes(data[pos:pos + 3], "big")
        out.append((data[pos + 3], data[pos + 4],
                    int.from_bytes(data[pos + 5:pos + 9], "big"), data[pos + 9:pos + 9 + size]))
        pos += 9 + size
    return out


def request(encoder: hpack.Encoder, stream: int, path: str, message: bytes,
            extra: list[tuple[str, str]] = ()) -> bytes:
    block = encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", path),
                            (":authority", "sidecar"), ("content-type", "application/grpc"),
                            ("te", "trailers"), *extra])
    body = b"\x00" + len(message).to_bytes(4, "big") + message
    return (frame(h2.HEADERS, h2.END_HEADERS, stream, block)
            + frame(h2.DATA, h2.END_STREAM, stream, body))


def open_connection(handler: h2.Handler) -> tuple[h2.GrpcConnection, Transport]:
    factory, _ = h2.serve_on(handler)
    connection = factory()
    transport = Transport()
    connection.connection_made(transport)
    return connection, transport


async def echo(path: str, message: bytes, headers: dict[str, str]) -> tuple[int, str, bytes]:
    if path.endswith("/Fail"):
        return 10, "possible etag mismatch: 100% sure", b""
    return 0, "", path.encode() + b"|" + message + b"|" + headers.get("x-id", "").encode()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def answers(sent: bytes) -> dict[int, dict[str, Any]]:
    """Each stream's answer as a client reads it: headers, message, trailers, resets."""
    decoder = hpack.Decoder()
    out: dict[int, dict[str, Any]] = {}
    for kind, flags, stream, payload in frames(sent):
        if stream == 0:
            continue
        got = out.setdefault(stream, {"headers": [], "data": b"", "ended": False,
                                      "reset": None})
        if kind == h2.HEADERS:
            got["headers"].append(dict(decoder.decode(payload)))
        elif kind == h2.DATA:
            got["data"] += payload
        elif kind == h2.RST_STREAM:
            got["reset"] = int.from_bytes(payload, "big")
        got["ended"] |= bool(flags & h2.END_STREAM) and kind in (h2.HEADERS, h2.DATA)
    return out


async def test_a_unary_call_is_answered_with_grpc_framing_and_trailers() -> None:
    connection, transport = open_connection(echo)
    encoder = hpack.Encoder()
    settings_and_window = frames(bytes(transport.sent))
    assert [f[0] for f in settings_and_window] == [h2.SETTINGS, h2.WINDOW_UPDATE]
    transport.sent.clear()
    connection.data_received(PREFACE + frame(h2.SETTINGS, 0, 0)
                             + request(encoder, 1, "/svc/Echo", b"hi", [("x-id", "7")])
                             + request(encoder, 3, "/svc/Fail", b""))
    await settle()
    got = answers(bytes(transport.sent))
    one = got[1]
    assert one["headers"][0] == {":status": "200", "content-type": "application/grpc"}
    assert one["data"] == b"\x00" + (14).to_bytes(4, "big") + b"/svc/Echo|hi|7"
    assert one["headers"][1] == {"grpc-status": "0"} and one["ended"]
    failed = got[3]  # trailers only, the message percent-encoded
    assert failed["headers"] == [{":status": "200", "content-type": "application/grpc",
                                  "grpc-status": "10",
                                  "grpc-message": "possible etag mismatch: 100%25 sure"}]
    assert failed["ended"] and not transport.closed
    acks = [f for f in frames(bytes(transport.sent)) if f[0] == h2.SETTINGS]
    assert acks == [(h2.SETTINGS, h2.ACK, 0, b"")]


async def test_an_answer_waits_for_the_clients_window() -> None:
    big = b"x" * 200_000

    async def large(path: str, message: bytes, headers: dict[str, str]) -> tuple[int, str, bytes]:
        return 0, "", big

    connection, transport = open_connection(large)
    transport.sent.clear()
    connection.data_received(PREFACE + frame(h2.SETTINGS, 0, 0)
                             + request(hpack.Encoder(), 1, "/svc/Big", b""))
    await settle()
    sent = frames(bytes(transport.sent))
    data = b"".join(p for kind, _, s, p in sent if kind == h2.DATA and s == 1)
    assert len(data) == 65_535  # HTTP/2's default windows, no more
    assert all(len(p) <= 16_384 for kind, _, _, p in sent if kind == h2.DATA)
    assert not any(kind == h2.HEADERS and flags & h2.END_STREAM for kind, flags, _, _ in sent)
    transport.sent.clear()
    grant = struct.pack(">L", 1 << 20)
    connection.data_received(frame(h2.WINDOW_UPDATE, 0, 0, grant)
                             + frame(h2.WINDOW_UPDATE, 0, 1, grant))
    got = answers(bytes(transport.sent))
    assert len(data) + len(got[1]["data"]) == len(big) + 5
    assert got[1]["headers"][-1] == {"grpc-status": "0"} and got[1]["ended"]


async def test_ping_is_answered_and_streams_past_the_limit_are_refused() -> None:
    gate = asyncio.Event()

    async def slow(path: str, message: bytes, headers: dict[str, str]) -> tuple[int, str, bytes]:
        await gate.wait()
        return 0, "", b""

    connection, transport = open_connection(slow)
    encoder = hpack.Encoder()
    calls = b"".join(request(encoder, 1 + 2 * i, "/svc/Slow", b"")
                     for i in range(h2.MAX_STREAMS + 1))
    connection.data_received(PREFACE + frame(h2.PING, 0, 0, b"12345678") + calls)
    sent = frames(bytes(transport.sent))
    assert (h2.PING, h2.ACK, 0, b"12345678") in sent
    refused = [s for kind, _, s, p in sent if kind == h2.RST_STREAM
               and int.from_bytes(p, "big") == h2.REFUSED_STREAM]
    assert refused == [1 + 2 * h2.MAX_STREAMS]
    gate.set()
    await settle()
    assert len(connection.streams) == 0


async def test_a_compressed_or_broken_message_is_refused_by_status() -> None:
    connection, transport = open_connection(echo)
    encoder = hpack.Encoder()
    block = encoder.encode([(":method", "POST"), (":path", "/svc/Echo")])
    connection.data_received(
        PREFACE + frame(h2.HEADERS, h2.END_HEADERS, 1, block)
        + frame(h2.DATA, h2.END_STREAM, 1, b"\x01\x00\x00\x00\x01z")
        + frame(h2.HEADERS, h2.END_HEADERS, 3, encoder.encode([(":path", "/svc/Echo")]))
        + frame(h2.DATA, h2.END_STREAM, 3, b"\x00\x00\x00\x00\x09short"))
    got = answers(bytes(transport.sent))
    assert got[1]["headers"][0]["grpc-status"] == "12"
    assert got[3]["headers"][0]["grpc-status"] == "13"


async def test_a_header_block_sent_again_decodes_with_the_table_as_it_is_now() -> None:
    """Blocks that only index the dynamic table are kept decoded, but the same bytes
    after the table changed (a field added, a size update) name other fields: each
    call gets the headers its block means when it arrives."""
    fixed = b"\x83\x86\x04\x09/svc/Echo"  # :method POST, :scheme http, :path literal
    newest = fixed + b"\xbe"  # and the dynamic table's newest entry (index 62)

    def added(x_id: bytes) -> bytes:  # x-id: a literal added to the table
        return fixed + b"\x40\x04x-id" + bytes((len(x_id),)) + x_id

    emptied = b"\x20\x3f\xe1\x1f"  # table size updates: 0 (emptied), then 4096
    blocks = [added(b"1"), newest, newest, added(b"2"), newest, emptied + added(b"3"),
              newest]
    connection, transport = open_connection(echo)

    def call(i: int, block: bytes) -> None:
        connection.data_received((PREFACE if i == 0 else b"")
                                 + frame(h2.HEADERS, h2.END_HEADERS, 1 + 2 * i, block)
                                 + frame(h2.DATA, h2.END_STREAM, 1 + 2 * i, bytes(5)))

    for i, block in enumerate(blocks):
        call(i, block)
        await settle()
    got = answers(bytes(transport.sent))
    reference = hpack.Decoder()
    expected = [dict(reference.decode(block))["x-id"] for block in blocks]
    assert expected == ["1", "1", "1", "2", "2", "3", "3"]
    assert [got[1 + 2 * i]["data"][5:].decode().rpartition("|")[2]
            for i in range(len(blocks))] == expected
    # The table emptied by a block that adds nothing: index 62 names nothing any more.
    call(len(blocks), emptied + fixed)
    call(len(blocks) + 1, newest)
    assert transport.closed
    goaway = frames(bytes(transport.sent))[-1]
    assert goaway[0] == h2.GOAWAY and goaway[3][4:8] == struct.pack(">L", h2.COMPRESSION_ERROR)


HEADER_LISTS = st.lists(st.tuples(
    st.lists(st.tuples(st.sampled_from(["x-a", "x-b", "grpc-timeout", "dapr-api-token"]),
                       st.sampled_from(["1", "2", "10S", "a" * 40]), st.booleans()),
             max_size=4),
    st.booleans(), st.sampled_from([None, None, None, 0, 64, 4096])), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(HEADER_LISTS)
def test_each_call_gets_the_headers_its_block_means(
        calls: list[tuple[list[tuple[str, str, bool]], bool, int | None]]) -> None:
    """Any client's header blocks (fields indexed, added, never indexed, the table
    resized; Huffman or not), repeated or not: the handler sees what a reference
    decoder reads from each, in order."""
    async def run() -> None:
        seen: list[dict[str, str]] = []

        async def record(path: str, message: bytes,
                         headers: dict[str, str]) -> tuple[int, str, bytes]:
            seen.append(headers)
            return 0, "", b""

        connection, _ = open_connection(record)
        encoder, reference, expected = hpack.Encoder(), hpack.Decoder(), []
        connection.data_received(PREFACE)
        for i, (fields, huffman, table_size) in enumerate(calls):
            if table_size is not None:
                encoder.header_table_size = table_size
            block = encoder.encode([(":method", "POST"), (":path", "/svc/Echo"),
                                    *fields], huffman=huffman)
            expected.append(dict(reference.decode(block)))
            connection.data_received(frame(h2.HEADERS, h2.END_HEADERS, 1 + 2 * i, block)
                                     + frame(h2.DATA, h2.END_STREAM, 1 + 2 * i, bytes(5)))
            await settle()
        assert seen == expected

    asyncio.run(run())


async def test_protocol_errors_end_the_connection_with_goaway() -> None:
    for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                 PREFACE + frame(h2.HEADERS, h2.END_HEADERS, 1, b"\xff\xff\xff\xff"),
                 PREFACE + struct.pack(">BHBBL", 0, 20_000, h2.DATA, 0, 1),
                 PREFACE + frame(h2.CONTINUATION, h2.END_HEADERS, 1, b"")):
        connection, transport = open_connection(echo)
        transport.sent.clear()
        connection.data_received(junk)
        assert transport.closed, junk
        assert frames(bytes(transport.sent))[-1][0] == h2.GOAWAY


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 255), st.integers(0, 9),
                          st.binary(max_size=40)), max_size=8),
       st.integers(1, 64))
def test_any_frames_never_raise(random_frames: list[tuple[int, int, int, bytes]],
                                chunk: int) -> None:
    async def run() -> None:
        connection, transport = open_connection(echo)
        data = PREFACE + b"".join(frame(k, f, s, p) for k, f, s, p in random_frames)
        for at in range(0, len(data), chunk):  # any read boundary
            connection.data_received(data[at:at + chunk])
            if connection.transport is None:
                break
        await settle()

    asyncio.run(run())


def _subscribing() -> tuple[Any, Transport, bytes]:
    """A connection refusing ``/svc/Subscribe`` from its headers, and those headers."""
    factory, _ = h2.serve_on(echo, lambda path, headers: (
        (9, "pubsub is not configured") if path.endswith("/Subscribe") else None))
    connection = factory()
    transport = Transport()
    connection.connection_made(transport)
    block = hpack.Encoder().encode([(":method", "POST"), (":path", "/svc/Subscribe")])
    return connection, transport, block


async def test_a_call_refused_from_its_headers_is_answered_before_its_requests_end() -> None:
    """A method not served may be a stream whose requests never end: its answer comes
    from its headers alone, and the stream is reset (never a hang)."""
    connection, transport, block = _subscribing()
    connection.data_received(PREFACE + frame(h2.HEADERS, h2.END_HEADERS, 1, block)
                             + frame(h2.DATA, 0, 1, b"\x00\x00\x00\x00\x00"))  # no end
    got = answers(bytes(transport.sent))
    assert got[1]["headers"][0]["grpc-status"] == "9" and got[1]["ended"]
    assert got[1]["reset"] == 0  # RST_STREAM NO_ERROR: send no more
    assert not connection.streams


async def test_a_refused_call_waits_a_moment_for_its_first_message(monkeypatch: Any) -> None:
    """Refused from its headers, a call is answered once its first message arrives (a
    client still sending it would otherwise see its send fail, not the status), or after
    REFUSAL_WAIT without one: never a hang."""
    monkeypatch.setattr(h2, "REFUSAL_WAIT", 0.05)
    connection, transport, block = _subscribing()
    connection.data_received(PREFACE + frame(h2.HEADERS, h2.END_HEADERS, 1, block))
    assert 1 not in answers(bytes(transport.sent))
    for _ in range(100):  # the timer's answer, within a second
        await asyncio.sleep(0.01)
        if 1 in answers(bytes(transport.sent)):
            break
    got = answers(bytes(transport.sent))
    assert got[1]["headers"][0]["grpc-status"] == "9" and got[1]["ended"]
    assert not connection.streams
