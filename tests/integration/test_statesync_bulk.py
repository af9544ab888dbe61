"""The multi-session API on real sidecars and a real etcd: bulk get and save answer per
item (ETags, errors as the single-session API gives them, state round trips exact),
transactions apply all or nothing (one stale ETag applies nothing; two members racing
over overlapping sessions never both commit), ownership fencing holds for bulk writes,
bad requests are refused naming the item and field, and a transaction replicates a
session kept local by delayed sync."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import aetcd
import pytest

from meshxl.etcd.keys import Keys
from meshxl.local.ports import free_port
from meshxl.local.wait import wait_until
from meshxl.statesync.record import SessionRecord
from tests.harness import EtcdServer
from tests.harness.sidecar import Reply, SidecarProcess
from tests.integration.test_statesync import _answers

pytestmark = pytest.mark.integration

CLUSTER = "shop"
KEYS = Keys()


async def member(start_sidecar: Any, etcd: str, name: str, **options: Any) -> SidecarProcess:
    sidecar: SidecarProcess = await start_sidecar(cluster=CLUSTER, member=name, etcd=etcd,
                                                  app_port=free_port(), **options)
    return sidecar


def items(reply: Reply) -> list[dict[str, Any]]:
    assert reply.status == 200, reply
    assert reply.headers["Content-Type"].startswith("application/json"), reply
    answer = reply.json()["items"]
    assert isinstance(answer, list)
    return answer


def tag(reply: Reply) -> str:
    assert reply.etag is not None, reply
    return reply.etag.strip('"')


async def stored(client: aetcd.Client) -> dict[str, int]:
    """The cluster's session keys in etcd and their mod_revisions."""
    prefix = KEYS.sessions_prefix(CLUSTER)
    got = await client.get_prefix(prefix.encode())
    return {kv.key.decode()[len(prefix):]: kv.mod_revision for kv in got}


async def caught_up(sidecar: SidecarProcess, revision: int) -> None:
    async def there() -> bool:
        return int((await sidecar.status())["revision"]) >= revision

    await wait_until(there, timeout=10, what=f"{sidecar.name}'s cache at {revision}")


# -- bulk get and bulk save --------------------------------------------------------------------


