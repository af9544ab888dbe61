"""A statesync sidecar in the test's own process (its HTTP server on a real loopback
socket, a real etcd), for tests that look inside it (its sessions' locks, the garbage
collector), and a raw HTTP/1.1 connection to it that sends requests as given, several in
one write when asked (pipelined)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from meshxl.addr import bind_tcp, bound_port
from meshxl.statesync import app

JSON = "application/json"

Request = tuple[str, str, bytes, dict[str, str]]
"""(method, path, body, headers); Host, Content-Length and a JSON Content-Type are
added unless given."""


@contextlib.asynccontextmanager
async def sidecar(etcd_url: str, *, cluster: str = "orders",
                  member: str = "a") -> AsyncIterator[tuple[int, app.Sidecar]]:
    """The sidecar of ``member`` of ``cluster``: (its port, the sidecar); stopped at the
    end."""
    sock = bind_tcp("127.0.0.1:0")
    port = bound_port(sock)
    config = app.StatesyncConfig(cluster=cluster, member=member, app="127.0.0.1:9",
                                 etcd=etcd_url, listen=f"127.0.0.1:{port}")
    client, side = await app._start(config)
    server = app.http_server(side)
    await server.listen(sock)
    try:
        yield port, side
    finally:
        await server.close()
        await side.stop()
        await client.close()


class RawHttp:
    """One keep-alive connection; answers read in order (``Content-Length`` bodies)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> RawHttp:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def close(self) -> None:
        self.writer.close()

    async def call(self, method: str, path: str, body: bytes = b"",
                   headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """One request and its answer: (status, body)."""
        [(status, _, answer)] = await self.pipelined([(method, path, body, headers or {})])
        return status, answer

    async def pipelined(self, requests: Sequence[Request], timeout: float = 15.0
                        ) -> list[tuple[int, dict[str, str], bytes]]:
        """``requests`` in one write; their answers, in order: (status, headers by
        lower-case name, body)."""
        out = b""
        for method, path, body, headers in requests:
            fields = {"Host": "sidecar", "Content-Length": str(len(body)),
                      "Content-Type": JSON, **headers}
            head = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in fields.items())]
            out += ("\r\n".join(head) + "\r\n\r\n").encode() + body
        self.writer.write(out)
        answers = []
        async with asyncio.timeout(timeout):
            for _ in requests:
                status = int((await self.reader.readline()).split()[1])
                fields: dict[str, str] = {}
                while (line := await self.reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    fields[name.lower()] = value.strip()
                answer = await self.reader.readexactly(int(fields.get("content-length", 0)))
                answers.append((status, fields, answer))
        return answers
