"""meshxl.client against real ``meshxl serve statesync`` sidecars on a real etcd.

What is checked: every operation of both clients and the errors they raise (the
sidecar's messages and fields), over TCP and over the sidecar's Unix socket
(``unix:PATH``), connection reuse (the async client's own transport and its aiohttp
path), a fenced writer's 409, a contended ``update`` from two clients on two members
(every increment counted once), 503s while etcd is down and recovery once it is back,
a token-protected sidecar, the aiohttp and ASGI middlewares (load, save, 409 on a lost
write, retries), and the demo app's answers through the client.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from meshxl import errors
from meshxl import web as mweb
from meshxl.client import (
    AsyncClient,
    Backoff,
    Client,
    ClientSettings,
    Conflict,
    NotFound,
    PreconditionFailed,
    SidecarUnavailable,
    TooLarge,
    Unauthorized,
    Unavailable,
    Unreachable,
)
from meshxl.client.middleware import (
    SCOPE_KEY,
    SESSION,
    SessionMiddleware,
    aiohttp_middleware,
    cluster_from_host,
)
from meshxl.local.ports import free_port
from meshxl.local.procs import Owner
from meshxl.local.wait import wait_until
from tests.harness import EtcdServer
from tests.harness.sidecar import SidecarProcess

pytestmark = pytest.mark.integration

CLUSTER = "shop"
TOKEN = "client-token-0123456789abcdef0123456789"


async def start_member(start_sidecar: Any, etcd: str, member: str,
                       **options: Any) -> SidecarProcess:
    sidecar: SidecarProcess = await start_sidecar(cluster=CLUSTER, member=member, etcd=etcd,
                                                  app_port=free_port(), **options)
    return sidecar


OVER = pytest.mark.parametrize("over", ["tcp", "unix"])


async def start_reachable(start_sidecar: Any, etcd: str, member: str, over: str,
                          tmp_path: Path, **options: Any) -> tuple[SidecarProcess, str]:
    """A member and the URL its clients use: its TCP port, or its Unix socket."""
    if over == "unix":
        sock = str(tmp_path / "statesync.sock")
        sidecar = await start_member(start_sidecar, etcd, member, unix_socket=sock, **options)
        return sidecar, f"unix:{sock}"
    sidecar = await start_member(start_sidecar, etcd, member, **options)
    return sidecar, sidecar.url


def increment(state: Any) -> dict[str, int]:
    return {"seq": (state or {}).get("seq", 0) + 1}


async def write_counts(sidecar: SidecarProcess, result: str) -> int:
    """``meshxl_statesync_writes_total{result=...}`` summed over operations."""
    reply = await sidecar.request("GET", "/metrics")
    total = 0.0
    for line in reply.body.decode().splitlines():
        if line.startswith("meshxl_statesync_writes_total{") and f'result="{result}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


# -- the operations --------------------------------------------------------------------------


@OVER
async def test_async_client_operations_and_errors(
    etcd: EtcdServer, start_sidecar: Any, over: str, tmp_path: Path,
) -> None:
    _, url = await start_reachable(start_sidecar, etcd.url, "a", over, tmp_path,
                                   max_session_bytes=4096)
    async with AsyncClient(url) as client:
        created = await client.put("cart-1", {"items": ["apple"]})
        assert created.created and created.owner == "a" and created.replicated
        got = await client.get("cart-1")
        assert (got.state, got.etag, got.owner) == ({"items": ["apple"]}, created.etag, "a")
        assert got.source in ("cache", "etcd")

        replaced = await client.put("cart-1", {"items": ["pear"]}, if_match=got.etag)
        assert not replaced.created and replaced.etag != got.etag
        with pytest.raises(PreconditionFailed) as stale:
            await client.put("cart-1", {"items": ["plum"]}, if_match=got.etag)
        assert stale.value.status == 412 and "cart-1" in stale.value.message
        assert stale.value.details["current"] == int(replaced.etag.strip('"'))
        with pytest.raises(PreconditionFailed, match="exists"):
            await client.put("cart-1", {}, create_only=True)

        patched = await client.patch("cart-1", {"coupon": "SPRING"}, if_match=replaced.etag)
        assert (await client.get("cart-1")).state == {"items": ["pear"], "coupon": "SPRING"}
        assert patched.etag == (await client.get("cart-1")).etag

        await client.put("blob", b"\x00\x01binary", content_type="application/x-thing")
        blob = await client.get("blob")
        assert blob.state == b"\x00\x01binary" and blob.content_type == "application/x-thing"
        with pytest.raises(Conflict, match="not JSON"):
            await client.patch("blob", {"a": 1})
        with pytest.raises(TooLarge, match="limit is 4096") as large:
            await client.put("blob", b"x" * 5000)
        assert isinstance(large.value, errors.InputError)

        await client.delete("cart-1", if_match=patched.etag)
        with pytest.raises(NotFound, match="no session 'cart-1'") as missing:
            await client.get("cart-1")
        assert missing.value.details["session"] == "cart-1"
        with pytest.raises(NotFound):
            await client.delete("cart-1")
        assert (await client.ready()).ready
        assert client._pool is not None and client._pool.opened == 1  # one kept alive


@OVER
async def test_sync_client_operations_and_connection_reuse(
    etcd: EtcdServer, start_sidecar: Any, over: str, tmp_path: Path,
) -> None:
    _, url = await start_reachable(start_sidecar, etcd.url, "a", over, tmp_path)

    def use() -> list[Any]:
        socks = []  # kept, so no two of them share an id()
        with Client(url) as client:
            client.put("s1", {"n": 1}, create_only=True)
            for _ in range(20):
                got = client.get("s1")
                client.put("s1", {"n": got.state["n"] + 1}, if_match=got.etag)
                socks.append(client._idle[-1].sock)
                assert socks[-1].family == (socket.AF_UNIX if over == "unix"
                                            else socket.AF_INET)
            assert client.update("s1", lambda s: {"n": s["n"] * 2}).state == {"n": 42}
            client.patch("s1", {"m": True})
            assert client.get("s1").state == {"n": 42, "m": True}
            with pytest.raises(PreconditionFailed):
                client.put("s1", {}, if_match='"1"')
            client.delete("s1")
            with pytest.raises(NotFound):
                client.get("s1")
        return socks

    socks = await asyncio.to_thread(use)
    assert len({id(s) for s in socks}) == 1, "one kept-alive connection expected"

    def unkept() -> list[Any]:
        # keepalive=0: an idle connection is never reused (past it, the sidecar may be
        # closing it).
        with Client(url, settings=ClientSettings(keepalive=0)) as client:
            socks = []
            for _ in range(3):
                client.put("s0", {"n": 0})
                socks.append(client._idle[-1].sock)
            return socks

    assert len({id(s) for s in await asyncio.to_thread(unkept)}) == 3


async def test_async_client_reuses_its_connections(etcd: EtcdServer, start_sidecar: Any) -> None:
    a = await start_member(start_sidecar, etcd.url, "a")
    async with AsyncClient(a.url) as own:  # the client's own transport
        assert own._pool is not None
        for n in range(30):
            await own.update("s0", increment)
            assert (await own.get("s0")).state == {"seq": n + 1}
        assert own._pool.opened == 1
        # 40 at once: pipelined 16 to a connection (3 connections), reused for the next
        # 40; the sidecar answers every write of a connection, in order.
        for round_ in range(2):
            written = await asyncio.gather(*(own.put(f"p{i}", {"i": i, "round": round_})
                                             for i in range(40)))
            assert [w.session for w in written] == [f"p{i}" for i in range(40)]
        assert own._pool.opened == 3
        got = await asyncio.gather(*(own.get(f"p{i}") for i in range(40)))
        assert [s.state for s in got] == [{"i": i, "round": 1} for i in range(40)]
    # One at a time on a connection (pipeline=1): 16 at once take 16 connections.
    async with AsyncClient(a.url, settings=ClientSettings(pipeline=1)) as single:
        for _ in range(2):
            await asyncio.gather(*(single.put(f"q{i}", {"i": i}) for i in range(16)))
        assert single._pool is not None and single._pool.opened == 16
    # The aiohttp path (trace_configs are aiohttp's), counted by aiohttp's own hooks.
    counts = {"created": 0, "reused": 0}
    trace = aiohttp.TraceConfig()

    async def created(*_: Any) -> None:
        counts["created"] += 1

    async def reused(*_: Any) -> None:
        counts["reused"] += 1

    trace.on_connection_create_end.append(created)
    trace.on_connection_reuseconn.append(reused)
    async with AsyncClient(a.url, trace_configs=[trace]) as client:
        for n in range(30):
            await client.update("s1", increment)
            assert (await client.get("s1")).state == {"seq": n + 1}
    assert counts == {"created": 1, "reused": 89}, counts


async def test_a_fenced_writer_gets_409_and_update_carries_on(
    etcd: EtcdServer, start_sidecar: Any,
) -> None:
    a = await start_member(start_sidecar, etcd.url, "a")
    b = await start_member(start_sidecar, etcd.url, "b")
    async with AsyncClient(a.url) as on_a, AsyncClient(b.url) as on_b:
        await on_a.put("cart", {"seq": 1})
        took = await on_b.put("cart", {"seq": 2})
        assert took.takeover and took.owner == "b"
        with pytest.raises(Conflict, match="ownership lost") as fenced:
            await on_a.put("cart", {"seq": 99})
        assert fenced.value.status == 409 and fenced.value.details["owner"] == "b"
        # update reads first: a sees b's state and may write again (the session moves back).
        moved = await on_a.update("cart", increment)
        assert moved.state == {"seq": 3} and moved.owner == "a"


# -- contention ------------------------------------------------------------------------------


async def test_contended_update_from_two_clients_counts_every_increment_once(
    etcd: EtcdServer, start_sidecar: Any,
) -> None:
    """An async client on member a and a sync client on member b (three writers each)
    increment one session: every increment lands exactly once."""
    a = await start_member(start_sidecar, etcd.url, "a")
    b = await start_member(start_sidecar, etcd.url, "b")
    settings = ClientSettings(conflicts=Backoff(attempts=200, first=0.002, cap=0.05,
                                                jitter=1.0))
    writers, per_writer = 3, 25
    seen: list[int] = []
    lock = threading.Lock()

    async with AsyncClient(a.url, settings=settings) as on_a:
        async def async_writer() -> None:
            for _ in range(per_writer):
                seen.append((await on_a.update("hot", increment)).state["seq"])

        def sync_writer(client: Client) -> None:
            for _ in range(per_writer):
                seq = client.update("hot", increment).state["seq"]
                with lock:
                    seen.append(seq)

        with Client(b.url, settings=settings) as on_b:
            async with asyncio.timeout(120):
                await asyncio.gather(
                    *(async_writer() for _ in range(writers)),
                    *(asyncio.to_thread(sync_writer, on_b) for _ in range(writers)))
            final = await on_a.get("hot")

    total = 2 * writers * per_writer
    assert sorted(seen) == list(range(1, total + 1)), "an increment was lost or doubled"
    assert final.state == {"seq": total}
    refused = await write_counts(a, "precondition_failed") + \
        await write_counts(b, "precondition_failed")
    assert refused > 0, "the writers never contended: the test proves nothing"


# -- etcd down -------------------------------------------------------------------------------


async def test_503_while_etcd_is_down_then_recovery(
    etcd: EtcdServer, start_sidecar: Any,
) -> None:
    a = await start_member(start_sidecar, etcd.url, "a")
    quick = AsyncClient(a.url, settings=ClientSettings(
        unavailable=Backoff(attempts=3, first=0.05, jitter=0.0)))
    patient = AsyncClient(a.url, settings=ClientSettings(
        unavailable=Backoff(attempts=100, first=0.05, factor=1.5, cap=0.3)))
    try:
        await quick.put("counter", {"seq": 1})
        before = await write_counts(a, "unavailable")
        await etcd.kill()

        with pytest.raises(Unavailable) as down:
            await quick.put("fresh", {"x": 1})
        assert type(down.value) is SidecarUnavailable and down.value.status == 503
        assert "etcd unavailable" in down.value.message
        assert await write_counts(a, "unavailable") - before == 3, "three tries, no more"
        with pytest.raises(Unavailable, match="etcd unavailable"):
            await quick.get("never-written")  # not cached: nothing to serve
        cached = await quick.get("counter")
        assert cached.state == {"seq": 1} and cached.source == "cache-unverified"

        # update retries its write while etcd is down, and lands once etcd is back.
        during = await write_counts(a, "unavailable")
        pending = asyncio.create_task(patient.update("counter", increment))

        async def retrying() -> bool:
            return await write_counts(a, "unavailable") >= during + 2

        await wait_until(retrying, timeout=10, what="update's writes answered 503")
        assert not pending.done()
        await etcd.start()
        async with asyncio.timeout(30):
            result = await pending
        assert result.state == {"seq": 2}
        got = await quick.get("counter")
        assert got.state == {"seq": 2} and got.source in ("cache", "etcd")
    finally:
        await quick.close()
        await patient.close()


async def test_unreachable_sidecar() -> None:
    port = free_port()  # nothing listens there
    settings = ClientSettings(unavailable=Backoff(attempts=2, first=0.01))
    async with AsyncClient(f"http://127.0.0.1:{port}", settings=settings) as client:
        with pytest.raises(Unreachable, match="sidecar unreachable") as caught:
            await client.get("s1")
    assert isinstance(caught.value, errors.Unavailable) and caught.value.status is None
    with pytest.raises(Unreachable):
        Client(f"http://127.0.0.1:{port}", settings=settings).put("s1", {})


# -- token -----------------------------------------------------------------------------------


async def test_token_protected_sidecar(harness: Owner, etcd: EtcdServer,
                                       tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    sidecar = SidecarProcess(harness, cluster=CLUSTER, member="a", etcd=etcd.url,
                             app_port=free_port(), token_file=token_file)
    await sidecar.start()

    async with AsyncClient(sidecar.url, token=TOKEN) as client:
        await client.put("s1", {"seq": 1})
        assert (await client.update("s1", increment)).state == {"seq": 2}
    with Client(sidecar.url, token=TOKEN) as sync_client:
        assert (await asyncio.to_thread(sync_client.get, "s1")).state == {"seq": 2}

    async with AsyncClient(sidecar.url) as anonymous:
        assert (await anonymous.ready()).ready  # /readyz is open: probes carry no token
        with pytest.raises(Unauthorized, match="needs a token") as refused:
            await anonymous.get("s1")
        assert refused.value.status == 401 and isinstance(refused.value, errors.Unavailable)
    async with AsyncClient(sidecar.url, token="wrong-token-0123456789abcdef") as wrong:
        with pytest.raises(Unauthorized, match="invalid token"):
            await wrong.put("s1", {"seq": 0})
    with pytest.raises(Unauthorized):
        await asyncio.to_thread(Client(sidecar.url, token="x" * 20).get, "s1")
    async with AsyncClient(sidecar.url, token=TOKEN) as client:
        assert (await client.get("s1")).state == {"seq": 2}  # nothing refused got written


# -- middlewares -----------------------------------------------------------------------------


class Interference:
    """Writes the session behind a handler's back, after it was loaded, ``times`` times."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.times = 0

    async def maybe(self, session_id: str) -> None:
        if self.times > 0:
            self.times -= 1
            await self.client.put(session_id, {"n": 100})


