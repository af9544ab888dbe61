"""The statesync sidecar end to end: real ``meshxl serve statesync`` processes on real
etcd (one member, and a 3-member cluster for the fault test), and for membership the
real control plane and Envoy.

What is checked: replication to another member before and after the writer dies,
bulk replication, no acknowledged write lost when an etcd member dies under load,
catch-up before readiness after a restart, fencing of a paused former owner,
compare-and-set, merge patch and delete, TTL expiry, critical devices (problems)
withdrawing the member from Envoy, bad input answered with JSON errors, delayed sync.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aetcd
import pytest

from meshxl.etcd.keys import Keys
from meshxl.local.ports import free_port, free_ports
from meshxl.local.wait import wait_until
from meshxl.model import Registration
from meshxl.operator.actions import apply_model
from tests.harness import EtcdCluster, EtcdServer
from tests.harness.clock import scaled
from tests.harness.load import under_way
from tests.harness.sidecar import Reply, SidecarProcess

pytestmark = pytest.mark.integration

CLUSTER = "shop"
KEYS = Keys()


async def pair(start_sidecar: Any, etcd: str, **options: Any) -> tuple[SidecarProcess,
                                                                        SidecarProcess]:
    """Members a and b of CLUSTER on one etcd, both ready."""
    a, b = await asyncio.gather(
        start_sidecar(cluster=CLUSTER, member="a", etcd=etcd, app_port=free_port(), **options),
        start_sidecar(cluster=CLUSTER, member="b", etcd=etcd, app_port=free_port(), **options))
    return a, b


def revision(reply: Reply) -> int:
    assert reply.etag is not None, reply
    return int(reply.etag.strip('"'))


def assert_json_error(reply: Reply, status: int) -> dict[str, Any]:
    assert reply.status == status, reply
    assert reply.headers.get("Content-Type", "").startswith("application/json"), reply
    body = reply.json()
    assert isinstance(body, dict) and body.get("status") == status, body
    assert isinstance(body.get("error"), str) and body["error"], body
    return body


async def gather_bounded(limit: int, coros: list[Any]) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def one(coro: Any) -> Any:
        async with gate:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros))


# -- 1. a session moves to another member ---------------------------------------------------


async def test_other_member_serves_latest_state_before_and_after_writer_dies(
    etcd: EtcdServer, start_sidecar: Any,
) -> None:
    a, b = await pair(start_sidecar, etcd.url)

    first = await a.put("cart-1", {"items": ["apple"]})
    assert first.status == 201 and first.json()["created"] and first.json()["owner"] == "a"
    second = await a.put("cart-1", {"items": ["apple", "pear"]})
    assert second.status == 200 and not second.json()["created"], second
    assert revision(second) > revision(first)

    got = await b.get("cart-1")
    assert got.status == 200, got
    assert got.etag == second.etag and got.source in ("cache", "etcd"), got.headers
    assert got.json() == {"items": ["apple", "pear"]} and got.owner == "a"

    last = await a.put("cart-1", {"items": ["apple", "pear", "plum"]})
    assert last.status == 200
    await a.kill9()
    got = await b.get("cart-1")
    assert got.status == 200 and got.etag == last.etag, (got, last)
    assert got.source in ("cache", "etcd")
    assert got.json() == {"items": ["apple", "pear", "plum"]}

    # b carries on from a's last acknowledged state: a takeover.
    took = await b.put("cart-1", {"items": ["kiwi"]})
    assert took.status == 200 and took.json()["takeover"] and took.json()["owner"] == "b"


# -- 2. many sessions ----------------------------------------------------------------------


async def test_two_hundred_sessions_replicate_exactly(
    etcd: EtcdServer, start_sidecar: Any,
) -> None:
    a, b = await pair(start_sidecar, etcd.url)
    ids = [f"s{i:03d}" for i in range(200)]
    replies = await gather_bounded(
        32, [a.put(s, {"n": i, "pad": "x" * (i % 50)}) for i, s in enumerate(ids)])
    assert all(r.status == 201 for r in replies), [r for r in replies if r.status != 201][:3]
    acked = {s: (r.etag, {"n": i, "pad": "x" * (i % 50)})
             for i, (s, r) in enumerate(zip(ids, replies, strict=True))}

    async def all_cached() -> bool:
        return (await b.status())["cached_sessions"] == 200

    await wait_until(all_cached, timeout=10, what="b caches 200 sessions")
    gets = await gather_bounded(32, [b.get(s) for s in ids])
    for s, got in zip(ids, gets, strict=True):
        assert got.status == 200, (s, got)
        assert (got.etag, got.json()) == acked[s], s
        assert got.source in ("cache", "etcd") and got.owner == "a"
    status = await b.status()
    assert status["owned_sessions"] == 0 and status["cached_sessions"] == 200
    assert (await a.status())["owned_sessions"] == 200


# -- 3. etcd member killed under write load -------------------------------------------------


async def test_no_acknowledged_write_lost_when_an_etcd_member_dies(
    etcd_cluster: EtcdCluster, start_sidecar: Any,
) -> None:
    urls = ",".join(etcd_cluster.urls)
    a = await start_sidecar(cluster=CLUSTER, member="a", etcd=urls, app_port=free_port())
    workers, per_worker, duration = 8, 4, 3.0
    acked: dict[str, int] = {}          # session -> last acknowledged sequence number
    attempted: dict[str, set[int]] = {}  # session -> every sequence number sent
    statuses: dict[int, int] = {}
    acked_after_kill = 0
    killed_at: float | None = None
    started = time.monotonic()

    async def worker(w: int) -> None:
        nonlocal acked_after_kill
        n = 0
        while time.monotonic() - started < duration:
            session = f"w{w}-{n % per_worker}"
            n += 1
            attempted.setdefault(session, set()).add(n)
            try:
                reply = await a.put(session, {"worker": w, "seq": n})
                status = reply.status
            except (TimeoutError, OSError) as exc:  # no answer: not acknowledged
                status = -1
                assert a.running, f"sidecar died: {exc}"
            statuses[status] = statuses.get(status, 0) + 1
            if 200 <= status < 300:
                acked[session] = n
                if killed_at is not None:
                    acked_after_kill += 1

    async def fault() -> None:
        nonlocal killed_at
        await under_way(lambda: sum(statuses.values()), 100)  # the load at a steady state
        await etcd_cluster.kill(0)
        killed_at = time.monotonic()

    await asyncio.gather(fault(), *(worker(w) for w in range(workers)))
    assert killed_at is not None
    unexpected = {s: c for s, c in statuses.items() if s not in (200, 201, 503, -1)}
    assert not unexpected, f"answers other than 2xx/503 during the fault: {statuses}"
    assert sum(c for s, c in statuses.items() if 200 <= s < 300) >= 50, statuses
    assert acked_after_kill > 0, f"no write acknowledged after the etcd member died: {statuses}"

    for session, last in sorted(acked.items()):

        async def read(session: str = session) -> Reply | None:
            got = await a.get(session)
            return got if got.status == 200 else None

        got = await wait_until(read, timeout=10, what=f"GET {session} after the fault")
        assert got is not None
        body = got.json()
        assert body["seq"] >= last, (
            f"{session}: acknowledged seq {last} lost, GET returns {body['seq']}")
        assert body["seq"] in attempted[session], body  # later, but one that was sent
    assert len(acked) == workers * per_worker


# -- 4. restart: ready only after catching up ------------------------------------------------


async def test_restarted_member_is_ready_only_after_catching_up(
    etcd: EtcdServer, etcd_client: aetcd.Client, start_sidecar: Any,
) -> None:
    a, b = await pair(start_sidecar, etcd.url)
    expected: dict[str, tuple[str | None, Any]] = {}
    for r in await gather_bounded(16, [b.put(f"old{i}", {"i": i}) for i in range(40)]):
        assert r.status == 201
    for i in range(40):
        expected[f"old{i}"] = (None, {"i": i})

    async def a_has(count: int) -> bool:
        return (await a.status())["cached_sessions"] == count

    await wait_until(lambda: a_has(40), timeout=10, what="a caches b's first sessions")
    await a.kill9()

    # While a is down: new sessions, updates, deletes.
    new = await gather_bounded(16, [b.put(f"new{i}", {"n": i}) for i in range(100)])
    assert all(r.status == 201 for r in new)
    for i, r in enumerate(new):
        expected[f"new{i}"] = (r.etag, {"n": i})
    for i in range(10):
        r = await b.put(f"old{i}", {"i": i, "updated": True})
        assert r.status == 200
        expected[f"old{i}"] = (r.etag, {"i": i, "updated": True})
    for i in range(10, 15):
        assert (await b.delete(f"old{i}")).status == 204
        del expected[f"old{i}"]
    latest = max(revision(r) for r in new)

    # The registration a writes after restarting says "not ready" before "ready".
    key = KEYS.member(CLUSTER, "a").encode()
    watch = await etcd_client.watch(key)
    readiness: list[bool] = []

    async def follow() -> None:
        async for event in watch:
            if event.kind == "PUT":
                readiness.append(Registration.from_dict(json.loads(event.kv.value)).ready)

    follower = asyncio.get_running_loop().create_task(follow())
    try:
        await a.restart(wait_ready=False)
        await a.wait_listening()
        seen: list[int] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            reply = await a.readyz()
            seen.append(reply.status)
            if reply.status == 200:
                # Ready means caught up: everything b wrote while a was down is cached.
                status = await a.status()
                assert status["cached_sessions"] == len(expected), status
                assert status["revision"] >= latest, status
                break
            body = assert_json_error_like_not_ready(reply)
            assert body["reasons"], body
            await asyncio.sleep(0.005)
        assert seen and seen[-1] == 200, f"a never became ready: {seen}"
        await wait_until(lambda: readiness[-2:] == [False, True], timeout=5,
                         what="registration: not ready, then ready")
        assert readiness[0] is False, readiness
    finally:
        await watch.cancel()
        follower.cancel()

    gets = await gather_bounded(16, [a.get(s) for s in expected])
    for (session, (etag, body)), got in zip(expected.items(), gets, strict=True):
        assert got.status == 200 and got.json() == body, (session, got)
        if etag is not None:
            assert got.etag == etag, session
    for i in range(10, 15):
        assert (await a.get(f"old{i}")).status == 404


def assert_json_error_like_not_ready(reply: Reply) -> dict[str, Any]:
    assert reply.status == 503, reply
    body = reply.json()
    assert body.get("ready") is False, body
    return dict(body)


# -- 5. fencing ------------------------------------------------------------------------------


async def test_paused_former_owner_is_fenced(etcd: EtcdServer, start_sidecar: Any) -> None:
    a, b = await pair(start_sidecar, etcd.url)
    mine = await a.put("s", {"by": "a"})
    assert mine.status == 201

    a.pause()
    try:
        took = await b.put("s", {"by": "b"})
    finally:
        a.resume()
    assert took.status == 200, took
    assert took.json()["takeover"] is True and took.json()["owner"] == "b", took.json()
    b_revision = revision(took)

    async def caught_up() -> bool:
        return int((await a.status())["revision"]) >= b_revision

    await wait_until(caught_up, timeout=10, what="a's cache past b's write")
    for _ in range(2):  # however fresh its cache, a lost the session
        fenced = await a.put("s", {"by": "a", "late": True})
        body = assert_json_error(fenced, 409)
        assert body.get("owner") == "b", body
    assert_json_error(await a.patch("s", {"late": True}), 409)
    assert_json_error(await a.delete("s"), 409)

    for member in (b, a):
        got = await member.get("s")
        assert got.status == 200 and got.json() == {"by": "b"}, (member, got)
        assert got.etag == took.etag and got.owner == "b"
    assert (await a.status())["write_conflicts"] >= 2
    assert (await b.status())["takeovers"] == 1


# -- 6. compare-and-set ----------------------------------------------------------------------


async def test_if_match_compare_and_set(etcd: EtcdServer, start_sidecar: Any) -> None:
    (a,) = [await start_sidecar(cluster=CLUSTER, member="a", etcd=etcd.url,
                                app_port=free_port())]
    v1 = await a.put("cas", {"v": 1})
    assert v1.status == 201 and v1.etag is not None
    v2 = await a.put("cas", {"v": 2}, if_match=v1.etag)
    assert v2.status == 200 and revision(v2) > revision(v1), v2
    stale = await a.put("cas", {"v": 3}, if_match=v1.etag)
    assert_json_error(stale, 412)
    stale_patch = await a.patch("cas", {"v": 4}, if_match=v1.etag)
    assert_json_error(stale_patch, 412)
    stale_delete = await a.delete("cas", if_match=v1.etag)
    assert_json_error(stale_delete, 412)
    got = await a.get("cas")
    assert got.json() == {"v": 2} and got.etag == v2.etag

    assert_json_error(await a.put("missing", {"v": 1}, if_match="*"), 412)
    assert (await a.get("missing")).status == 404
    star = await a.put("cas", {"v": 5}, if_match="*")
    assert star.status == 200 and (await a.get("cas")).json() == {"v": 5}

    # If-None-Match: * creates only: of concurrent creations exactly one succeeds.
    creations = await asyncio.gather(*(a.put("fresh", {"v": i}, headers={
        "If-None-Match": "*"}) for i in range(4)))
    assert sorted(r.status for r in creations) == [201, 412, 412, 412], creations
    (won,) = [i for i, r in enumerate(creations) if r.status == 201]
    assert (await a.get("fresh")).json() == {"v": won}
    assert_json_error(await a.put("cas", {"v": 6}, headers={"If-None-Match": "*"}), 412)
    assert_json_error(await a.put("x", {"v": 1}, headers={"If-None-Match": '"3"'}), 400)
    assert_json_error(await a.put("cas", {"v": 6}, if_match=star.etag,
                                  headers={"If-None-Match": "*"}), 400)
    assert (await a.get("cas")).json() == {"v": 5}


class RawConnection:
    """One keep-alive HTTP/1.1 connection: the request bytes can be put in the kernel
    while the server is paused (SIGSTOP), and the answer read after it resumes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int):
        self.reader, self.writer, self.port = reader, writer, port

    @classmethod
    async def open(cls, port: int) -> RawConnection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, port)

    async def send(self, method: str, path: str, headers: dict[str, str],
                   body: bytes = b"") -> None:
        head = "".join(f"{k}: {v}\r\n" for k, v in {
            "Host": f"127.0.0.1:{self.port}", "Content-Length": str(len(body)),
            **headers}.items())
        self.writer.write(f"{method} {path} HTTP/1.1\r\n{head}\r\n".encode() + body)
        await self.writer.drain()

    async def answer(self) -> tuple[int, bytes]:
        async with asyncio.timeout(15):
            head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in
                  (line.partition(":") for line in lines[1:] if line)}
        body = await self.reader.readexactly(int(fields.get("content-length", "0")))
        return int(lines[0].split()[1]), body

    def close(self) -> None:
        self.writer.close()