async def test_bulk_save_and_get_answer_each_item_as_single_requests_would(
    etcd: EtcdServer, start_sidecar: Any, etcd_client: aetcd.Client,
) -> None:
    a = await member(start_sidecar, etcd.url, "a")
    old = await a.put("old", {"v": 0})
    assert (await a.put("spaced", b'{ "x" : [1, 2.50] }',
                        content_type="application/json")).status == 201
    # NaN is not JSON: refused as JSON state. One stored before it was refused (or by
    # another writer) still reads back exactly as stored.
    assert (await a.put("nan", b'{"x": NaN}', content_type="application/json")).status == 400
    record = SessionRecord(owner="a", content_type="application/json", created=time.time(),
                           updated=time.time(), data=b'{"x": NaN}')
    put = await etcd_client.put(KEYS.session(CLUSTER, "nan").encode(), record.encode())
    await caught_up(a, put.header.revision)
    raw = bytes(range(256)) + b"\n\r\n"
    saved = items(await a.bulk_save([
        {"session": "j", "data": {"cart": ["apple", "é", "\u2028"], "n": 1.5}},
        {"session": "b", "data": base64.b64encode(raw).decode(), "encoding": "base64"},
        {"session": "t", "data": base64.b64encode(b"plain text").decode(),
         "encoding": "base64", "content_type": "text/plain; charset=utf-8"},
        {"session": "old", "data": {"v": 1}, "if_match": '"1"'},
        {"session": "fresh", "data": [], "if_none_match": "*"},
        {"session": "spaced", "data": {"v": 2}, "if_none_match": "*"},
    ]))
    assert [i["session"] for i in saved] == ["j", "b", "t", "old", "fresh", "spaced"]
    assert [i["status"] for i in saved] == [201, 201, 201, 412, 201, 412], saved
    stale = saved[3]
    assert stale["current"] == int(tag(old)) and "not" in stale["error"], stale
    for item in (saved[0], saved[1], saved[2], saved[4]):
        assert item["created"] is True and item["owner"] == "a" and item["replicated"]
        single = await a.get(item["session"])
        assert single.status == 200 and tag(single) == item["etag"], (item, single)
    assert (await a.get("b")).body == raw
    assert (await a.get("j")).json() == {"cart": ["apple", "é", "\u2028"], "n": 1.5}
    assert (await a.get("t")).headers["Content-Type"] == "text/plain; charset=utf-8"

    got = items(await a.bulk_get(["j", "b", "t", "spaced", "nan", "none", "old"]))
    by = {i["session"]: i for i in got}
    assert [i["session"] for i in got] == ["j", "b", "t", "spaced", "nan", "none", "old"]
    assert by["j"]["encoding"] == "json" and by["j"]["data"] == {
        "cart": ["apple", "é", "\u2028"], "n": 1.5}
    assert by["b"]["encoding"] == "base64" and base64.b64decode(by["b"]["data"]) == raw
    assert by["b"]["content_type"] == "application/octet-stream"
    assert base64.b64decode(by["t"]["data"]) == b"plain text"
    assert by["spaced"]["encoding"] == "json" and by["spaced"]["data"] == {"x": [1, 2.5]}
    # Not strict JSON: the exact bytes, base64 (the answer itself stays valid JSON).
    assert by["nan"]["encoding"] == "base64"
    assert base64.b64decode(by["nan"]["data"]) == b'{"x": NaN}'
    assert by["none"]["status"] == 404 and "no session" in by["none"]["error"]
    assert by["old"]["data"] == {"v": 0} and by["old"]["etag"] == tag(old)
    for item in got:
        if item["status"] == 200:
            single = await a.get(item["session"])
            assert item["etag"] == tag(single) and item["owner"] == "a"
            assert item["source"] in ("cache", "etcd")

    # A bulk save is each item as PUT: a second save replaces (200) at new revisions.
    again = items(await a.bulk_save([{"session": s, "data": {"s": s}} for s in "jbt"]))
    assert [i["status"] for i in again] == [200, 200, 200], again
    assert all(int(i["etag"]) > int(by[i["session"]]["etag"]) for i in again)
    metrics = (await a.request("GET", "/metrics")).body.decode()
    assert 'meshxl_statesync_bulk_items_total{kind="save"} 9.0' in metrics
    assert 'meshxl_statesync_bulk_items_total{kind="get"} 7.0' in metrics


# -- transactions ----------------------------------------------------------------------------


async def test_a_transaction_with_one_stale_etag_applies_nothing(
    etcd: EtcdServer, start_sidecar: Any, etcd_client: aetcd.Client,
) -> None:
    a = await member(start_sidecar, etcd.url, "a")
    x = await a.put("x", {"v": 1})
    y1 = await a.put("y", {"v": 1})
    y2 = await a.put("y", {"v": 2})
    z = await a.put("z", {"v": 1})
    before = await stored(etcd_client)
    failed = await a.transaction([
        {"operation": "upsert", "session": "x", "data": {"v": 2}, "if_match": x.etag},
        {"operation": "upsert", "session": "y", "data": {"v": 3}, "if_match": y1.etag},
        {"operation": "delete", "session": "z"},
        {"operation": "upsert", "session": "new", "data": {"v": 1}},
    ])
    assert failed.status == 412, failed
    body = failed.json()
    assert body["committed"] is False and body["item"] == 1, body
    assert body["field"] == "operations[1].if_match", body
    assert "operations[1] (session 'y')" in body["error"], body
    assert [i["status"] for i in body["items"]] == [424, 412, 424, 424], body
    assert body["items"][1]["current"] == int(tag(y2))
    assert await stored(etcd_client) == before  # nothing was written at all
    for session, want in (("x", {"v": 1}), ("y", {"v": 2}), ("z", {"v": 1})):
        assert (await a.get(session)).json() == want
    assert (await a.get("new")).status == 404

    # Create-only and delete of a missing session fail the same way, naming the item.
    exists = await a.transaction([
        {"session": "new", "data": {"v": 1}},
        {"session": "x", "data": {"v": 9}, "if_none_match": "*"}])
    assert exists.status == 412 and exists.json()["field"] == "operations[1].if_none_match"
    missing = await a.transaction([{"operation": "delete", "session": "nothing"}])
    assert missing.status == 404 and missing.json()["field"] == "operations[0].session"
    assert (await a.get("new")).status == 404

    done = await a.transaction([
        {"operation": "upsert", "session": "x", "data": {"v": 2}, "if_match": x.etag},
        {"operation": "upsert", "session": "y", "data": {"v": 3}, "if_match": y2.etag},
        {"operation": "delete", "session": "z", "if_match": z.etag},
        {"operation": "upsert", "session": "new", "data": "AAE=", "encoding": "base64"},
    ])
    assert done.status == 200, done
    answer = done.json()
    assert answer["committed"] is True
    revision = answer["revision"]
    after = await stored(etcd_client)  # one etcd transaction wrote them all
    assert after == {"x": revision, "y": revision, "new": revision}, (after, before)
    assert [(i["session"], i["status"]) for i in answer["items"]] == [
        ("x", 200), ("y", 200), ("z", 204), ("new", 201)]
    assert all(i["etag"] == str(revision) for i in answer["items"] if i["status"] != 204)
    assert (await a.get("z")).status == 404
    assert (await a.get("new")).body == b"\x00\x01"
    assert tag(await a.get("x")) == str(revision)


