"""A wide-area link in user space: a transparent TCP proxy that holds every byte for
half a round trip in each direction (what toxiproxy's latency toxic does), for kernels
without ``sch_netem``.

One proxy runs in each site's network namespace (:mod:`meshxl.local.sites`). An
iptables rule there (``nat OUTPUT``) sends the site's TCP connections to another site's
address to the proxy; the proxy reads where they were going (``SO_ORIGINAL_DST``),
connects there with :data:`MARK` on its socket (which the rule lets through), and
copies bytes both ways, each chunk leaving ``delay`` seconds after it arrived. Every
process keeps its real addresses: etcd's peer URLs, Envoy's endpoints and the sidecars'
etcd endpoints cross the link without knowing it. A new connection costs one round trip
before its first byte, as a TCP handshake does.

``python -m meshxl.local.wan proxy --listen IP:PORT --delay-ms N`` runs a proxy;
``echo --listen IP:PORT`` an echo server; ``rtt HOST:PORT`` measures the link itself (a
raw TCP round trip through it) and prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import struct
import sys
import time
from collections.abc import Sequence

__all__ = ["MARK", "original_destination", "round_trips", "serve_echo", "serve_proxy"]

MARK = 0x4D58
"""The firewall mark of the proxy's own outgoing connections (not redirected again)."""

_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
_SO_MARK = 36  # asm-generic/socket.h (no constant in the socket module before 3.12)
_CHUNK = 65536


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where a redirected connection was going (``SO_ORIGINAL_DST``, IPv4)."""
    raw = sock.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


async def _connect_marked(host: str, port: int) -> tuple[asyncio.StreamReader,
                                                         asyncio.StreamWriter]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_MARK, MARK)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def _carry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float,
                 opened: asyncio.Future[None] | None = None) -> None:
    """Copy ``reader`` to ``writer``, each chunk written ``delay`` after it was read."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def read() -> None:
        try:
            while data := await reader.read(_CHUNK):
                queue.put_nowait((loop.time() + delay, data))
        except (ConnectionError, OSError):
            pass
        queue.put_nowait((loop.time() + delay, b""))

    reading = loop.create_task(read())
    try:
        if opened is not None:
            await opened
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading


async def _link(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter,
                delay: float) -> None:
    sock = client_w.get_extra_info("socket")
    server_w: asyncio.StreamWriter | None = None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        host, port = original_destination(sock)
        await asyncio.sleep(2 * delay)  # the handshake's round trip
        async with asyncio.timeout(10):
            server_r, writer = await _connect_marked(host, port)
        server_w = writer
        await asyncio.gather(_carry(client_r, writer, delay),
                             _carry(server_r, client_w, delay))
    except (ConnectionError, OSError, TimeoutError):
        pass
    finally:
        for w in (client_w, server_w):
            if w is not None:
                w.close()


_links: set[asyncio.Task[None]] = set()
"""Every connection being carried: held here, or a task waiting on its two copies (a
reference cycle nothing else holds) could be collected mid-flight."""


def _accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    task = asyncio.get_running_loop().create_task(_link(reader, writer, delay))
    _links.add(task)
    task.add_done_callback(_links.discard)


async def serve_proxy(listen: str, delay: float) -> asyncio.Server:
    """The delay proxy on ``listen`` (``IP:PORT``): ``delay`` seconds each way."""
    host, port = listen.rsplit(":", 1)
    return await asyncio.start_server(lambda r, w: _accept(r, w, delay), host, int(port),
                                      reuse_address=True, backlog=1024)


async def serve_echo(listen: str) -> asyncio.Server:
    """A TCP echo server (the far end of :func:`round_trips`)."""
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(_CHUNK):
                writer.write(data)
                await writer.drain()
        writer.close()

    host, port = listen.rsplit(":", 1)
    return await asyncio.start_server(echo, host, int(port), reuse_address=True)


async def round_trips(host: str, port: int, count: int = 20,
                      timeout: float = 10.0) -> dict[str, float]:
    """A raw TCP round trip through the link: the connect (a handshake, and the proxy's
    own) and ``count`` one-byte ping-pongs on one connection, in milliseconds."""
    started = time.perf_counter()
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times: list[float] = []
    try:
        for _ in range(count):
            sent = time.perf_counter()
            writer.write(b"x")
            await writer.drain()
            async with asyncio.timeout(timeout):
                await reader.readexactly(1)
            times.append((time.perf_counter() - sent) * 1e3)
        connect = (time.perf_counter() - started) * 1e3 - sum(times)
    finally:
        writer.close()
    times.sort()
    return {"count": count, "connect_ms": round(connect, 3), "min_ms": round(times[0], 3),
            "p50_ms": round(times[len(times) // 2], 3), "max_ms": round(times[-1], 3)}


async def _forever(server: asyncio.Server) -> None:
    async with server:
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshxl.local.wan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    proxy = sub.add_parser("proxy", help="run the delay proxy")
    proxy.add_argument("--listen", required=True, metavar="IP:PORT")
    proxy.add_argument("--delay-ms", type=float, required=True,
                       help="held in each direction: half the round trip to add")
    echo = sub.add_parser("echo", help="run a TCP echo server")
    echo.add_argument("--listen", required=True, metavar="IP:PORT")
    rtt = sub.add_parser("rtt", help="measure a raw TCP round trip (JSON)")
    rtt.add_argument("target", metavar="HOST:PORT")
    rtt.add_argument("--count", type=int, default=20)
    args = parser.parse_args(argv)
    if args.command == "proxy":
        if not 0 <= args.delay_ms <= 10_000:
            parser.error(f"--delay-ms must be 0..10000, got {args.delay_ms}")
        return asyncio.run(_start_and_serve(serve_proxy(args.listen, args.delay_ms / 1e3)))
    if args.command == "echo":
        return asyncio.run(_start_and_serve(serve_echo(args.listen)))
    host, port = args.target.rsplit(":", 1)
    print(json.dumps(asyncio.run(round_trips(host, int(port), args.count))))
    return 0


async def _start_and_serve(starting: object) -> int:
    server = await starting  # type: ignore[misc]
    print(f"listening on {', '.join(str(s.getsockname()) for s in server.sockets)}",
          file=sys.stderr, flush=True)
    await _forever(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