async def serve(harness: Owner, app: web.Application) -> str:
    runner = mweb.Runner(app)
    await runner.setup()
    harness.on_close(runner.cleanup)
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return f"http://127.0.0.1:{port}"


async def test_aiohttp_middleware(harness: Owner, etcd: EtcdServer,
                                  start_sidecar: Any) -> None:
    a = await start_member(start_sidecar, etcd.url, "a")
    client, other = AsyncClient(a.url), AsyncClient(a.url)
    harness.on_close(client.close)
    harness.on_close(other.close)
    interference = Interference(other)

    async def count(request: web.Request) -> web.Response:
        session = request.get(SESSION)
        if session is None:
            return web.json_response({"session": None})
        add = int(await request.text() or 1)
        session.state["n"] = session.state.get("n", 0) + add
        await interference.maybe(session.id)
        return web.json_response({"n": session.state["n"], "new": session.new})

    async def peek(request: web.Request) -> web.Response:
        return web.json_response(request[SESSION].state)

    def make(**options: Any) -> web.Application:
        app = mweb.application(middlewares=[aiohttp_middleware(client, **options)])
        app.router.add_post("/count", count)
        app.router.add_get("/peek", peek)
        return app

    plain = await serve(harness, make())
    retrying = await serve(harness, make(retries=2))
    by_cookie = await serve(harness, make(header=None, cookie="sid"))

    async with aiohttp.ClientSession() as http:
        async def call(url: str, session: str | None = "u1", body: str = "",
                       **kwargs: Any) -> tuple[int, Any]:
            headers = {"x-session-id": session} if session is not None else {}
            async with http.post(f"{url}/count", data=body, headers=headers,
                                 **kwargs) as resp:
                return resp.status, await resp.json()

        assert await call(plain) == (200, {"n": 1, "new": True})
        assert await call(plain) == (200, {"n": 2, "new": False})
        etag = (await client.get("u1")).etag
        async with http.get(f"{plain}/peek", headers={"x-session-id": "u1"}) as resp:
            assert resp.status == 200 and await resp.json() == {"n": 2}
        assert (await client.get("u1")).etag == etag, "an unchanged state was written"
        assert await call(plain, None) == (200, {"session": None})
        status, body = await call(plain, "../status")
        assert status == 400 and "invalid session id" in body["error"]

        # A write behind the handler's back: the handler's answer becomes a 409.
        interference.times = 1
        status, body = await call(plain)
        assert status == 409 and body["session"] == "u1", body
        assert "changed while this request ran" in body["error"]
        assert (await client.get("u1")).state == {"n": 100}  # the other write stands

        # With retries the handler runs again on the newer state (and its body again).
        interference.times = 1
        assert await call(retrying, body="5") == (200, {"n": 105, "new": False})
        assert (await client.get("u1")).state == {"n": 105}

        async with http.post(f"{by_cookie}/count", cookies={"sid": "c1"}) as resp:
            assert resp.status == 200 and await resp.json() == {"n": 1, "new": True}
        assert (await client.get("c1")).state == {"n": 1}

    # No sidecar: 503, JSON.
    gone = AsyncClient(f"http://127.0.0.1:{free_port()}",
                       settings=ClientSettings(unavailable=Backoff(attempts=1)))
    harness.on_close(gone.close)
    app = mweb.application(middlewares=[aiohttp_middleware(gone)])
    app.router.add_post("/count", count)
    url = await serve(harness, app)
    async with aiohttp.ClientSession() as http, http.post(
            f"{url}/count", headers={"x-session-id": "u1"}) as resp:
        assert resp.status == 503 and "sidecar unreachable" in (await resp.json())["error"]