async def test_racing_transactions_on_overlapping_sessions_never_both_commit(
    etcd: EtcdServer, start_sidecar: Any,
) -> None:
    a = await member(start_sidecar, etcd.url, "a")
    b = await member(start_sidecar, etcd.url, "b")
    for s in ("s1", "s2", "s3"):
        assert (await a.put(s, {"round": -1})).status == 201
    wins = {"a": 0, "b": 0}

    def ops(sessions: tuple[str, ...], who: str, round_: int,
            tags: dict[str, str]) -> list[dict[str, Any]]:
        return [{"session": s, "data": {"round": round_, "by": who}, "if_match": tags[s]}
                for s in sessions]

    for round_ in range(12):
        tags = {s: tag(await a.get(s)) for s in ("s1", "s2", "s3")}

        # a locks s1 then s2, b s2 then s3 (and the other way round on odd rounds).
        first, second = (("s1", "s2"), ("s3", "s2")) if round_ % 2 else (("s2", "s1"),
                                                                          ("s2", "s3"))
        ra, rb = await asyncio.gather(a.transaction(ops(first, "a", round_, tags)),
                                      b.transaction(ops(second, "b", round_, tags)))
        committed = [who for who, r in (("a", ra), ("b", rb)) if r.status == 200]
        assert len(committed) == 1, (ra, rb)
        loser = rb if committed == ["a"] else ra
        assert loser.status == 412 and loser.json()["committed"] is False, loser
        wins[committed[0]] += 1
        winner_sessions = first if committed == ["a"] else second
        for s in ("s1", "s2", "s3"):
            state = (await b.get(s)).json()
            if s in winner_sessions:
                assert state == {"round": round_, "by": committed[0]}, (s, state)
            else:
                assert state["round"] < round_, (s, state)
    assert sum(wins.values()) == 12


async def test_concurrent_transactions_on_one_member_serialize_without_deadlock(
    etcd: EtcdServer, start_sidecar: Any,
) -> None:
    a = await member(start_sidecar, etcd.url, "a")
    sessions = ["p", "q", "r", "s"]
    orders = [sessions[i:] + sessions[:i] for i in range(4)] * 4  # every rotation

    async def move(n: int, order: list[str]) -> Reply:
        return await a.transaction([{"session": s, "data": {"n": n}} for s in order])

    async with asyncio.timeout(60):
        replies = await asyncio.gather(*(move(n, order) for n, order in enumerate(orders)))
    assert [r.status for r in replies] == [200] * len(orders), replies
    revisions = [r.json()["revision"] for r in replies]
    assert len(set(revisions)) == len(orders)  # one etcd transaction each
    last = revisions.index(max(revisions))
    for s in sessions:  # the last one committed wrote all four: never a mix
        got = await a.get(s)
        assert got.json() == {"n": last} and tag(got) == str(max(revisions))