async def test_if_match_star_replaces_an_existing_session_despite_a_stale_cache(
    etcd: EtcdServer, start_sidecar: Any,
) -> None:
    a, b = await pair(start_sidecar, etcd.url)
    assert (await a.put("star", {"v": 1})).status == 201
    assert (await b.get("star")).status == 200  # b's cache holds v1
    conn = await RawConnection.open(b.port)
    try:
        await conn.send("GET", "/healthz", {})
        assert (await conn.answer())[0] == 200  # b has accepted this connection
        b.pause()  # b's watch cannot apply v2 before b reads the next request
        try:
            assert (await a.put("star", {"v": 2})).status == 200
            await conn.send("PUT", "/v1/sessions/star",
                            {"Content-Type": "application/json", "If-Match": "*"}, b'{"v": 3}')
        finally:
            b.resume()
        status, body = await conn.answer()
    finally:
        conn.close()
    assert status == 200, (status, body)
    assert (await a.get("star")).json() == {"v": 3}


async def test_a_read_on_a_lagging_cache_answers_the_current_state(
    etcd: EtcdServer, start_sidecar: Any,
) -> None:
    """Replication lag costs a read from etcd, never a stale answer: every read of a
    cached session is checked against etcd's revision first (docs/metrics.md,
    ``MeshxlReplicationLagHigh``)."""
    a, b = await pair(start_sidecar, etcd.url)
    assert (await a.put("lag", {"v": 1})).status == 201
    assert (await b.get("lag")).json() == {"v": 1}  # b's cache holds v1
    conn = await RawConnection.open(b.port)
    try:
        await conn.send("GET", "/healthz", {})
        assert (await conn.answer())[0] == 200
        b.pause()  # b's watch cannot apply v2 before b reads the next request
        try:
            written = await a.put("lag", {"v": 2})
            assert written.status == 200
            await conn.send("GET", "/v1/sessions/lag", {})
        finally:
            b.resume()
        status, body = await conn.answer()
    finally:
        conn.close()
    assert status == 200 and json.loads(body) == {"v": 2}, (status, body)