async def test_asgi_middleware(harness: Owner, etcd: EtcdServer, start_sidecar: Any) -> None:
    a = await start_member(start_sidecar, etcd.url, "a")
    client, other = AsyncClient(a.url), AsyncClient(a.url)
    harness.on_close(client.close)
    harness.on_close(other.close)
    interference = Interference(other)
    runs = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        session = scope.get("state", {}).get(SCOPE_KEY)
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        runs.append(body)
        answer: dict[str, Any] = {"session": None}
        if session is not None:
            session.state["n"] = session.state.get("n", 0) + int(body or b"1")
            await interference.maybe(session.id)
            answer = {"n": session.state["n"]}
        data = json.dumps(answer).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": data})

    async def call(asgi: Any, headers: list[tuple[bytes, bytes]],
                   body: bytes = b"") -> tuple[int, Any]:
        # The body in two chunks, as a server may deliver it.
        chunks = [{"type": "http.request", "body": body[:1], "more_body": True},
                  {"type": "http.request", "body": body[1:], "more_body": False}]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return chunks.pop(0) if chunks else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
        await asgi(scope, receive, send)
        assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
        return sent[0]["status"], json.loads(sent[1]["body"])

    plain = SessionMiddleware(app, client)
    retrying = SessionMiddleware(app, client, retries=2)
    header = [(b"x-session-id", b"w1")]
    assert await call(plain, header) == (200, {"n": 1})
    assert await call(plain, header, b"2") == (200, {"n": 3})
    assert (await client.get("w1")).state == {"n": 3}
    assert await call(plain, []) == (200, {"session": None})

    interference.times = 1
    status, body = await call(plain, header)
    assert status == 409 and "changed while this request ran" in body["error"]
    assert (await client.get("w1")).state == {"n": 100}

    interference.times = 1
    runs.clear()
    assert await call(retrying, header, b"17") == (200, {"n": 117})
    assert runs == [b"17", b"17"], "the retried application did not get the body again"
    assert (await client.get("w1")).state == {"n": 117}

    by_cookie = SessionMiddleware(app, client, header=None, cookie="sid")
    assert await call(by_cookie, [(b"cookie", b"theme=dark; sid=w2")]) == (200, {"n": 1})
    status, body = await call(plain, [(b"x-session-id", b"a/b")])
    assert status == 400 and "invalid session id" in body["error"]


