"""The client end of a resumable stream over scripted connections (no socket): what it
sends again after a resume, what it drops, what it raises."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from meshxl.local.wait import wait_until
from meshxl.streams.client import ClientStream, StreamRefused
from meshxl.streams.protocol import (
    ACK,
    END,
    ERROR,
    FAILED,
    FORBIDDEN,
    MESSAGE,
    OPEN,
    READY,
    RESUME,
    Frame,
    Limits,
)
from tests.harness.clock import scaled, window

TOKEN = "A" * 22


class Scripted:
    """One connection: the frames the server sends, then a close (or a break)."""

    def __init__(self, frames: list[Frame], hold: bool = False,
                 broken: Exception | None = None):
        self.script = frames
        self.hold = hold
        self.broken = broken
        self.sent: list[Any] = []
        self.hello_frame: Frame | None = None
        self.closed = asyncio.Event()

    async def hello(self, frame: Frame) -> None:
        self.hello_frame = frame
        if self.broken is not None:
            raise self.broken

    async def send_message(self, seq: int, payload: Any, ack: int | None = None,
                           text: str | None = None) -> None:
        self.sent.append(("m", seq, payload))
        if ack is not None:  # carried in the message's frame
            self.sent.append(("a", ack, "carried"))

    async def send_ack(self, seq: int) -> None:
        self.sent.append(("a", seq))

    async def send_end(self, last: int) -> None:
        self.sent.append(("end", last))

    async def frames(self) -> AsyncIterator[Frame]:
        for frame in self.script:
            await asyncio.sleep(0)
            yield frame
        if self.hold:
            await self.closed.wait()

    @property
    def close_code(self) -> int | None:
        return None

    async def close(self) -> None:
        self.closed.set()


def connections(*conns: Scripted) -> Any:
    queue = list(conns)

    async def connect() -> Scripted:
        if not queue:
            await asyncio.Event().wait()  # no more: as a mesh that never answers
        return queue.pop(0)

    return connect


def ready(consumed: int = 0, out: int = 0) -> Frame:
    return Frame(READY, token=TOKEN, consumed=consumed, last=out)


def message(seq: int, payload: Any) -> Frame:
    return Frame(MESSAGE, seq=seq, payload=payload)


async def test_a_resume_sends_again_only_what_the_server_had_not_consumed() -> None:
    first = Scripted([ready(), message(1, "r1")])  # then breaks
    second = Scripted([ready(consumed=1, out=1), message(1, "r1"), message(2, "r2")],
                      hold=True)
    stream = ClientStream(connections(first, second), limits=Limits(ack_every=1),
                          backoff=(0.001, 0.001))
    await stream.start()
    for n in (1, 2, 3):
        await stream.send(n)
    assert await stream.receive() == "r1"
    async with asyncio.timeout(2):
        assert await stream.receive() == "r2"  # r1 again: dropped
    assert first.hello_frame == Frame(OPEN)
    assert second.hello_frame == Frame(RESUME, token=TOKEN, recv=1)
    resent = [s for s in second.sent if s[0] == "m"]
    assert resent == [("m", 2, 2), ("m", 3, 3)]  # 1 was consumed: not again
    assert stream.connections == 2 and len(stream.resumes) == 1
    await stream.aclose()


async def test_acknowledgements_free_what_was_sent() -> None:
    conn = Scripted([ready(), Frame(ACK, seq=2)], hold=True)
    stream = ClientStream(connections(conn))
    await stream.start()
    await stream.send("a")
    await stream.send("b")
    async with asyncio.timeout(2):
        await stream.flush()
    assert stream.consumed == 2
    await stream.aclose()


async def test_an_acknowledgement_rides_on_the_next_message_and_the_answer_on_its_own(
        ) -> None:
    """A stream that talks about as often as it listens sent two frames a message: its
    message and an acknowledgement of the server's, each through the mesh. The
    acknowledgement waits up to ack_delay for a message of the client's own to ride on,
    and the server's answer carries what its handler consumed (``m``'s ``a``)."""
    conn = Scripted([ready(), Frame(MESSAGE, seq=1, payload="r1", ack=1)], hold=True)
    stream = ClientStream(connections(conn), limits=Limits(ack_delay=0.1))
    await stream.send("q1")  # queued: it goes once the stream is ready
    await stream.start()
    async with asyncio.timeout(2):
        assert await stream.receive() == "r1"
    assert stream.consumed == 1  # the answer's acknowledgement freed q1
    await stream.send("q2")
    await asyncio.sleep(0.25)  # past ack_delay: nothing left to send alone
    assert conn.sent == [("m", 1, "q1"), ("m", 2, "q2"), ("a", 1, "carried")]
    await stream.aclose()


class Fed(Scripted):
    """A connection whose server frames come when the test feeds them."""

    def __init__(self) -> None:
        super().__init__([], hold=True)
        self.feed: asyncio.Queue[Frame | None] = asyncio.Queue()

    async def frames(self) -> AsyncIterator[Frame]:
        while (frame := await self.feed.get()) is not None:
            yield frame

    async def close(self) -> None:
        self.feed.put_nowait(None)


async def test_an_acknowledgement_carried_starts_the_wait_for_the_next_anew() -> None:
    """The wait for an acknowledgement alone runs from the first message received that
    is not acknowledged: a message of the client's that carried it ends the wait. (Its
    timer used to run on from the first message and, finding one received since,
    acknowledge it alone just before the next message would have carried it.)"""
    conn = Fed()
    stream = ClientStream(connections(conn), limits=Limits(ack_delay=scaled(0.3)))
    conn.feed.put_nowait(ready())
    await stream.start()
    conn.feed.put_nowait(message(1, "r1"))
    async with asyncio.timeout(2):
        assert await stream.receive() == "r1"
    await window(0.2, "r1 waits for a message to carry its acknowledgement")
    await stream.send("q1")  # carries 1
    conn.feed.put_nowait(message(2, "r2"))
    async with asyncio.timeout(2):
        assert await stream.receive() == "r2"
    await window(0.2, "r1's wait would end here, r2's not")  # 0.4 s after r1, 0.2 after r2
    await stream.send("q2")  # carries 2
    await window(0.4, "no acknowledgement goes alone")
    assert conn.sent == [("m", 1, "q1"), ("a", 1, "carried"), ("m", 2, "q2"),
                         ("a", 2, "carried")]
    conn.feed.put_nowait(message(3, "r3"))  # and one with nothing to ride on goes alone
    await wait_until(lambda: ("a", 3) in conn.sent, timeout=2, what="the acknowledgement")
    await stream.aclose()


async def test_an_acknowledgement_with_no_message_to_ride_on_goes_alone() -> None:
    conn = Scripted([ready(), message(1, "r1")], hold=True)
    stream = ClientStream(connections(conn), limits=Limits(ack_delay=0.05))
    await stream.start()
    async with asyncio.timeout(2):
        assert await stream.receive() == "r1"
    await wait_until(lambda: ("a", 1) in conn.sent, timeout=2, what="the acknowledgement")
    await stream.aclose()


async def test_the_end_after_every_message_ends_the_iteration() -> None:
    conn = Scripted([ready(), message(1, "x"), message(2, "y"), Frame(END, seq=2)])
    stream = ClientStream(connections(conn))
    await stream.start()
    assert [m async for m in stream] == ["x", "y"]
    assert ("a", 2) in conn.sent  # what it received, acknowledged before it closed
    await stream.aclose()


async def test_a_failed_handler_is_raised_after_its_last_message() -> None:
    conn = Scripted([ready(), message(1, "x"), Frame(ERROR, refusal=FAILED),
                     Frame(END, seq=1)])
    stream = ClientStream(connections(conn))
    await stream.start()
    assert await stream.receive() == "x"
    with pytest.raises(StreamRefused) as failed:
        await stream.receive()
    assert failed.value.refusal is FAILED
    await stream.aclose()


async def test_a_refusal_for_good_is_raised_and_not_retried() -> None:
    refused = Scripted([Frame(ERROR, refusal=FORBIDDEN)])
    stream = ClientStream(connections(refused, Scripted([ready()])))
    with pytest.raises(StreamRefused) as caught:
        async with asyncio.timeout(2):
            await stream.start()
    assert caught.value.refusal is FORBIDDEN and stream.connections == 1
    await stream.aclose()


async def test_a_server_message_that_skips_one_is_a_protocol_error() -> None:
    conn = Scripted([ready(), message(2, "skipped one")], hold=True)
    stream = ClientStream(connections(conn))
    await stream.start()
    with pytest.raises(Exception, match="gap"):
        async with asyncio.timeout(2):
            await stream.receive()
    await stream.aclose()


async def test_a_connection_failing_however_its_transport_says_is_made_again() -> None:
    """Whatever a transport raises for a connection that failed (aiohttp's errors,
    gRPC's AioRpcError, an OSError), the stream connects again."""
    broken = Scripted([], broken=RuntimeError("a transport's own error"))
    stream = ClientStream(connections(broken, Scripted([ready()], hold=True)),
                          backoff=(0.001, 0.001))
    async with asyncio.timeout(2):
        await stream.start()
    assert stream.connections == 2 and stream.token == TOKEN
    await stream.aclose()


class Slow(Scripted):
    """A connection whose message ``seq`` is answered only once ``answered`` is set (a
    POST held up while the stream resumes elsewhere), after its server stopped carrying
    the stream: the message reached a server that will never commit it."""

    def __init__(self, frames: list[Frame], seq: int):
        super().__init__(frames, hold=True)
        self.slow_seq = seq
        self.sending = asyncio.Event()
        self.answered = asyncio.Event()

    async def send_message(self, seq: int, payload: Any, ack: int | None = None,
                           text: str | None = None) -> None:
        if seq == self.slow_seq:
            self.sending.set()
            await self.answered.wait()
        await super().send_message(seq, payload, ack, text)


async def test_a_message_a_replaced_connection_sent_is_sent_again_on_the_new_one() -> None:
    """A send on a connection that broke may end after the stream resumed on another (a
    POST Envoy retried, answered by the former server): it counts for nothing there. The
    new connection sends again everything its server had not consumed, the messages the
    former one sent after the resume included, in order: none is left to a server that
    no longer carries the stream (the stream stalled, the later messages held back
    waiting for it, when the former connection's sender moved the new one's position)."""
    first = Slow([ready()], seq=2)
    second = Scripted([ready(consumed=1, out=0)], hold=True)
    stream = ClientStream(connections(first, second), backoff=(0.001, 0.001))
    await stream.start()
    await stream.send(1)
    sending = asyncio.create_task(stream.send(2))  # held up on the first connection
    async with asyncio.timeout(2):
        await first.sending.wait()
    await first.close()  # its events end: the stream resumes on the second
    await wait_until(lambda: stream.consumed == 1, timeout=2, interval=0.001,
                     what="the second connection's ready")
    first.answered.set()  # the held-up message is answered on the first, too late
    async with asyncio.timeout(2):
        await sending
    await stream.send(3)
    assert [s for s in second.sent if s[0] == "m"] == [("m", 2, 2), ("m", 3, 3)]
    assert [s for s in first.sent if s[0] == "m"] == [("m", 1, 1), ("m", 2, 2)]
    await stream.aclose()


async def test_a_sender_stuck_on_a_broken_connection_holds_back_no_resend() -> None:
    """A write on a connection whose member died may not return for long (a message
    POST held up until its timeout). The new connection sends again at once
    what its server had not consumed, and messages queued meanwhile follow it there,
    whatever the former connection's sender is still doing."""
    first = Slow([ready()], seq=2)
    second = Scripted([ready(consumed=1, out=0)], hold=True)
    stream = ClientStream(connections(first, second), backoff=(0.001, 0.001))
    await stream.start()
    await stream.send(1)
    sending = asyncio.create_task(stream.send(2))  # stuck on the first connection
    async with asyncio.timeout(2):
        await first.sending.wait()
    await first.close()
    await wait_until(lambda: ("m", 2, 2) in second.sent, timeout=2, interval=0.001,
                     what="the new connection's resend, the old sender still stuck")
    async with asyncio.timeout(2):
        await stream.send(3)
    assert [x for x in second.sent if x[0] == "m"] == [("m", 2, 2), ("m", 3, 3)]
    first.answered.set()
    async with asyncio.timeout(2):
        await sending
    assert [x for x in second.sent if x[0] == "m"] == [("m", 2, 2), ("m", 3, 3)]
    await stream.aclose()


class Silent(Scripted):
    """A connection held open that never answers its hello (a member taking a stream
    over that hangs, a request Envoy holds)."""

    async def frames(self) -> AsyncIterator[Frame]:
        await self.closed.wait()
        return
        yield  # an async generator


async def test_a_connection_silent_after_its_hello_is_given_up_for_another() -> None:
    first = Scripted([ready(), message(1, "r1")])  # then breaks
    silent = Silent([])
    third = Scripted([ready(consumed=0, out=1), message(2, "r2")], hold=True)
    stream = ClientStream(connections(first, silent, third), backoff=(0.001, 0.001),
                          connect_timeout=0.05)
    await stream.start()
    async with asyncio.timeout(2):
        assert await stream.receive() == "r1"
    async with asyncio.timeout(2):
        assert await stream.receive() == "r2"
    assert silent.closed.is_set() and silent.hello_frame is not None
    assert third.hello_frame == Frame(RESUME, token=TOKEN, recv=1)
    assert stream.connections == 3 and len(stream.resumes) == 1
    await stream.aclose()


async def test_a_mesh_that_never_answers_loses_the_stream_within_its_budget() -> None:
    from meshxl.streams.client import StreamLost

    first = Scripted([ready(), message(1, "r1")])  # then breaks; nothing answers after
    stream = ClientStream(connections(first), resume_timeout=0.2, backoff=(0.001, 0.001))
    await stream.start()
    async with asyncio.timeout(2):
        assert await stream.receive() == "r1"
    with pytest.raises(StreamLost):
        async with asyncio.timeout(2):
            await stream.receive()
    await stream.aclose()


async def test_thousands_of_failed_attempts_leave_the_stream_trying() -> None:
    # A connection refused at once, again and again: the backoff's exponent grows with
    # each attempt, and past about 1,070 of them 2 ** n was no float (the stream's task
    # died of an OverflowError and the stream waited forever, neither lost nor resumed).
    attempts = 0
    many = asyncio.Event()

    async def refused() -> Scripted:
        nonlocal attempts
        attempts += 1
        if attempts >= 1200:
            many.set()
            await asyncio.Event().wait()  # then a mesh that never answers
        raise ConnectionRefusedError

    stream = ClientStream(refused, resume_timeout=3600, backoff=(0.0, 0.0))
    starting = asyncio.create_task(stream.start())
    async with asyncio.timeout(30):
        await many.wait()
    assert stream._task is not None and not stream._task.done()
    starting.cancel()
    await stream.aclose()


class _DeadCall:
    """A grpc.aio stream-stream call whose member was killed: writes fail at once, while
    its messages' iteration has not yet seen the end (it is cancelled first: the race
    that left gRPC streams waiting forever on a call that was gone)."""

    def __init__(self, token: str):
        self.token = token
        self.cancelled = False

    async def initial_metadata(self) -> tuple[tuple[str, str], ...]:
        from meshxl.streams import grpcwire
        return ((grpcwire.STREAM, self.token), (grpcwire.FROM, "1"), (grpcwire.IN, "0"))

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[Any]:
        await asyncio.Event().wait()
        yield None  # never: an async generator

    async def write(self, message: Any) -> None:
        raise asyncio.InvalidStateError("RPC already finished")

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class _Message:
    FromString = staticmethod(bytes)


class _Channel:
    """Only what :class:`~meshxl.streams.grpc_client._Call` asks of a channel (no socket)."""

    def __init__(self) -> None:
        self.calls: list[_DeadCall] = []

    def unary_unary(self, *_: Any, **__: Any) -> Any:
        async def ack(*_: Any, **__: Any) -> dict[str, int]:
            return {"in": 0}
        return ack

    def stream_stream(self, *_: Any, **__: Any) -> Any:
        def call(metadata: Any = ()) -> _DeadCall:
            self.calls.append(_DeadCall(TOKEN))
            return self.calls[-1]
        return call


async def test_a_grpc_call_whose_send_failed_is_left_and_the_stream_resumes() -> None:
    from meshxl.streams import grpc_client

    channel = _Channel()

    async def connect() -> grpc_client._Call:
        return grpc_client._Call(channel, "/m", None, None, _Message, [], Limits(ack_delay=0.01))

    stream = ClientStream(connect, backoff=(0.001, 0.001))
    async with asyncio.timeout(2):
        await stream.start()
    await stream.send({"n": 1})  # the write fails: the call is closed, the pump cancelled
    await wait_until(lambda: len(stream.resumes) >= 1, timeout=2, interval=0.001,
                     what="the stream resumed on a new call")
    assert channel.calls[0].cancelled and len(channel.calls) >= 2
    await stream.aclose()


async def test_a_grpc_stream_has_one_ack_call_in_flight_and_the_next_carries_the_latest(
        ) -> None:
    """A member slow to answer Acks (one taking many streams over) is sent no second
    Ack of the same stream meanwhile, and none is given up on a short deadline: each
    given up is a RST_STREAM on the shared connection. When it returns, one more
    carries what was acknowledged meanwhile."""
    from meshxl.streams import grpc_client

    asked: list[dict[str, Any]] = []
    in_flight, most = 0, 0
    answer = asyncio.Event()

    class SlowAcks(_Channel):
        def unary_unary(self, *_: Any, **__: Any) -> Any:
            async def ack(request: dict[str, Any], **kwargs: Any) -> dict[str, int]:
                nonlocal in_flight, most
                assert kwargs.get("timeout", 1e9) >= 30, kwargs  # a backstop only
                asked.append(request)
                in_flight += 1
                most = max(most, in_flight)
                try:
                    await answer.wait()
                finally:
                    in_flight -= 1
                return {"in": 0}
            return ack

    call = grpc_client._Call(SlowAcks(), "/m", None, None, _Message, [], Limits(ack_delay=0.01))
    call.token = TOKEN
    for seq in (1, 2, 3):
        await call.send_ack(seq)
        call._probe_now()  # due at once, as when ACK_EARLY's bytes have gathered
        await asyncio.sleep(0.01)
    assert [a["recv"] for a in asked] == [1] and most == 1
    answer.set()
    await wait_until(lambda: len(asked) == 2 and not call._acking, timeout=2,
                     interval=0.001, what="the one Ack due meanwhile")
    assert asked[1]["recv"] == 3 and most == 1
    await call.close()


async def test_a_closed_grpc_calls_ack_in_flight_is_left_to_finish() -> None:
    """A thousand streams breaking at once must not cancel a thousand Acks: each
    cancelled call is a RST_STREAM, and past nghttp2's burst of them Envoy closes the
    connection with every stream on it."""
    from meshxl.streams import grpc_client

    answer, finished = asyncio.Event(), asyncio.Event()

    class SlowAcks(_Channel):
        def unary_unary(self, *_: Any, **__: Any) -> Any:
            async def ack(request: dict[str, Any], **kwargs: Any) -> dict[str, int]:
                await answer.wait()
                finished.set()
                return {"in": 0}
            return ack

    call = grpc_client._Call(SlowAcks(), "/m", None, None, _Message, [], Limits(ack_delay=0.01))
    call.token = TOKEN
    await call.send_ack(1)
    call._probe_now()
    await asyncio.sleep(0.01)
    await call.close()
    answer.set()
    async with asyncio.timeout(2):
        await finished.wait()  # not cancelled by the close
    await asyncio.sleep(0.01)
    assert not call._acking and not grpc_client._ACKS
    assert [f async for f in call.frames()] == []  # its answer dropped with the call


class Held(Scripted):
    """A connection whose sends wait on ``gate``: a transport's flow control, holding a
    resend until its peer reads, which it does only as fast as its own sends go."""

    def __init__(self, frames: list[Frame]):
        super().__init__(frames, hold=True)
        self.gate = asyncio.Event()

    async def _through(self) -> None:
        await wait_until(lambda: self.gate.is_set() or self.closed.is_set(), timeout=5,
                         interval=0.005)
        if not self.gate.is_set():
            raise ConnectionResetError("closed")

    async def send_message(self, seq: int, payload: Any, ack: int | None = None,
                           text: str | None = None) -> None:
        await self._through()
        await super().send_message(seq, payload, ack, text)

    async def send_end(self, last: int) -> None:
        await self._through()
        await super().send_end(last)


async def test_a_resume_reads_the_new_connection_while_its_resend_waits() -> None:
    first = Scripted([ready()], hold=True)
    second = Held([ready(), message(1, "r1"), message(2, "r2")])
    stream = ClientStream(connections(first, second), backoff=(0.001, 0.001))
    await stream.start()
    await stream.send("q1")
    await stream.send("q2")
    first.closed.set()  # it breaks with both unconsumed
    async with asyncio.timeout(2):  # the resend of q1, q2 still waits on the gate
        assert [await stream.receive(), await stream.receive()] == ["r1", "r2"]
    assert [s for s in second.sent if s[0] == "m"] == []
    second.gate.set()
    await wait_until(lambda: [s for s in second.sent if s[0] == "m"]
                     == [("m", 1, "q1"), ("m", 2, "q2")], timeout=2)
    await stream.aclose()


@pytest.mark.parametrize("closed_before_ready", [True, False])
async def test_the_end_goes_once_after_the_resend(closed_before_ready: bool) -> None:
    first = Held([ready()])  # its sends never go
    second = Held([ready()])
    stream = ClientStream(connections(first, second), backoff=(0.001, 0.001))
    await stream.start()
    sending = asyncio.get_running_loop().create_task(stream.send("q1"))
    await asyncio.sleep(0.01)
    if closed_before_ready:
        closing = asyncio.get_running_loop().create_task(stream.close())
        await asyncio.sleep(0.01)
        first.closed.set()  # the end said: the resend carries it
    else:
        first.closed.set()
        await wait_until(lambda: second.hello_frame is not None, timeout=2)
        await asyncio.sleep(0.01)
        closing = asyncio.get_running_loop().create_task(stream.close())
        await asyncio.sleep(0.01)
        assert not closing.done()  # behind the resend, which waits on the gate
    second.gate.set()
    await wait_until(lambda: ("end", 1) in second.sent, timeout=2)
    await asyncio.gather(sending, closing)
    await asyncio.sleep(0.05)
    assert second.sent == [("m", 1, "q1"), ("end", 1)]
    assert first.sent == []
    await stream.aclose()


async def test_a_message_is_encoded_once_however_often_it_is_sent() -> None:
    """The limits' size and every connection's frame share one encoding of a message:
    a resume sends again what was not consumed without encoding it again."""
    texts: list[str | None] = []
    resent = asyncio.Event()

    class Texts(Scripted):
        async def send_message(self, seq: int, payload: Any, ack: int | None = None,
                               text: str | None = None) -> None:
            texts.append(text)
            if len(texts) == 2:
                resent.set()
            await super().send_message(seq, payload, ack, text)

    first = Texts([ready()], hold=True)
    second = Texts([ready()], hold=True)
    stream = ClientStream(connections(first, second), backoff=(0.001, 0.001))
    await stream.start()
    encodings = 0

    class Counted(dict[str, Any]):
        def items(self) -> Any:  # type: ignore[override]
            nonlocal encodings
            encodings += 1
            return super().items()

    await stream.send(Counted(n=1))
    assert texts == ['{"n":1}']
    first.closed.set()  # the connection breaks before the server consumed it
    async with asyncio.timeout(2):
        await resent.wait()
    assert texts == ['{"n":1}', '{"n":1}'] and encodings == 1
    await stream.close()