# -- 7. merge patch and delete ---------------------------------------------------------------


async def test_patch_merges_and_delete_removes(etcd: EtcdServer, start_sidecar: Any) -> None:
    a, b = await pair(start_sidecar, etcd.url)
    assert (await a.put("doc", {"a": 1, "b": {"c": 2, "d": 3}})).status == 201
    patched = await a.patch("doc", {"b": {"c": None, "e": 4}, "f": 5})
    assert patched.status == 200, patched
    want = {"a": 1, "b": {"d": 3, "e": 4}, "f": 5}
    assert (await a.get("doc")).json() == want
    got = await b.get("doc")
    assert got.json() == want and got.etag == patched.etag

    assert (await a.put("blob", b"\x00\x01raw", content_type="text/plain")).status == 201
    assert_json_error(await a.patch("blob", {"x": 1}), 409)
    assert (await a.get("blob")).body == b"\x00\x01raw"
    assert_json_error(await a.patch("doc", {"x": 1}, content_type="text/plain"), 415)
    assert_json_error(await a.patch("nothing", {"x": 1}), 404)
    assert (await a.get("doc")).json() == want

    assert (await a.delete("doc")).status == 204
    assert_json_error(await a.get("doc"), 404)
    assert_json_error(await b.get("doc"), 404)
    assert_json_error(await a.delete("doc"), 404)
    assert_json_error(await b.delete("never-was"), 404)