async def test_ownership_fencing_holds_for_bulk_writes(
    etcd: EtcdServer, start_sidecar: Any,
) -> None:
    a = await member(start_sidecar, etcd.url, "a")
    b = await member(start_sidecar, etcd.url, "b")
    first = items(await a.bulk_save([{"session": s, "data": {"by": "a"}}
                                     for s in ("f1", "f2", "f3")]))
    assert [i["status"] for i in first] == [201, 201, 201]
    took = items(await b.bulk_save([{"session": "f1", "data": {"by": "b"}}]))
    assert took[0]["status"] == 200 and took[0]["takeover"] is True, took
    took_tx = await b.transaction([{"session": "f3", "data": {"by": "b"}}])
    assert took_tx.status == 200 and took_tx.json()["items"][0]["takeover"] is True
    await caught_up(a, took_tx.json()["revision"])

    # However fresh a's cache is, it lost f1 and f3: 409, f2 still its own.
    fenced = items(await a.bulk_save([{"session": s, "data": {"by": "a", "late": True}}
                                      for s in ("f1", "f2")]))
    assert [i["status"] for i in fenced] == [409, 200], fenced
    assert fenced[0]["owner"] == "b" and "ownership lost" in fenced[0]["error"], fenced
    f2 = fenced[1]["etag"]
    tx = await a.transaction([{"session": "f2", "data": {"by": "a", "tx": True}},
                              {"operation": "delete", "session": "f3"}])
    assert tx.status == 409, tx
    body = tx.json()
    assert body["field"] == "operations[1].session" and body["items"][0]["status"] == 424
    assert body["items"][1]["owner"] == "b", body
    assert tag(await b.get("f2")) == f2  # f2 untouched: nothing applied
    for s, by in (("f1", "b"), ("f2", "a"), ("f3", "b")):
        assert (await b.get(s)).json()["by"] == by
    assert (await a.status())["write_conflicts"] >= 2


async def test_bad_bulk_requests_are_refused_naming_the_item_and_field(
    etcd: EtcdServer, start_sidecar: Any,
) -> None:
    a = await member(start_sidecar, etcd.url, "a", max_session_bytes=1000)

    async def refused(path: str, body: Any, status: int, field: str) -> dict[str, Any]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        reply = await a.request("POST", path, data=raw,
                                headers={"Content-Type": "application/json"})
        assert reply.status == status, (body, reply)
        answer = reply.json()
        assert answer["status"] == status and answer.get("field") == field, (body, answer)
        return dict(answer)

    save, get, txn = "/v1/sessions:bulkSave", "/v1/sessions:bulkGet", "/v1/sessions:transaction"
    await refused(save, b"{not json", 400, "body")
    await refused(save, [], 400, "body")
    await refused(save, {"items": []}, 400, "items")
    await refused(save, {"items": [{"session": "a", "data": 1}], "x": 1}, 400, "x")
    await refused(save, {"items": [{"session": "a", "data": 1}] * 129}, 413, "items")
    dup = await refused(txn, {"operations": [{"session": "a", "data": 1},
                                             {"operation": "delete", "session": "a"}]},
                        400, "operations[1].session")
    assert dup["item"] == 1 and "named twice" in dup["error"]
    await refused(save, {"items": [{"session": "a/b", "data": 1}]}, 400, "items[0].session")
    await refused(save, {"items": [{"session": "a"}]}, 400, "items[0].data")
    await refused(save, {"items": [{"session": "a", "data": "%%%", "encoding": "base64"}]},
                  400, "items[0].data")
    await refused(save, {"items": [{"session": "a", "data": "x", "content_type": "text/plain"}]},
                  400, "items[0].encoding")
    await refused(save, {"items": [{"session": "a", "data": "eyJ", "encoding": "base64",
                                    "content_type": "application/json"}]}, 400, "items[0].data")
    await refused(save, {"items": [{"session": "a", "data": 1, "if_match": '"1", "2"'}]},
                  400, "items[0].if_match")
    await refused(save, {"items": [{"session": "a", "data": 1, "if_none_match": '"3"'}]},
                  400, "items[0].if_none_match")
    await refused(save, {"items": [{"session": "ok", "data": 1},
                                   {"session": "big", "data": "x" * 1000}]},
                  413, "items[1].data")
    await refused(txn, {"operations": [{"operation": "move", "session": "a"}]}, 400,
                  "operations[0].operation")
    await refused(txn, {"operations": [{"operation": "delete", "session": "a", "data": 1}]},
                  400, "operations[0].data")
    await refused(get, {"sessions": ["a", "a"]}, 400, "sessions[1]")
    await refused(get, {"sessions": "a"}, 400, "sessions")
    # Nothing of the refused requests was written.
    assert items(await a.bulk_get(["a", "ok"])) == [
        {"session": "a", "status": 404, "error": "no session 'a'"},
        {"session": "ok", "status": 404, "error": "no session 'ok'"}]


