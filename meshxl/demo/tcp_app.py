"""The demo's stateful TCP service: the per-session counter of :mod:`meshxl.demo.app`
as a line protocol (:mod:`meshxl.local.counter`), its state only in the member's
statesync sidecar.

A client keeps one connection and sends ``INC SESSION`` (or ``GET SESSION``) lines;
each is answered ``OK MEMBER SESSION SEQ`` once the write is acknowledged. When the
session cannot be served here (the sidecar failed, the session belongs to a fenced
owner) the member answers ``ERR ...`` and closes the connection: the client reconnects
through Envoy, whose TCP proxy hashes its source address to a member that can. Over
the cluster's quota it answers ``ERR over quota ...`` and keeps the connection: no
other member would help (each sidecar has its own bucket).
Readiness is the sidecar's registration (``membership: registered``); Envoy's TCP
health check connects.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from meshxl.addr import parse_hostport
from meshxl.client import (
    AsyncClient,
    Backoff,
    BadRequest,
    ClientSettings,
    NotFound,
    OverQuota,
)
from meshxl.client.plans import check_session_id
from meshxl.demo.signals import until_stopped
from meshxl.errors import MeshxlError

log = logging.getLogger("meshxl.demo.tcp_app")

MAX_LINE = 1024
SETTINGS = ClientSettings(timeout=5.0, unavailable=Backoff(attempts=1),
                          conflicts=Backoff(attempts=3, first=0.0))


def _seq(state: Any) -> int:
    try:
        return int(state.get("seq", 0)) if state else 0
    except (AttributeError, TypeError, ValueError):
        return 0


class CounterServer:
    def __init__(self, member: str, client: AsyncClient) -> None:
        self.member = member
        self.client = client

    async def answer(self, line: bytes) -> tuple[bytes, bool]:
        """The answer to one request line, and whether to keep the connection."""
        parts = line.decode(errors="replace").split()
        if len(parts) != 2 or parts[0] not in ("INC", "GET"):
            return b"ERR expected 'INC SESSION' or 'GET SESSION'\n", True
        verb, session = parts
        try:
            check_session_id(session)
            if verb == "INC":
                updated = await self.client.update(
                    session, lambda state: {"seq": _seq(state) + 1, "member": self.member})
                seq = int(updated.state["seq"])
            else:
                try:
                    seq = _seq((await self.client.get(session)).state)
                except NotFound:
                    seq = 0
        except BadRequest as exc:
            return f"ERR {exc}\n".encode(), True
        except OverQuota as exc:  # the tenant's own limit: reconnecting would not help
            return (f"ERR over quota: {exc.details.get('quota')}; retry in "
                    f"{exc.retry_after_header} s\n").encode(), True
        except MeshxlError as exc:
            return f"ERR {' '.join(str(exc).split())[:300]}\n".encode(), False
        return f"OK {self.member} {session} {seq}\n".encode(), True

    async def connection(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.LimitOverrunError:
                    writer.write(b"ERR line too long\n")
                    break
                except asyncio.IncompleteReadError:
                    break
                answer, keep = await self.answer(line)
                writer.write(answer)
                await writer.drain()
                if not keep:
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


async def serve(member: str, listen: str, sidecar: str) -> None:
    host, port = parse_hostport(listen)
    client = AsyncClient(sidecar, settings=SETTINGS)
    counter = CounterServer(member, client)
    server = await asyncio.start_server(counter.connection, host, port, limit=MAX_LINE)
    log.info("TCP member %s serving on %s, state in %s", member, listen, sidecar)
    try:
        await until_stopped()
    finally:
        server.close()
        await client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshxl.demo.tcp_app",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument("--sidecar", required=True, metavar="URL")
    parser.add_argument("--cluster", default="demo")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args.name, args.listen, args.sidecar))
    return 0


if __name__ == "__main__":
    from meshxl.exiting import run_main

    run_main(main)