# -- 8. TTL ----------------------------------------------------------------------------------


async def test_sessions_expire_after_their_ttl(etcd: EtcdServer, start_sidecar: Any) -> None:
    ttl = 2.0
    a, b = await pair(start_sidecar, etcd.url, session_ttl=ttl)
    put = await a.put("brief", {"x": 1})
    written = time.monotonic()
    assert put.status == 201
    assert (await b.get("brief")).status == 200

    async def gone_everywhere() -> bool:
        replies = await asyncio.gather(a.get("brief"), b.get("brief"))
        return all(r.status == 404 for r in replies)

    bucket = max(1.0, ttl / 10)
    await wait_until(gone_everywhere, timeout=ttl + bucket + 2.0, what="session expired on a and b",
                     interval=0.1)
    lived = time.monotonic() - written
    assert lived >= ttl - 0.5, f"session expired after {lived:.1f}s, before its ttl {ttl}"
    assert_json_error(await b.get("brief"), 404)

    async def uncached() -> bool:
        statuses = await asyncio.gather(a.status(), b.status())
        return all(s["cached_sessions"] == 0 for s in statuses)

    await wait_until(uncached, timeout=5, what="expired session dropped from both caches")


# -- 9. problems (critical devices) and Envoy ------------------------------------------------


async def test_problems_and_crash_withdraw_the_member_from_envoy(
    etcd: EtcdServer, etcd_client: aetcd.Client, start_control_plane: Any, start_envoy: Any,
    start_backends: Any, start_sidecar: Any,
) -> None:
    (app,) = await start_backends(1)
    (lport,) = free_ports(1)
    await apply_model(etcd_client, KEYS, f"""\
clusters:
- name: {CLUSTER}
  membership: registered
  members:
  - {{name: {app.name}, address: 127.0.0.1, port: 1}}
  listener: {{address: 127.0.0.1, port: {lport}}}
  # One member: by default a problem would keep it serving (no other member can, see
  # test_problems_fallback.py); this test watches the withdrawal itself.
  failover: {{all_withdrawn: withdraw}}
""", "test")
    plane = await start_control_plane(etcd=etcd.url)
    envoy = await start_envoy("edge", plane.port)
    await envoy.wait_ready()

    sidecar = await start_sidecar(cluster=CLUSTER, member=app.name, etcd=etcd.url,
                                  app_port=app.port, lease_ttl=2)

    def one_host(hosts: list[Any]) -> bool:
        return len(hosts) == 1 and hosts[0].port == app.port

    async def no_hosts() -> bool:
        return CLUSTER in await envoy.clusters() and await envoy.hosts(CLUSTER) == []

    await envoy.wait_hosts(CLUSTER, one_host, what="ready sidecar's member in Envoy")

    set_reply = await sidecar.set_problem("db", "primary unreachable")
    assert set_reply.status == 201, set_reply
    await wait_until(no_hosts, timeout=10, what="member with a problem withdrawn from Envoy")
    ready = await sidecar.readyz()
    assert ready.status == 503 and any("db" in r for r in ready.json()["reasons"]), ready

    assert (await sidecar.clear_problem("db")).status == 204
    assert_json_error(await sidecar.clear_problem("db"), 404)
    await envoy.wait_hosts(CLUSTER, one_host, what="member back after the problem cleared")
    assert (await sidecar.readyz()).status == 200

    await sidecar.kill9()
    killed = time.monotonic()
    await wait_until(no_hosts, timeout=10, what="crashed sidecar's member removed from Envoy")
    assert time.monotonic() - killed <= 2 + scaled(6), "member outlived its 2 s lease by much"


