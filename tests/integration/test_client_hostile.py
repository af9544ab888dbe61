"""Both clients (the blocking ``Client`` and ``AsyncClient``) against a hostile peer
(tests/harness/hostile.py): every call ends within its deadline whatever the peer does
(a flood of interim answers, a byte at a time), a truncated answer is an error and never
an empty success, and no answer larger than the cap is read, let alone kept.

Each client is given one try (no retries) so that one call is one request: the time
bounds asserted are the request's own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from meshxl.client import AsyncClient, Backoff, Client, ClientSettings, Unreachable
from tests.harness.clock import scaled
from tests.harness.hostile import HostileServer, Peer

TIMEOUT = 0.6
SLACK = scaled(1.0)
"""What a call may take past its deadline on this machine (scheduling, not waiting)."""
ONE_TRY = ClientSettings(timeout=TIMEOUT, connect_timeout=1.0,
                         unavailable=Backoff(attempts=1))
STATE = b'{"n": 1}'
GOOD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nETag: \"3\"\r\n"
        b"Content-Length: %d\r\n\r\n" % len(STATE)) + STATE

Call = Callable[[str, ClientSettings], Any]


def sync_get(url: str, settings: ClientSettings) -> Any:
    with Client(url, settings=settings) as client:
        return client.get("s1")


def async_get(url: str, settings: ClientSettings) -> Any:
    async def main() -> Any:
        async with AsyncClient(url, settings=settings) as client:
            return await client.get("s1")

    return asyncio.run(main())


CLIENTS = pytest.mark.parametrize("call", [sync_get, async_get], ids=["sync", "async"])


def timed(call: Call, url: str, settings: ClientSettings = ONE_TRY) -> tuple[Any, float]:
    started = time.monotonic()
    try:
        result: Any = call(url, settings)
    except Unreachable as exc:
        result = exc
    return result, time.monotonic() - started


@CLIENTS
def test_a_good_answer_is_read(call: Call) -> None:
    def script(peer: Peer) -> None:
        while peer.request():
            peer.send(GOOD)

    with HostileServer(script) as server:
        session, _ = timed(call, server.url)
    assert session.state == {"n": 1} and session.etag == '"3"'


@CLIENTS
def test_interim_answers_forever(call: Call) -> None:
    """A peer that answers 100 Continue and never anything else."""
    def script(peer: Peer) -> None:
        if peer.request():
            end = time.monotonic() + 10
            while time.monotonic() < end and peer.send(b"HTTP/1.1 100 Continue\r\n\r\n"):
                time.sleep(0.001)

    with HostileServer(script) as server:
        error, elapsed = timed(call, server.url)
    assert isinstance(error, Unreachable) and "interim (1xx) answers" in str(error)
    assert elapsed < TIMEOUT + SLACK


@CLIENTS
@pytest.mark.parametrize("drip", [
    b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 1000,  # an endless head
    GOOD[:-1] * 1,  # a whole answer, too slowly
])
def test_a_slow_drip_ends_at_the_deadline(call: Call, drip: bytes) -> None:
    """One byte every 20 ms: each read gets something, long before any per-read
    timeout, so only a deadline for the whole call ends it."""
    def script(peer: Peer) -> None:
        if peer.request():
            peer.drip(drip, every=0.02, seconds=10)

    with HostileServer(script) as server:
        error, elapsed = timed(call, server.url)
    assert isinstance(error, Unreachable) and f"{TIMEOUT:g} s" in str(error), error
    assert TIMEOUT - 0.05 < elapsed < TIMEOUT + SLACK


TRUNCATED = {
    "status line, then close": b"HTTP/1.1 200 OK\r\n",
    "head without its blank line": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n",
    "body cut": GOOD[:-3],
    "chunked body cut": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n{\"n\": 1",
    "no last chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"8\r\n{\"n\": 1}\r\n",
}


@CLIENTS
@pytest.mark.parametrize("name", sorted(TRUNCATED))
def test_a_truncated_answer_is_an_error(call: Call, name: str) -> None:
    def script(peer: Peer) -> None:
        if peer.request():
            peer.send(TRUNCATED[name])

    with HostileServer(script) as server:
        error, elapsed = timed(call, server.url)
    assert isinstance(error, Unreachable), error
    assert "closed the connection before its answer was complete" in str(error)
    assert elapsed < TIMEOUT + SLACK


@CLIENTS
def test_an_answer_without_framing_is_refused(call: Call) -> None:
    def script(peer: Peer) -> None:
        if peer.request():
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + STATE)

    with HostileServer(script) as server:
        error, _ = timed(call, server.url)
    assert isinstance(error, Unreachable) and "neither Content-Length nor chunked" in \
        str(error)


@CLIENTS
def test_a_300_mib_answer_is_refused_by_its_length(call: Call) -> None:
    """The declared length is past the cap: refused before its body is read."""
    def script(peer: Peer) -> None:
        if peer.request():
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (300 << 20))
            block = b"x" * (1 << 20)
            for _ in range(300):
                if not peer.send(block):
                    return

    with HostileServer(script) as server:
        error, elapsed = timed(call, server.url)
        sent = server.peers[0].sent
    assert isinstance(error, Unreachable)
    assert f"larger than {64 << 20} bytes (Content-Length: {300 << 20})" in str(error)
    assert sent < 64 << 20 and elapsed < TIMEOUT + SLACK


@CLIENTS
def test_an_endless_chunked_answer_stops_at_the_cap(call: Call) -> None:
    cap = 1 << 20
    settings = ClientSettings(timeout=5, unavailable=Backoff(attempts=1), max_answer=cap)

    def script(peer: Peer) -> None:
        if peer.request():
            peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
            for _ in range(2000):  # 128 MiB at most
                if not peer.send(chunk):
                    return

    with HostileServer(script) as server:
        error, _ = timed(call, server.url, settings)
        sent = server.peers[0].sent
    assert isinstance(error, Unreachable) and f"larger than {cap} bytes" in str(error)
    assert sent < 64 * cap  # the client stopped reading, the peer could not go on


@CLIENTS
def test_more_than_was_asked_is_refused(call: Call) -> None:
    """Two answers to one request: the second is no answer to anything; the first is
    read, the connection is not used again."""
    def script(peer: Peer) -> None:
        while peer.request():
            peer.send(GOOD + GOOD)

    with HostileServer(script) as server:
        session, _ = timed(call, server.url)
    assert session.state == {"n": 1}