# -- the demo app ----------------------------------------------------------------------------


async def test_demo_app_counts_through_the_client(harness: Owner, etcd: EtcdServer,
                                                  start_sidecar: Any) -> None:
    """The sample app's answers: its counter, 400 for an invalid session id, 503 once
    its sidecar is gone (Envoy retries that elsewhere), health following /readyz."""
    from meshxl.demo.app import make_app

    a = await start_member(start_sidecar, etcd.url, "a")
    url = await serve(harness, make_app("a", a.url))
    async with aiohttp.ClientSession() as http:
        async def post(session: str) -> tuple[int, Any]:
            async with http.post(f"{url}/counter", headers={"x-session-id": session}) as resp:
                return resp.status, await resp.json()

        async def healthy() -> bool:
            async with http.get(f"{url}/healthz") as resp:
                return resp.status == 200

        await wait_until(healthy, timeout=10, what="the app follows its sidecar's /readyz")
        assert await post("cart-1") == (200, {"member": "a", "session": "cart-1", "seq": 1})
        assert (await post("cart-1"))[1]["seq"] == 2
        async with http.get(f"{url}/counter", headers={"x-session-id": "cart-1"}) as resp:
            assert (await resp.json())["seq"] == 2
        status, body = await post("a b")
        assert status == 400 and "invalid session id" in body["error"]

        await a.kill9()
        status, body = await post("cart-1")
        assert status == 503 and "sidecar unreachable" in body["error"], body

        async def unhealthy() -> bool:
            return not await healthy()

        await wait_until(unhealthy, timeout=10, what="the app unhealthy without its sidecar")