# -- 10. bad input -----------------------------------------------------------------------------


async def test_bad_input_is_refused_and_loses_nothing(
    etcd: EtcdServer, start_sidecar: Any,
) -> None:
    a = await start_sidecar(cluster=CLUSTER, member="a", etcd=etcd.url, app_port=free_port(),
                            max_session_bytes=1000)
    good = await a.put("keep", {"ok": True})
    assert good.status == 201

    assert_json_error(await a.put("bad*id", {"x": 1}), 400)
    assert_json_error(await a.put("x" * 201, {"x": 1}), 400)
    assert_json_error(await a.get("bad*id"), 400)
    assert_json_error(await a.put("keep", b"{not json", content_type="application/json"), 400)
    assert_json_error(await a.put("keep", b"y" * 1001), 413)

    async def chunks() -> Any:  # no Content-Length: the size is only known after reading
        for _ in range(3):
            yield b"z" * 400

    assert_json_error(await a.request("PUT", "/v1/sessions/keep", data=chunks(),
                                      headers={"Content-Type": "text/plain"}), 413)
    assert_json_error(await a.put("keep", {"x": 1}, if_match='"abc"'), 400)
    assert_json_error(await a.put("keep", {"x": 1}, if_match='"1", "2"'), 400)
    assert_json_error(await a.patch("keep", b"{nope"), 400)
    assert_json_error(await a.patch("keep", {"big": "q" * 1001}), 413)

    # A Content-Type is sent back as the session's: it must be a media type.
    for ctype in ("#3](j", "text", "text/", "text/plain;", "a b/c", "x/" + "y" * 254):
        refused = assert_json_error(await a.put("keep", b"{}", content_type=ctype), 400)
        assert refused["field"] == "Content-Type", refused
    assert_json_error(await a.post_json("/v1/sessions:bulkSave", {"items": [
        {"session": "keep", "data": "eA==", "encoding": "base64", "content_type": "#3](j"}]}),
        400)

    got = await a.get("keep")
    assert got.status == 200 and got.json() == {"ok": True} and got.etag == good.etag
    exact = await a.put("edge", b"e" * 1000)
    assert exact.status == 201, exact  # the limit itself is allowed
    quoted = await a.put("q", b"x", content_type='text/plain; charset="utf-8"; x=y')
    assert quoted.status == 201, quoted
    assert (await a.get("q")).headers["Content-Type"] == 'text/plain; charset="utf-8"; x=y'
    empty = await a.put("e", b"x", headers={"Content-Type": ""})  # an empty one is none
    assert empty.status == 201, empty
    assert (await a.get("e")).headers["Content-Type"] == "application/octet-stream"


