"""A hostile HTTP peer for client tests: a TCP server on loopback whose every
connection runs a script (answer with 1xx forever, drip a byte at a time, close in the
middle of an answer, send more than asked...), in threads, so blocking and asyncio
clients can both be pointed at it. Every script is bounded in time and bytes: it stops
when the client goes away, when the server stops, or at its own limit.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType

__all__ = ["Peer", "HostileServer"]


class Peer:
    """One accepted connection, as a script sees it."""

    def __init__(self, sock: socket.socket, stopping: threading.Event) -> None:
        self.sock = sock
        self.stopping = stopping
        self.sent = 0
        """Bytes written to the client so far."""

    def request(self, timeout: float = 5.0) -> bytes:
        """The next request's head (up to its blank line); b"" if the client left."""
        data = b""
        try:
            self.sock.settimeout(timeout)
            while b"\r\n\r\n" not in data:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return b""
                data += chunk
        except OSError:
            return b""
        return data

    def send(self, data: bytes) -> bool:
        """Write ``data``; False once the client is gone or the server stops."""
        if self.stopping.is_set():
            return False
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        self.sent += len(data)
        return True

    def drip(self, data: bytes, every: float, seconds: float) -> None:
        """Write ``data`` over and over, one byte every ``every`` seconds, for at most
        ``seconds``."""
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end and self.send(data[i % len(data):i % len(data) + 1]):
            i += 1
            if self.stopping.wait(every):
                return

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


Script = Callable[[Peer], None]


class HostileServer:
    """``with HostileServer(script) as server:`` serves ``127.0.0.1:server.port``."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)  # so the acceptor sees the server stop
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.peers: list[Peer] = []
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> HostileServer:
        self._acceptor.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stopping.set()
        self.listener.close()
        for peer in self.peers:
            peer.close()
        for thread in [self._acceptor, *self._threads]:
            thread.join(10)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            peer = Peer(sock, self._stopping)
            self.peers.append(peer)
            thread = threading.Thread(target=self._run, args=(peer,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self, peer: Peer) -> None:
        try:
            self.script(peer)
        finally:
            peer.close()
