"""The etcd client's HTTP/2 path (meshxl.etcd.h2c, .h2conn, .h2calls) against the
reference implementation of HTTP/2, python-hyper's h2, as the server: calls with
requests beyond the frame and window sizes (generated), answers in any chunks, a watch's
messages split across frames, gRPC statuses, GOAWAY, a lost connection, a deadline.
No socket: the two ends exchange bytes in memory (real etcd: the statesync integration
tests, whose sidecars use it)."""

from __future__ import annotations

import asyncio
import struct

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshxl import h2wire
from meshxl.etcd import h2c, h2conn
from meshxl.etcd.h2calls import MAX_MESSAGE, Call, StreamCall, grpc_timeout, timeout_field
from meshxl.etcd.h2conn import Connection


def grpc_message(payload: bytes) -> bytes:
    return b"\x00" + struct.pack(">L", len(payload)) + payload


class Pipe:
    """The client connection's transport: what it writes, kept."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self.aborted = asyncio.Event()

    def write(self, data: bytes) -> None:
        self.data += data

    def take(self) -> bytes:
        out, self.data = bytes(self.data), bytearray()
        return out

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True
        self.aborted.set()

    def is_closing(self) -> bool:
        return self.closed


class Owner:
    host, port = "127.0.0.1", 2379

    def __init__(self) -> None:
        self.lost_count = 0
        self.drained = 0

    def drain(self) -> None:
        self.drained += 1

    def lost(self, connection: Connection) -> None:
        self.lost_count += 1


class Server:
    """h2 as etcd's side: takes the client's bytes, answers as told."""

    def __init__(self, window: int = 65_535, frame_size: int = 16_384) -> None:
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding="utf-8"))
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: frame_size})
        self.h2.initiate_connection()
        self.requests: dict[int, bytearray] = {}
        self.headers: dict[int, dict[str, str]] = {}
        self.ended: set[int] = set()
        self.reset: set[int] = set()

    def receive(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                self.headers[event.stream_id] = dict(event.headers)
                self.requests[event.stream_id] = bytearray()
            elif isinstance(event, h2.events.DataReceived):
                self.requests[event.stream_id] += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length,
                                                  event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self.ended.add(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.reset.add(event.stream_id)

    def answer(self, stream: int, message: bytes | None, status: int = 0,
               text: str = "") -> None:
        if message is None:  # trailers only
            self.h2.send_headers(stream, [(":status", "200"), ("content-type",
                                                              "application/grpc"),
                                          ("grpc-status", str(status)),
                                          ("grpc-message", text)], end_stream=True)
            return
        self.h2.send_headers(stream, [(":status", "200"),
                                      ("content-type", "application/grpc")])
        self.send(stream, grpc_message(message))
        self.h2.send_headers(stream, [("grpc-status", str(status))], end_stream=True)

    def send(self, stream: int, data: bytes) -> None:
        """DATA in frames of the client's size (its window is 1 GiB)."""
        size = self.h2.max_outbound_frame_size
        for at in range(0, len(data), size):
            self.h2.send_data(stream, data[at:at + size])

    def take(self) -> bytes:
        return self.h2.data_to_send()


def exchange(client: Connection, pipe: Pipe, server: Server, chunk: int = 1 << 20) -> None:
    """Bytes both ways until neither side has more."""
    for _ in range(1000):
        out = pipe.take()
        if out:
            server.receive(out)
        back = server.take()
        for at in range(0, len(back), chunk):
            client.data_received(back[at:at + chunk])
        client._flush()
        if not out and not back and not pipe.data:
            return
    raise AssertionError("no end to the exchange")


def connect(server: Server) -> tuple[Connection, Pipe, Owner]:
    owner = Owner()
    connection = Connection(owner)
    pipe = Pipe()
    connection.connection_made(pipe)  # type: ignore[arg-type]
    exchange(connection, pipe, server)
    return connection, pipe, owner


def channel_on(server: Server) -> tuple[h2c.Channel, Connection, Pipe]:
    """A channel whose one connection is to ``server``, its SETTINGS exchanged."""
    channel = h2c.Channel("127.0.0.1", 2379)
    connection = Connection(channel)
    pipe = Pipe()
    connection.connection_made(pipe)  # type: ignore[arg-type]
    channel._connection = connection
    exchange(connection, pipe, server)
    return channel, connection, pipe