async def test_a_stored_type_that_is_no_media_type_is_served_as_bytes(
    etcd: EtcdServer, start_sidecar: Any,
) -> None:
    """A record another program (or an older version) stored with a type that is no
    media type is answered as application/octet-stream, never with that type."""
    from meshxl.statesync.record import SessionRecord

    a = await start_sidecar(cluster=CLUSTER, member="a", etcd=etcd.url, app_port=free_port())
    record = SessionRecord(owner="b", content_type="#3](j", created=1.0, updated=1.0,
                           data=b"raw")
    async with etcd.client() as writer:
        await writer.put(f"{Keys().sessions_prefix(CLUSTER)}odd".encode(), record.encode())
    got = await a.get("odd")
    assert got.status == 200 and got.body == b"raw", got
    assert got.headers["Content-Type"] == "application/octet-stream"
    [item] = (await a.post_json("/v1/sessions:bulkGet", {"sessions": ["odd"]})).json()["items"]
    assert item["content_type"] == "application/octet-stream", item


# -- 11. delayed sync ------------------------------------------------------------------------


async def test_delayed_sync_keeps_young_sessions_local(
    etcd: EtcdServer, start_sidecar: Any,
) -> None:
    delay = 1.0
    a, b = await pair(start_sidecar, etcd.url, sync_delay=delay)
    put = await a.put("young", {"v": 1})
    written = time.monotonic()
    assert put.status == 201, put
    assert put.json()["replicated"] is False and put.etag is not None
    assert put.etag.strip('"').startswith("L"), put.etag

    local = await a.get("young")
    assert local.status == 200 and local.source == "local" and local.json() == {"v": 1}
    assert local.etag == put.etag
    assert_json_error(await b.get("young"), 404)

    async def on_b() -> Reply | None:
        got = await b.get("young")
        return got if got.status == 200 else None

    got = await wait_until(on_b, timeout=delay + 5, what="delayed session replicated to b")
    assert got is not None
    assert time.monotonic() - written >= delay - 0.2
    assert got.json() == {"v": 1} and got.owner == "a" and got.source in ("cache", "etcd")

    # a learns of the commit from etcd's answer to its own flush, which may reach it
    # after b's watch (or b's read) has seen the session: a moment of "local" is no error.
    async def on_a() -> Reply | None:
        got = await a.get("young")
        return got if got.source in ("cache", "etcd") else None

    after = await wait_until(on_a, timeout=5, what="a serving the flushed session from etcd")
    assert after is not None and after.etag == got.etag, after
    assert (await a.status())["local_sessions"] == 0