async def test_a_transaction_beyond_one_etcd_request_is_413(
    etcd: EtcdServer, start_sidecar: Any,
) -> None:
    a = await member(start_sidecar, etcd.url, "a")
    big = base64.b64encode(b"\x00" * 700_000).decode()
    reply = await a.transaction([{"session": s, "data": big, "encoding": "base64"}
                                 for s in ("big1", "big2")])
    assert reply.status == 413 and reply.json()["field"] == "operations", reply
    # Each fits alone; as a bulk save (one etcd transaction per item here) both apply.
    saved = items(await a.bulk_save([{"session": s, "data": big, "encoding": "base64"}
                                     for s in ("big1", "big2")]))
    assert [i["status"] for i in saved] == [201, 201], saved


async def test_full_batches_and_wide_transactions_stay_within_etcds_operation_limit(
    etcd: EtcdServer, start_sidecar: Any,
) -> None:
    """etcd takes 128 operations per transaction level and counts the levels above a
    nested transaction against it: a batch of 128 single writes, or a transaction of k
    sessions in a batch of more than 128 - k ops, is refused whole (every write in it
    503). The sidecar forms batches etcd takes, and a transaction holds 127 sessions."""
    a = await member(start_sidecar, etcd.url, "a", batch_max_ops=128)
    saved = items(await a.bulk_save([{"session": f"w{i}", "data": i} for i in range(128)]))
    assert [i["status"] for i in saved] == [201] * 128, saved
    # The widest transaction queued behind single writes (pipelined on one connection:
    # the first write leaves alone, the others and the transaction queue up behind it).
    def request(method: str, path: str, body: bytes, extra: str = "") -> bytes:
        return (f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                f"\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body

    wide = json.dumps({"operations": [{"session": f"t{i}", "data": [1, i]}
                                      for i in range(127)]}).encode()
    stream = b"".join([*(request("PUT", f"/v1/sessions/w{i}", b'{"round":1}')
                         for i in range(40)),
                       request("POST", "/v1/sessions:transaction", wide,
                               "Connection: close\r\n")])
    reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
    writer.write(stream)
    await writer.drain()
    async with asyncio.timeout(30):
        answers = _answers(await reader.read())
    writer.close()
    assert [status for status, _ in answers] == [200] * 41, answers[:3]
    got = await a.get("t126")
    assert got.json() == [1, 126], got
    refused = await a.transaction([{"session": f"u{i}", "data": i} for i in range(128)])
    body = refused.json()
    assert refused.status == 413 and body["field"] == "operations", refused
    assert "the limit is 127" in body["error"], body
    assert (await a.get("u0")).status == 404  # nothing written


async def test_a_transaction_replicates_sessions_kept_local(
    etcd: EtcdServer, start_sidecar: Any,
) -> None:
    a = await member(start_sidecar, etcd.url, "a", sync_delay=300)
    b = await member(start_sidecar, etcd.url, "b", sync_delay=300)
    young = await a.put("young", {"v": 1})
    assert young.etag == '"L1"' and young.json()["replicated"] is False
    gone = await a.put("gone", {"v": 1})
    assert (await b.get("young")).status == 404
    stale = await a.transaction([{"session": "young", "data": {"v": 2}, "if_match": "L9"}])
    assert stale.status == 412, stale
    done = await a.transaction([
        {"session": "young", "data": {"v": 2}, "if_match": tag(young)},
        {"operation": "delete", "session": "gone", "if_match": tag(gone)},
        {"session": "other", "data": {"v": 1}}])
    assert done.status == 200, done
    answer = done.json()
    assert [i["status"] for i in answer["items"]] == [200, 204, 201], answer
    assert all(i.get("replicated", True) for i in answer["items"])
    got = await b.get("young")
    assert got.status == 200 and got.json() == {"v": 2} and tag(got) == str(answer["revision"])
    assert (await a.get("gone")).status == 404
    assert (await a.status())["local_sessions"] == 0
