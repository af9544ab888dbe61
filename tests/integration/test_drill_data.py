"""The drill's data check with a real sidecar and a real etcd, broken the ways a data
check exists for: a session deleted behind the API (``etcdctl del``, here aetcd's
delete), and a sidecar that answers with a value older than etcd's acknowledged one.

Before: both passed as clean. The check compared each answer only with etcd at the
revision the sidecar said it had applied (a sidecar cut off from etcd says an old one
and serves its cache, and matches it), and a session etcd no longer had was "deleted
since", whoever deleted it. Now the answer is compared with etcd's latest acknowledged
version, read before the sidecar is asked (``stale``), and a session acknowledged before
or during the drill that etcd no longer has, with no deletion record (left by every
delete through the API) and not expired, is ``lost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import aetcd
import pytest

from meshxl.etcd.keys import Keys
from meshxl.local.ports import free_port
from meshxl.local.wait import wait_until
from meshxl.operator.drill import DrillConfig, _Drill, markdown
from meshxl.statesync.record import SessionRecord
from tests.harness import EtcdServer

pytestmark = pytest.mark.integration

CLUSTER = "orders"
KEYS = Keys()


def drill_of(client: aetcd.Client, sidecar: Any, tmp_path: Path) -> _Drill:
    return _Drill(client, KEYS, DrillConfig(site="west", output_dir=tmp_path,
                                            check_sidecars=[sidecar.url]), say=print)


async def test_a_session_deleted_behind_the_api_is_lost(
        etcd: EtcdServer, etcd_client: aetcd.Client, start_sidecar: Any,
        tmp_path: Path) -> None:
    sidecar = await start_sidecar(cluster=CLUSTER, member="w1", etcd=etcd.url,
                                  app_port=free_port(), site="east")
    for session in ("s1", "s2", "s3"):
        assert (await sidecar.put(session, {"n": 0})).status == 201
    drill = drill_of(etcd_client, sidecar, tmp_path)
    await drill.data_baseline()

    # During the drill: s4 created, s3 deleted through the API (not a loss), and s1 and
    # s4 deleted behind it.
    assert (await sidecar.put("s4", {"n": 1})).status == 201
    assert (await sidecar.delete("s3")).status == 204
    for session in ("s1", "s4"):
        assert await etcd_client.delete(KEYS.session(CLUSTER, session).encode())

    async def gone() -> bool:
        return (await sidecar.get("s1")).status == 404
    await wait_until(gone, timeout=10, what="the sidecar to see s1 gone")
    [result] = await drill.data_check()
    assert not result["ok"] and result["problems"] == {"lost": 2}, result
    named = sorted(result["named"]["lost"])
    assert named[0].startswith("s1: revision ") and "without a deletion record" in named[0]
    assert named[1].startswith("s4: revision "), named
    assert result["matched"] == 2 and result["sessions"] == 4, result  # s2, and s3 deleted
    assert not drill.steps[-1]["ok"] and "2 lost" in drill.steps[-1]["detail"]
    report = markdown({"site": "west", "result": "failed", "started": "t",
                       "duration_s": 0.0, "steps": drill.steps, "data": [result]})
    assert "problems: 2 lost" in report and "- lost: s1: revision" in report, report


class _Link:
    """A TCP forwarder in front of etcd that can be cut: every connection closed, no
    new one taken (what a sidecar sees when its etcd is partitioned away)."""

    def __init__(self, port: int, target: int) -> None:
        self.port, self.target = port, target
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _accept(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_w}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_w), pump(up_r, writer))

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()


async def test_a_sidecar_serving_older_than_etcd_is_stale(
        etcd: EtcdServer, etcd_client: aetcd.Client, start_sidecar: Any,
        tmp_path: Path) -> None:
    link = _Link(free_port(), etcd.client_port)
    await link.start()
    try:
        sidecar = await start_sidecar(cluster=CLUSTER, member="w1",
                                      etcd=f"http://127.0.0.1:{link.port}",
                                      app_port=free_port(), site="east")
        assert (await sidecar.put("s1", {"n": 1})).status == 201
        assert (await sidecar.put("s2", {"n": 1})).status == 201
        drill = drill_of(etcd_client, sidecar, tmp_path)
        await drill.data_baseline()

        # The sidecar loses etcd; another member writes s1 (acknowledged by etcd). The
        # sidecar still serves its copy, marked unverified, at the revision it knows.
        await link.cut()
        now = time.time()
        newer = await etcd_client.put(KEYS.session(CLUSTER, "s1").encode(), SessionRecord(
            owner="w2", content_type="application/json", created=now, updated=now,
            data=b'{"n": 2}').encode())
        got = await sidecar.get("s1")
        assert got.status == 200 and got.source == "cache-unverified", got
        assert got.json() == {"n": 1}

        [result] = await drill.data_check()
        assert not result["ok"] and result["problems"] == {"stale": 1}, result
        [named] = result["named"]["stale"]
        assert named.startswith(f"s1: sidecar revision {got.etag.strip(chr(34))}, etcd had "
                                f"acknowledged {newer.header.revision}"), named
    finally:
        with contextlib.suppress(Exception):
            await link.cut()


async def test_a_history_compacted_since_the_baseline_is_said(
        etcd: EtcdServer, etcd_client: aetcd.Client, start_sidecar: Any,
        tmp_path: Path) -> None:
    sidecar = await start_sidecar(cluster=CLUSTER, member="w1", etcd=etcd.url,
                                  app_port=free_port(), site="east")
    assert (await sidecar.put("s1", {"n": 0})).status == 201
    drill = drill_of(etcd_client, sidecar, tmp_path)
    await drill.data_baseline()
    assert (await sidecar.put("s2", {"n": 0})).status == 201
    reply = await sidecar.put("s1", {"n": 1})
    await etcd_client.compact(int(reply.etag.strip('"')), physical=True)
    [result] = await drill.data_check()
    assert result["ok"] and result["sessions"] == 2, result  # what etcd has is compared
    assert "compacted" in result["history"]["main"], result
    report = markdown({"site": "west", "result": "passed", "started": "t",
                       "duration_s": 0.0, "steps": drill.steps, "data": [result]})
    assert "history since the baseline not replayed (main)" in report, report