# -- 12. full sync of large sessions ----------------------------------------------------------


async def test_member_joining_large_sessions_becomes_ready(
    etcd: EtcdServer, start_sidecar: Any,
) -> None:
    a = await start_sidecar(cluster=CLUSTER, member="a", etcd=etcd.url, app_port=free_port())
    big = b"x" * 900_000  # under the 1 MiB session limit; 6 of them exceed 4 MiB
    for i in range(6):
        assert (await a.put(f"big{i}", big)).status == 201
    b = await start_sidecar(cluster=CLUSTER, member="b", etcd=etcd.url, app_port=free_port(),
                            wait_ready=False)
    await b.wait_ready(6)
    assert (await b.status())["cached_sessions"] == 6
    got = await b.get("big5")
    assert got.status == 200 and got.body == big


async def test_full_sync_shrinks_pages_that_exceed_the_message_limit(etcd: EtcdServer) -> None:
    """etcd pages by count; a page larger than one gRPC message is read in smaller ones."""
    import aetcd

    from meshxl.etcd.keys import Keys
    from meshxl.statesync.cache import SessionCache
    from meshxl.statesync.record import SessionRecord

    prefix = Keys().sessions_prefix(CLUSTER)
    record = SessionRecord(owner="a", content_type="application/octet-stream", created=1.0,
                           updated=1.0, data=b"y" * 300_000)
    async with etcd.client() as writer:
        for i in range(8):  # 2.4 MB in all, more than the 1 MB this client accepts
            await writer.put(f"{prefix}s{i}".encode(), record.encode())
    host, port = etcd.endpoint
    small = aetcd.Client(host=host, port=port,
                         options={"grpc.max_receive_message_length": 1_000_000})
    await small.connect()
    cache = SessionCache(small, prefix)
    task = asyncio.create_task(cache.run())
    try:
        async with asyncio.timeout(10):
            await cache.synced.wait()
        assert len(cache) == 8 and cache.errors == 0
        assert cache.get("s7") is not None and cache.get("s7").record.data == record.data
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await small.close()