async def test_middleware_and_clients_address_a_cluster_by_name(
        harness: Owner, etcd: EtcdServer, start_sidecar: Any) -> None:
    """``cluster=``: the clients' requests under /v1/clusters/{cluster} (which a
    single-cluster sidecar answers for its own), the middleware's per request from the
    Host; a cluster the sidecar does not serve is no missing session."""
    a = await start_member(start_sidecar, etcd.url, "a")
    client = AsyncClient(a.url, cluster=CLUSTER)
    harness.on_close(client.close)
    await client.put("c1", {"n": 1})
    async with AsyncClient(a.url) as plain:  # the same cluster's sessions
        assert (await plain.get("c1")).state == {"n": 1}
    assert Client(a.url, cluster=CLUSTER).get("c1").state == {"n": 1}
    with pytest.raises(SidecarUnavailable, match="'nope' is not served"):
        await client.for_cluster("nope").get("c1")

    async def count(request: web.Request) -> web.Response:
        session = request[SESSION]
        session.state["n"] = session.state.get("n", 0) + 1
        return web.json_response(session.state)

    app = mweb.application(middlewares=[aiohttp_middleware(client,
                                                           cluster=cluster_from_host)])
    app.router.add_post("/count", count)
    url = await serve(harness, app)
    async with aiohttp.ClientSession() as http:
        async def call(host: str) -> tuple[int, Any]:
            async with http.post(f"{url}/count", headers={
                    "Host": host, "x-session-id": "c1"}) as resp:
                return resp.status, await resp.json()

        assert await call(f"{CLUSTER}.tenants.example:80") == (200, {"n": 2})
        status, body = await call("nope.tenants.example")
        assert status == 503 and "'nope' is not served" in body["error"], body
        status, body = await call("-bad.example")
        assert status == 400 and body["field"] == "cluster", body
    assert (await client.get("c1")).state == {"n": 2}