def watch_answered(server: Server) -> tuple[h2c.Channel, Connection, Pipe, StreamCall]:
    """A channel on ``server`` with a watch open: its request taken, the headers of its
    answer sent (its messages to come)."""
    channel, connection, pipe = channel_on(server)
    stream = channel.stream(h2c.WATCH, b"create", bytes)
    connection._flush()
    exchange(connection, pipe, server)
    server.h2.send_headers(stream.stream, [(":status", "200"),
                                           ("content-type", "application/grpc")])
    return channel, connection, pipe, stream


def unary(connection: Connection, request: bytes, timeout: float = 5.0) -> Call:
    loop = asyncio.get_running_loop()
    call = Call(loop.create_future(), h2c.Channel("127.0.0.1", 2379)._head(h2c.TXN),
                grpc_message(request), bytes, timeout, loop.time() + timeout)
    connection.start(call)
    connection._flush()
    return call


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(requests=st.lists(st.binary(max_size=150_000), min_size=1, max_size=4),
       window=st.sampled_from([65_535, 16_384, 1 << 20]),
       frame_size=st.sampled_from([16_384, 65_536]), chunk=st.integers(1, 40_000))
def test_calls_reach_h2_whole_and_their_answers_come_back(
        requests: list[bytes], window: int, frame_size: int, chunk: int) -> None:
    async def run() -> None:
        server = Server(window, frame_size)
        connection, pipe, _ = connect(server)
        calls = [unary(connection, request) for request in requests]
        futures = [call.future for call in calls]
        exchange(connection, pipe, server, chunk)
        for call, request in zip(calls, requests, strict=True):
            assert call.stream in server.ended  # END_STREAM after the whole message
            assert bytes(server.requests[call.stream]) == grpc_message(request)
            headers = server.headers[call.stream]
            assert headers[":path"] == h2c.TXN and headers[":method"] == "POST"
            assert headers["content-type"] == "application/grpc"
            assert headers["te"] == "trailers" and headers["grpc-timeout"].endswith("m")
            server.answer(call.stream, request[::-1])
        exchange(connection, pipe, server, chunk)
        for future, request in zip(futures, requests, strict=True):
            assert future is not None and future.result() == request[::-1]
        assert not connection.streams
    asyncio.run(run())


async def test_an_answer_is_the_parsed_message_and_a_status_an_aio_rpc_error() -> None:
    server = Server()
    connection, pipe, _ = connect(server)
    ok, refused, trailers_only = (unary(connection, b"a"), unary(connection, b"b"),
                                  unary(connection, b"c"))
    futures = [ok.future, refused.future, trailers_only.future]
    exchange(connection, pipe, server)
    server.answer(ok.stream, b"answer")
    server.answer(refused.stream, b"", status=9)
    server.answer(trailers_only.stream, None, status=3, text="lease%20not%20found")
    exchange(connection, pipe, server)
    assert futures[0] is not None and futures[0].result() == b"answer"
    assert futures[1] is not None
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        futures[1].result()
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert futures[2] is not None
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        futures[2].result()
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failed.value.details() == "lease not found"


async def test_a_watch_reads_every_message_in_order_however_split() -> None:
    server = Server()
    channel, connection, pipe = channel_on(server)
    stream = channel.stream(h2c.WATCH, b"create", bytes)
    connection._flush()
    exchange(connection, pipe, server)
    assert bytes(server.requests[stream.stream]) == grpc_message(b"create")
    assert stream.stream not in server.ended  # a watch keeps its side open
    messages = [bytes([i]) * (i * 997) for i in range(1, 12)]
    server.h2.send_headers(stream.stream, [(":status", "200"),
                                           ("content-type", "application/grpc")])
    server.send(stream.stream, b"".join(grpc_message(m) for m in messages))
    exchange(connection, pipe, server, chunk=333)
    assert [await stream.read() for _ in messages] == messages
    server.h2.send_headers(stream.stream, [("grpc-status", "0")], end_stream=True)
    exchange(connection, pipe, server)
    assert await stream.read() is grpc.aio.EOF
    later = channel.stream(h2c.WATCH, b"again", bytes)
    connection._flush()
    exchange(connection, pipe, server)
    reading = asyncio.ensure_future(later.read())
    await asyncio.sleep(0)
    later.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    exchange(connection, pipe, server)
    assert later.stream in server.reset
    # Ending a watch and cancelling another reset only their streams: the channel keeps
    # its connection for the next call.
    assert connection.usable() and channel._connection is connection


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(st.tuples(st.lists(st.binary(max_size=3000), min_size=1, max_size=3),
                                st.booleans()), min_size=1, max_size=8),
       chunk=st.integers(1, 5000))
