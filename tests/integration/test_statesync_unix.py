"""The sidecar's API on a Unix socket beside its TCP port (``--listen unix:PATH``): the
same API and sessions on both, the socket's permissions as configured, health checks
and the registration on TCP, the socket file removed on a clean stop and a stale one
(left by a crash) replaced on restart, and a path it must not take refused in one line."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import aetcd
import aiohttp
import pytest
from multidict import CIMultiDict

from meshxl.etcd.keys import Keys
from meshxl.local.ports import free_port
from tests.harness import EtcdServer
from tests.harness.cli import meshxl
from tests.harness.sidecar import SidecarProcess

pytestmark = pytest.mark.integration


async def over_unix(path: str, method: str, target: str, body: Any = None,
                    headers: dict[str, str] | None = None) -> tuple[int, CIMultiDict[str], bytes]:
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path),
                                     timeout=aiohttp.ClientTimeout(total=15)) as http:
        data = json.dumps(body).encode() if body is not None else None
        async with http.request(method, f"http://sidecar{target}", data=data,
                                headers=headers or {}) as resp:
            return resp.status, resp.headers.copy(), await resp.read()


async def test_the_api_on_a_unix_socket_beside_tcp(
    etcd: EtcdServer, start_sidecar: Any, etcd_client: aetcd.Client, tmp_path: Path,
) -> None:
    sock = tmp_path / "statesync.sock"
    path = str(sock)
    sidecar: SidecarProcess = await start_sidecar(
        cluster="shop", member="a", etcd=etcd.url, app_port=free_port(), unix_socket=path,
        socket_mode="0660")
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660

    status, headers, body = await over_unix(path, "PUT", "/v1/sessions/u1", {"n": 1},
                                            {"Content-Type": "application/json"})
    assert status == 201, body
    got = await sidecar.get("u1")  # over TCP: the same sessions
    assert got.json() == {"n": 1} and got.etag == headers["ETag"]
    status, _, body = await over_unix(path, "POST", "/v1/sessions:bulkSave", {"items": [
        {"session": "u2", "data": [2]}, {"session": "u1", "data": {"n": 2},
                                         "if_match": headers["ETag"]}]})
    assert status == 200 and [i["status"] for i in json.loads(body)["items"]] == [201, 200]
    status, _, body = await over_unix(path, "GET", "/v1/sessions/nothing")
    assert status == 404 and json.loads(body)["status"] == 404
    assert (await sidecar.readyz()).status == 200  # health checks: TCP
    registration = await etcd_client.get(Keys().member("shop", "a").encode())
    assert registration is not None
    assert json.loads(registration.value)["sidecar"] == f"127.0.0.1:{sidecar.port}"

    await sidecar.stop()  # a clean stop removes the socket file
    assert not sock.exists()
    await sidecar.start()
    await sidecar.kill9()  # a crash leaves it behind, stale
    assert sock.exists()
    await sidecar.start()  # replaced: served again
    status, _, body = await over_unix(path, "GET", "/v1/sessions/u2")
    assert status == 200 and json.loads(body) == [2]


async def test_a_path_that_is_not_a_socket_is_refused_in_one_line(
    etcd: EtcdServer, tmp_path: Path,
) -> None:
    plain = tmp_path / "not-a-socket"
    plain.write_text("data")
    code, _, err = await meshxl(
        "serve", "statesync", "--cluster", "c", "--member", "a", "--app", "127.0.0.1:8080",
        "--listen", f"127.0.0.1:{free_port()}", "--listen", f"unix:{plain}",
        "--etcd", etcd.url, timeout=30)
    assert code == 1
    lines = err.strip().splitlines()
    assert lines == [f"meshxl: --listen: cannot listen on unix:{plain}: the path exists "
                     "and is not a socket"], err
    assert plain.read_text() == "data"
    code, _, err = await meshxl(
        "serve", "statesync", "--cluster", "c", "--member", "a", "--app", "127.0.0.1:8080",
        "--listen", "unix:/a.sock", "--listen", "unix:/b.sock", "--etcd", etcd.url,
        timeout=30)
    assert code == 1 and "one HOST:PORT and one unix:PATH at most" in err
