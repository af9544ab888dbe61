"""Both clients against a real ``meshxl serve statesync`` sidecar on a real etcd, with
answers large enough that the sidecar's pipelined answers arrive in reads past 64 KiB:
16 GETs of 4,200-byte sessions at once, and a conditional PUT pipelined behind them.

Before the clients parsed answers through one reader that counts each answer's head on
its own, a read over 64 KiB was taken as one answer's head: 14 rounds in 15 failed
("the answer's head is larger than 65536 bytes"), and a PUT behind the GETs raised
WriteUncertain in 16 rounds of 20 although every write was applied.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from meshxl.client import AsyncClient, Client, ClientSettings
from meshxl.local.ports import free_port
from tests.harness import EtcdServer

pytestmark = pytest.mark.integration

SESSIONS = 16
ROUNDS = 15
STATE = b"x" * 4200  # the report's 4,200-byte sessions (the reads' cut fell in a head)
SETTINGS = ClientSettings(pipeline=32)


async def test_sixteen_pipelined_gets_and_a_put_behind_them(
        etcd: EtcdServer, start_sidecar: Any) -> None:
    sidecar = await start_sidecar(cluster="shop", member="a", etcd=etcd.url,
                                  app_port=free_port())
    ids = [f"s{i:02}" for i in range(SESSIONS)]
    async with AsyncClient(sidecar.url, settings=SETTINGS) as client:
        for session in ids:
            await client.put(session, STATE, content_type="application/octet-stream")
        etag = (await client.put("counter", {"n": 0})).etag
        for n in range(1, ROUNDS + 1):
            got = await asyncio.gather(*(client.get(s) for s in ids),
                                       client.put("counter", {"n": n}, if_match=etag))
            sessions, written = got[:-1], got[-1]
            assert all(s.state == STATE for s in sessions), n  # type: ignore[union-attr]
            etag = written.etag  # type: ignore[union-attr]
        assert (await client.get("counter")).state == {"n": ROUNDS}
        assert client._pool is not None and client._pool.opened == 1  # one connection

    # The blocking client reads the same answers (one at a time, large ones included).
    def blocking() -> None:
        with Client(sidecar.url) as sync:
            assert [sync.get(s).state for s in ids] == [STATE] * SESSIONS
            assert [s.state for s in sync.bulk_get(ids)] == [STATE] * SESSIONS  # type: ignore[union-attr]

    await asyncio.to_thread(blocking)