def test_a_watchs_messages_each_in_its_frame_or_not_come_in_order(
        parts: list[tuple[list[bytes], bool]], chunk: int) -> None:
    """Messages each alone in a DATA frame (read from the frame as it came), several in
    one, or one split across frames (gathered), in any mix and order."""
    async def run() -> None:
        server = Server()
        _, connection, pipe, stream = watch_answered(server)
        sent: list[bytes] = []
        for messages, split in parts:
            data = b"".join(grpc_message(m) for m in messages)
            if split and len(data) > 1:  # cut in two frames anywhere
                server.h2.send_data(stream.stream, data[:len(data) // 2])
                server.h2.send_data(stream.stream, data[len(data) // 2:])
            else:
                server.send(stream.stream, data)
            sent += messages
        exchange(connection, pipe, server, chunk)
        assert [await stream.read() for _ in sent] == sent
        assert not stream.messages and stream.closed is None
    asyncio.run(run())


async def test_a_watch_message_compressed_or_too_large_in_its_own_frame_fails_it() -> None:
    for flag, size, code in ((1, 3, grpc.StatusCode.INTERNAL),
                             (0, MAX_MESSAGE + 1, grpc.StatusCode.RESOURCE_EXHAUSTED)):
        server = Server()
        _, connection, pipe, stream = watch_answered(server)
        server.h2.send_data(stream.stream, bytes([flag]) + struct.pack(">L", size) + b"abc")
        exchange(connection, pipe, server)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stream.read()
        assert failed.value.code() == code


async def test_a_header_block_in_several_frames_is_read_whole() -> None:
    """Trailers larger than a frame come as HEADERS and CONTINUATION frames."""
    server = Server()
    connection, pipe, _ = connect(server)
    call = unary(connection, b"a")
    future = call.future
    exchange(connection, pipe, server)
    server.h2.send_headers(call.stream, [(":status", "200"),
                                         ("content-type", "application/grpc")])
    server.send(call.stream, grpc_message(b""))
    detail = "x" * 40_000
    server.h2.send_headers(call.stream, [("grpc-status", "9"), ("grpc-message", detail)],
                           end_stream=True)
    sent = server.take()
    assert any(sent[at + 3] == h2wire.CONTINUATION for at in _frame_starts(sent))
    connection.data_received(sent)
    assert future is not None
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        future.result()
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert failed.value.details() == detail
    again = unary(connection, b"b")  # the connection reads on
    exchange(connection, pipe, server)
    server.answer(again.stream, b"ok")
    exchange(connection, pipe, server)
    assert again.future is None and not connection.streams


def _frame_starts(data: bytes) -> list[int]:
    starts, at = [], 0
    while at + 9 <= len(data):
        starts.append(at)
        at += 9 + int.from_bytes(data[at:at + 3], "big")
    return starts


async def test_goaway_fails_the_streams_it_did_not_take_and_a_loss_fails_the_rest() -> None:
    server = Server()
    connection, pipe, owner = connect(server)
    calls = [unary(connection, b"x") for _ in range(3)]
    futures = [call.future for call in calls]
    exchange(connection, pipe, server)
    server.h2.close_connection(last_stream_id=calls[0].stream)
    exchange(connection, pipe, server)
    assert owner.lost_count == 1 and not connection.usable()
    for future in futures[1:]:
        assert future is not None
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            future.result()
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert futures[0] is not None and not futures[0].done()  # taken: it may still answer
    connection.connection_lost(ConnectionResetError("reset"))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        futures[0].result()
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_deadline_fails_its_call_resets_its_stream_and_pings() -> None:
    server = Server()
    channel, connection, pipe = channel_on(server)
    future = channel.call(h2c.TXN, b"slow", 0.05, bytes)
    await asyncio.sleep(0)  # the call's frames leave
    out = pipe.take()
    server.receive(out)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async with asyncio.timeout(5.0):
            await future
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.sleep(0)
    frames = pipe.take()
    server.receive(frames)
    assert server.reset  # RST_STREAM(CANCEL)
    assert connection.pinged is not None  # nothing came since it was sent: PING
    exchange(connection, pipe, server)  # h2 answers the PING
    assert connection.pinged is None and connection.transport is not None
    channel.close()


async def test_a_silent_connection_with_a_watch_pings_and_closes_unanswered(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h2conn, "KEEPALIVE", 0.05)
    monkeypatch.setattr(h2conn, "PING_TIMEOUT", 0.1)
    server = Server()
    channel, connection, pipe = channel_on(server)
    channel.stream(h2c.WATCH, b"create", bytes)
    await asyncio.sleep(0.01)
    server.receive(pipe.take())  # the watch's request; nothing comes back
    async with asyncio.timeout(5.0):
        await pipe.aborted.wait()  # silent for KEEPALIVE: PING; unanswered: closed
    pinged = [e for e in server.h2.receive_data(pipe.take())
              if isinstance(e, h2.events.PingReceived)]
    assert [e.ping_data for e in pinged] == [b"meshxl\0\0"]
    channel.close()


def test_the_literals_sent_decode_with_hpack_and_keep_its_table() -> None:
    block = h2c.Channel("[::1]", 2379)._head(h2c.TXN) + h2wire.literal(
        b"grpc-timeout", grpc_timeout(4.9999))
    decoder = hpack.Decoder()
    assert decoder.decode(block) == [
        (":method", "POST"), (":scheme", "http"), (":path", h2c.TXN),
        (":authority", "[::1]:2379"), ("content-type", "application/grpc"),
        ("te", "trailers"), ("user-agent", "meshxl-h2c"), ("grpc-timeout", "5000m")]
    assert h2wire.keeps_table(block)
    encoder = hpack.Encoder()
    assert not h2wire.keeps_table(encoder.encode([("grpc-status", "0")]))
    assert h2wire.keeps_table(encoder.encode([("grpc-status", "0")]))  # indexed now


@pytest.mark.parametrize(("seconds", "value"), [
    (0.0, b"1m"), (0.0004, b"1m"), (1.5, b"1500m"), (5.0, b"5000m"),
    (99_999.998, b"99999998m"), (99_999.9999, b"100000S"), (100_000.0, b"100000S"),
    (1e12, b"99999999S")])
def test_grpc_timeout_is_eight_digits_and_a_unit(seconds: float, value: bytes) -> None:
    assert grpc_timeout(seconds) == value


@given(st.one_of(st.floats(-1.0, 2e5), st.sampled_from([0.0, 4.9995, 5.0, 99_999.9999])))
def test_the_timeout_field_is_grpc_timeouts_literal_however_often_asked(
        seconds: float) -> None:
    for _ in range(2):  # the second from what was kept
        assert timeout_field(seconds) == h2wire.literal(b"grpc-timeout",
                                                        grpc_timeout(seconds))


@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, (1 << 32) - 1),
       st.binary(max_size=64), st.binary(max_size=16))
def test_a_frame_head_reads_what_frame_wrote(kind: int, flags: int, stream: int,
                                              payload: bytes, before: bytes) -> None:
    written = before + h2wire.frame(kind, flags, stream & 0x7FFFFFFF, payload)
    assert h2wire.frame_head(written, len(before)) == (len(payload), kind, flags,
                                                       stream & 0x7FFFFFFF)
    reserved = bytearray(written)
    reserved[len(before) + 5] |= 0x80  # the reserved bit is not the stream's
    assert h2wire.frame_head(bytes(reserved), len(before))[3] == stream & 0x7FFFFFFF
