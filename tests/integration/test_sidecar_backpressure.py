"""The real sidecar under clients that hold on to it: pipelined GETs of big sessions
from clients that never read cost the sidecar about one answer budget per connection,
not the answers they asked for (memory measured as the process's RSS); every answer
still arrives, in order and whole, once they read. Slow bodies filling the connection
cap do not lock ``/healthz`` out."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from meshxl.local.ports import free_port
from meshxl.local.procs import Owner
from meshxl.local.wait import wait_until
from tests.harness.clock import scaled
from tests.harness.sidecar import SidecarProcess

pytestmark = pytest.mark.integration

SESSION_BYTES = 512 * 1024
SESSIONS = 96  # each client GETs every one: reads of distinct sessions run together
CLIENTS = 2
GROWTH_MAX = 32 * 1024 * 1024
"""Generous: the answers asked for are 96 MiB; the budget is 1 MiB per connection."""
STEADY = 1.0  # seconds without growth that end the watch
WATCH_MAX = 10.0


def rss(pid: int) -> int:
    """The process's resident set size in bytes (/proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


async def peak_rss(pid: int) -> int:
    """The highest RSS seen until it stayed below that for :data:`STEADY` seconds (at
    most :data:`WATCH_MAX` seconds of watching)."""
    peak = rss(pid)
    peaked = started = time.monotonic()
    while time.monotonic() - peaked < STEADY and time.monotonic() - started < WATCH_MAX:
        await asyncio.sleep(0.02)
        now = rss(pid)
        if now > peak:
            peak, peaked = now, time.monotonic()
    return peak


def get(session: str) -> bytes:
    return f"GET /v1/sessions/{session} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


async def read_answers(reader: asyncio.StreamReader, count: int) -> list[int]:
    """``count`` answers' body sizes, read in order (Content-Length framing)."""
    sizes = []
    for _ in range(count):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head[:200]
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        await reader.readexactly(length)
        sizes.append(length)
    return sizes


async def test_clients_that_do_not_read_cost_a_budget_not_their_answers(
        harness: Owner, etcd: Any) -> None:
    sidecar = SidecarProcess(harness, cluster="orders", member="a", etcd=etcd.url,
                             app_port=free_port(), log_level="info")
    await sidecar.start()
    state = b"s" * SESSION_BYTES
    for start in range(0, SESSIONS, 8):
        stored = await asyncio.gather(*(sidecar.put(f"big-{i}", state)
                                        for i in range(start, start + 8)))
        assert all(reply.status in (200, 201) for reply in stored)
    for i in range(8):  # the path warm: what one GET allocates for good is allocated
        assert len((await sidecar.get(f"big-{i}")).body) == SESSION_BYTES
    pid = sidecar.process.pid
    assert pid is not None
    before = rss(pid)

    clients = []
    for _ in range(CLIENTS):
        reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port,
                                                       limit=2 * SESSION_BYTES)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        writer.write(b"".join(get(f"big-{i}") for i in range(SESSIONS)))
        await writer.drain()
        clients.append((reader, writer))
    grown = await peak_rss(pid) - before
    print(f'RSS {before / 2**20:.1f} MiB, grown {grown / 2**20:.1f} MiB')
    assert grown < GROWTH_MAX, f"the sidecar grew by {grown / 2**20:.1f} MiB"

    # Back-pressure loses nothing: once read, every answer comes, whole and in order.
    async with asyncio.timeout(60):
        sizes = await asyncio.gather(
            *(read_answers(reader, SESSIONS) for reader, _ in clients))
    assert sizes == [[SESSION_BYTES] * SESSIONS] * CLIENTS
    assert (await sidecar.request("GET", "/healthz")).status == 200
    for _, writer in clients:
        writer.close()


async def test_slow_bodies_at_the_cap_do_not_lock_the_probe_out(
        harness: Owner, etcd: Any) -> None:
    cap = 16
    sidecar = await SidecarProcess(harness, cluster="orders", member="a", etcd=etcd.url,
                                   app_port=free_port(), log_level="info",
                                   max_connections=cap).start()
    slow = []
    for i in range(cap):
        reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
        writer.write(f"PUT /v1/sessions/s{i} HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     "text/plain\r\nContent-Length: 1000\r\n\r\n".encode() + b"x" * 10)
        await writer.drain()
        slow.append((reader, writer))

    async def at_the_cap() -> bool:
        answer = await sidecar.request("GET", "/metrics")
        if answer.status == 503:
            return True  # full, and nothing could make room
        text = answer.body.decode()
        return any(line.startswith("meshxl_statesync_http_connections ")
                   and float(line.split()[1]) >= cap for line in text.splitlines())

    await wait_until(at_the_cap, timeout=10.0, what="the cap full of slow bodies")
    started = time.monotonic()
    assert (await sidecar.request("GET", "/healthz")).status == 200
    assert time.monotonic() - started < scaled(10.0)  # not the body timeout (30 s)
    for _, writer in slow:
        writer.close()