async def test_bulk_operations_of_both_clients(etcd: EtcdServer, start_sidecar: Any) -> None:
    from meshxl.client import Delete, Upsert

    a = await start_member(start_sidecar, etcd.url, "a")
    async with AsyncClient(a.url) as client:
        saved = await client.bulk_save([
            Upsert(session="j1", state={"n": 1}),
            Upsert(session="b1", state=b"\x00\x01\xff"),
            Upsert(session="j2", state={"n": 2}, if_match='"999999"'),
        ])
        assert saved[0].created and saved[0].etag.startswith('"')  # type: ignore[union-attr]
        assert saved[1].created  # type: ignore[union-attr]
        assert isinstance(saved[2], PreconditionFailed | NotFound), saved[2]

        got = await client.bulk_get(["j1", "b1", "nope"])
        j1, b1, nope = got
        assert j1.state == {"n": 1} and j1.etag == saved[0].etag  # type: ignore[union-attr]
        assert b1.state == b"\x00\x01\xff"  # type: ignore[union-attr]
        assert isinstance(nope, NotFound)

        # A transaction with one stale condition writes nothing.
        with pytest.raises(PreconditionFailed):
            await client.transaction([Upsert(session="j1", state={"n": 10}),
                                      Delete(session="b1", if_match='"1"')])
        assert (await client.get("j1")).state == {"n": 1}
        done = await client.transaction([
            Upsert(session="j1", state={"n": 11}, if_match=j1.etag),  # type: ignore[union-attr]
            Delete(session="b1")])
        assert done[1] is None and done[0] is not None and not done[0].created
        with pytest.raises(NotFound):
            await client.get("b1")

    sync = Client(a.url)
    try:
        got_sync = await asyncio.to_thread(sync.bulk_get, ["j1"])
        assert got_sync[0].state == {"n": 11}  # type: ignore[union-attr]
        written = await asyncio.to_thread(
            sync.transaction, [Upsert(session="j3", state=[1, 2], create_only=True)])
        assert written[0] is not None and written[0].created
    finally:
        sync.close()