async def test_pipelined_requests_keep_their_order_and_writes_share_transactions(
        etcd: EtcdServer, start_sidecar: Any) -> None:
    """One connection, requests sent without waiting for answers (HTTP pipelining):
    answers come in order; a session's writes apply in the order sent; a read sees the
    writes sent before it; writes of different sessions run side by side (they share
    etcd transactions)."""
    a = await start_sidecar(cluster=CLUSTER, member="a", etcd=etcd.url, app_port=free_port())

    def put(session: str, body: bytes, extra: str = "") -> bytes:
        return (f"PUT /v1/sessions/{session} HTTP/1.1\r\nHost: x\r\nContent-Type: "
                f"application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body

    def plain(method: str, path: str, extra: str = "") -> bytes:
        return f"{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()

    before = await a.request("GET", "/metrics")
    batches_before = _batches(before.body)
    stream = b"".join([
        *(put(f"p{i}", b'{"i":%d}' % i) for i in range(20)),   # 20 sessions at once
        put("s", b'{"v":1}'), put("s", b'{"v":2}'),              # one session, in order
        plain("GET", "/v1/sessions/s"),                          # sees both writes
        put("t", b'{"v":1}'), plain("DELETE", "/v1/sessions/t"),
        plain("GET", "/v1/sessions/t"),                          # sees the delete
        put("s", b'{"v":3}', "If-Match: \"1\"\r\n"),             # a stale ETag: 412
        plain("GET", "/v1/sessions/s", "Connection: close\r\n"),
    ])
    reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
    writer.write(stream)
    await writer.drain()
    async with asyncio.timeout(30):
        raw = await reader.read()
    writer.close()
    answers = _answers(raw)
    statuses = [status for status, _ in answers]
    assert statuses == [201] * 20 + [201, 200, 200, 201, 204, 404, 412, 200], statuses
    assert [json.loads(body)["session"] for _, body in answers[:20]] == [
        f"p{i}" for i in range(20)]
    assert json.loads(answers[22][1]) == {"v": 2}
    assert json.loads(answers[27][1]) == {"v": 2}
    # The 20 first writes went to etcd in fewer transactions than writes.
    after = _batches((await a.request("GET", "/metrics")).body)
    assert after[1] - batches_before[1] >= 25 and after[0] - batches_before[0] < 20, \
        (batches_before, after)


def _batches(metrics: bytes) -> tuple[float, float]:
    """(write transactions, write ops) from the sidecar's batch-size histogram."""
    count = total = 0.0
    for line in metrics.decode().splitlines():
        if line.startswith('meshxl_statesync_batch_size_count{kind="write"}'):
            count = float(line.split()[-1])
        elif line.startswith('meshxl_statesync_batch_size_sum{kind="write"}'):
            total = float(line.split()[-1])
    return count, total


def _answers(raw: bytes) -> list[tuple[int, bytes]]:
    """Every answer in a pipelined stream: (status, body), in order."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = next((int(line.split(b":")[1]) for line in lines[1:]
                       if line.lower().startswith(b"content-length:")), 0)
        out.append((status, rest[:length]))
        raw = rest[length:]
    return out
