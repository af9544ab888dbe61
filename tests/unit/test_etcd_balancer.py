"""The etcd balancer's judgement of members, and the session store's retries, without
processes: members are fakes answering (or not) what a test says.

The real thing (etcd members in network namespaces, partitioned and killed under load)
is ``tests/integration/test_etcd_partitions.py``.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import pytest
from aetcd import rpc

from meshxl import etcd
from meshxl.etcd import DOWN, NO_LEADER, UP, Balancer, Endpoint, EtcdUnavailable
from meshxl.local.wait import wait_until
from meshxl.statesync.store import SessionStore, WriteResult, write_result
from meshxl.statesync.txns import transact
from tests.harness.clock import scaled

ROOT = Path(__file__).resolve().parents[2]


# -- what a retried write's answer means ------------------------------------------------------


def _failed_compare(revision: int, value: bytes | None) -> Any:
    kvs = [rpc.KeyValue(key=b"k", mod_revision=revision, value=value or b"")] if revision else []
    return rpc.ResponseOp(response_txn=rpc.TxnResponse(
        succeeded=False, responses=[rpc.ResponseOp(
            response_range=rpc.RangeResponse(kvs=kvs))]))


def test_a_write_answered_the_first_time_means_what_etcd_says() -> None:
    ok = rpc.ResponseOp(response_txn=rpc.TxnResponse(succeeded=True))
    assert write_result(ok, 42, False, b"v") == WriteResult(True, 42)
    assert write_result(ok, 42, True, b"v") == WriteResult(True, 42)
    refused = write_result(_failed_compare(40, b"theirs"), 42, False, b"mine")
    assert not refused.ok and refused.current is not None
    assert refused.current.revision == 40 and refused.current.value == b"theirs"


def test_a_retried_write_finding_its_own_bytes_was_applied_by_the_earlier_attempt() -> None:
    assert write_result(_failed_compare(41, b"mine"), 42, True, b"mine") == \
        WriteResult(True, 41)


@pytest.mark.parametrize(("revision", "value", "ours"), [
    (41, b"theirs", b"mine"),   # overwritten since, or never applied: cannot tell
    (0, None, b"mine"),         # deleted since
    (0, None, None),            # a delete: gone, by this attempt or another writer's
    (41, b"theirs", None),
])
def test_a_retried_write_that_cannot_tell_is_never_a_2xx_nor_a_conflict(
        revision: int, value: bytes | None, ours: bytes | None) -> None:
    with pytest.raises(EtcdUnavailable, match="cannot be told"):
        write_result(_failed_compare(revision, value), 42, True, ours)


# -- judging members ------------------------------------------------------------------------------


def _balancer(n: int = 3) -> Balancer:
    balancer = Balancer([Endpoint(f"m{i}:2379", object()) for i in range(n)])  # type: ignore[arg-type]
    balancer._preferred = 0
    return balancer


def _answer(ep: Endpoint, member_id: int, leader: int, term: int = 2) -> None:
    ep.answered, ep.member_id, ep.leader, ep.term = True, member_id, leader, term
    ep._applied_seq += 1


def _silent(ep: Endpoint) -> None:
    ep.answered = False
    ep._applied_seq += 1


def test_members_with_a_leader_are_up_and_the_preferred_one_is_used() -> None:
    b = _balancer()
    for i, ep in enumerate(b.endpoints):
        _answer(ep, i + 1, 1)
    b._evaluate()
    assert [ep.state for ep in b.endpoints] == [UP, UP, UP]
    assert b.current is b.endpoints[0]


def test_the_nearest_member_is_preferred_once_measured_and_only_when_clearly_nearer() -> None:
    b = _balancer()
    for i, ep in enumerate(b.endpoints):
        _answer(ep, i + 1, 1)
    b._evaluate()
    # Two samples are no distance yet; loopback-like differences never move a client.
    b.endpoints[0].round_trips.extend([0.0011, 0.0009, 0.0010])
    b.endpoints[1].round_trips.extend([0.0004, 0.0003])
    b.endpoints[2].round_trips.extend([0.0003, 0.0002, 0.0004])
    assert b.current is b.endpoints[0] and b.switches == 0
    # A member of another site (20 ms) is left for one of this site (0.3 ms), even when
    # the far one has one fast outlier: the distance is the fastest recent probe.
    b.endpoints[0].round_trips.clear()
    b.endpoints[0].round_trips.extend([0.021, 0.020, 0.025])
    assert b.current is b.endpoints[2] and b.switches == 1
    assert b.endpoints[2].as_dict()["distance_ms"] == 0.2
    # The nearer member is only taken while it is up.
    _silent(b.endpoints[1])
    _silent(b.endpoints[2])
    b._evaluate()
    assert b.current is b.endpoints[0]


def test_a_silent_leader_leaves_its_followers_without_one_until_a_new_term() -> None:
    b = _balancer()
    for i, ep in enumerate(b.endpoints):
        _answer(ep, i + 1, 1)
    b._evaluate()
    fired = b.endpoints[1].changed()
    _silent(b.endpoints[0])
    b._evaluate()
    assert [ep.state for ep in b.endpoints] == [DOWN, NO_LEADER, NO_LEADER]
    assert fired.is_set(), "requests on a follower of a gone leader must be told"
    # Member 2 won the election: every member reporting it is up again, and the
    # client moved off the silent member.
    _answer(b.endpoints[1], 2, 2, term=3)
    _answer(b.endpoints[2], 3, 2, term=3)
    b._evaluate()
    assert [ep.state for ep in b.endpoints] == [DOWN, UP, UP]
    assert b.current is b.endpoints[1] and b.switches == 1


def test_a_member_behind_the_newest_term_has_no_leader() -> None:
    b = _balancer()
    _answer(b.endpoints[0], 1, 1, term=2)   # still believes in the old leader
    _answer(b.endpoints[1], 2, 2, term=3)
    _answer(b.endpoints[2], 3, 2, term=3)
    b._evaluate()
    assert [ep.state for ep in b.endpoints] == [NO_LEADER, UP, UP]


def test_a_new_leader_tells_requests_in_flight_on_a_member_that_stays_up() -> None:
    b = _balancer()
    for i, ep in enumerate(b.endpoints):
        _answer(ep, i + 1, 1, term=2)
    b._evaluate()
    fired = b.endpoints[2].changed()
    _answer(b.endpoints[2], 3, 2, term=3)
    b._evaluate(leader_changed=b.endpoints[2])
    assert fired.is_set() and b.endpoints[2].state == UP


def test_a_member_lagging_behind_its_peers_probes_is_down() -> None:
    b = _balancer(2)
    for i, ep in enumerate(b.endpoints):
        _answer(ep, i + 1, 1)
    b._evaluate()
    sent = time.monotonic() - 1.0
    b.endpoints[0]._outstanding[99] = sent
    b._check_lagging(b.endpoints[0])
    assert b.endpoints[0].state == UP, "nobody answered a later probe: no verdict"
    b.endpoints[1].answered_sent = sent + 0.5
    b._check_lagging(b.endpoints[0])
    assert b.endpoints[0].state == DOWN and b.current is b.endpoints[1]


async def test_choose_fails_at_once_when_no_member_answers() -> None:
    b = _balancer()
    for ep in b.endpoints:
        _silent(ep)
    b._evaluate()
    started = time.monotonic()
    with pytest.raises(EtcdUnavailable, match="no etcd member answers"):
        await b.choose(time.monotonic() + 5)
    assert time.monotonic() - started < scaled(2.5)  # at once, not at the 5 s deadline


async def test_choose_waits_for_a_leader_then_takes_the_member_that_has_one() -> None:
    b = _balancer()
    for i, ep in enumerate(b.endpoints):
        _answer(ep, i + 1, 0)
    b._evaluate()
    assert {ep.state for ep in b.endpoints} == {NO_LEADER}

    async def elect() -> None:
        await asyncio.sleep(0.05)
        _answer(b.endpoints[2], 3, 3, term=3)
        b._evaluate()

    task = asyncio.create_task(elect())
    assert await b.choose(time.monotonic() + 5) is b.endpoints[2]
    await task
    with pytest.raises(EtcdUnavailable, match="no etcd member has a leader"):
        _silent(b.endpoints[2])
        b._evaluate()
        await b.choose(time.monotonic() + 0.05)


# -- the store's batches against members that hang --------------------------------------------


class _Member:
    """A fake etcd member's client: ``Txn`` answers at once, or never while ``hang``."""

    def __init__(self) -> None:
        self.hang = False
        self.sent: list[int] = []
        self.metadata = None
        self.kvstub = self
        self.channel = self

    def unary_unary(self, method: str, request_serializer: Any,
                    response_deserializer: Any) -> Any:
        """The store sends its batches as serialized requests (statesync/wire.py)."""
        assert method == "/etcdserverpb.KV/Txn" and request_serializer is None

        def call(data: bytes, timeout: float, metadata: Any) -> Any:
            return self.Txn(rpc.TxnRequest.FromString(data), timeout, metadata)

        return call

    async def Txn(self, request: Any, timeout: float, metadata: Any) -> Any:  # noqa: N802
        self.sent.append(len(request.success))
        if self.hang:
            await asyncio.sleep(3600)
        return rpc.TxnResponse(header=rpc.ResponseHeader(revision=7), responses=[
            rpc.ResponseOp(response_txn=rpc.TxnResponse(succeeded=True))
            for _ in request.success])


async def _write(store: SessionStore, key: bytes, expected: int) -> WriteResult:
    [answer] = await store.write([(key, b"v", expected)], 0)
    if isinstance(answer, BaseException):
        raise answer
    return answer


async def test_a_batch_stuck_on_a_member_does_not_hold_the_writes_behind_it() -> None:
    member = _Member()
    store = SessionStore(member, ttl=60, max_inflight=1, timeout=5)  # type: ignore[arg-type]
    member.hang = True
    stuck = asyncio.create_task(_write(store, b"a", 3))
    await asyncio.sleep(0.01)
    member.hang = False
    started = time.monotonic()
    assert (await _write(store, b"b", 4)).ok
    assert time.monotonic() - started < scaled(2.5), "the write waited for the stuck batch"
    stuck.cancel()
    await store.close()


async def test_a_batch_on_a_member_that_goes_is_sent_again_elsewhere_but_creations_are_not(
) -> None:
    lost, good = _Member(), _Member()
    client: Any = type("C", (), {})()
    client.balancer = _balancer(2)
    client.balancer.endpoints[0].client = lost
    client.balancer.endpoints[1].client = good
    for i, ep in enumerate(client.balancer.endpoints):
        _answer(ep, i + 1, 2)  # the leader is the member that stays
    client.balancer._evaluate()
    store = SessionStore(client, ttl=60, max_inflight=1, timeout=5)
    lost.hang = True
    update = asyncio.create_task(_write(store, b"a", 3))
    create = asyncio.create_task(_write(store, b"b", 0))
    await wait_until(lambda: len(lost.sent) == 2,  # past the stalled first one
                     what="the second batch sent too")
    assert lost.sent == [1, 1] and not good.sent
    _silent(client.balancer.endpoints[0])   # its probes stop answering
    client.balancer._evaluate()
    async with asyncio.timeout(scaled(10)):
        assert (await update) == WriteResult(True, 7)
    with pytest.raises(EtcdUnavailable, match="may or may not have applied"):
        async with asyncio.timeout(scaled(10)):
            await create
    assert good.sent == [1], "only the update is sent again"
    await store.close()


async def test_a_transaction_is_sent_again_when_one_compare_holds_once_at_most() -> None:
    """A delete and its deletion record (a new key, compared absent) in one transaction:
    once applied, the delete's compare never holds again, so sending it again is safe
    (and its record settles whether the first attempt applied). A transaction that
    only creates is never sent twice."""
    lost, good = _Member(), _Member()
    client: Any = type("C", (), {})()
    client.balancer = _balancer(2)
    client.balancer.endpoints[0].client = lost
    client.balancer.endpoints[1].client = good
    for i, ep in enumerate(client.balancer.endpoints):
        _answer(ep, i + 1, 2)
    client.balancer._evaluate()
    store = SessionStore(client, ttl=60, max_inflight=1, timeout=5)
    lost.hang = True
    delete = asyncio.create_task(transact(store, [(b"s", None, 3), (b"d", None, 0)]))
    create = asyncio.create_task(transact(store, [(b"n", None, 0), (b"m", None, 0)]))
    await wait_until(lambda: len(lost.sent) == 2, what="the second batch sent too")
    _silent(client.balancer.endpoints[0])
    client.balancer._evaluate()
    async with asyncio.timeout(scaled(10)):
        done = await delete
    assert done.ok and done.revision == 7, done
    with pytest.raises(EtcdUnavailable, match="may or may not have applied"):
        async with asyncio.timeout(scaled(10)):
            await create
    assert good.sent == [1], "only the transaction with a delete is sent again"
    await store.close()


# -- every etcd meshxl starts runs with pre-vote ----------------------------------------------


# The one etcd command-line builder: the demo, the benchmarks and the tests use it.
ETCD_COMMAND_LINES = ["meshxl/local/commands.py"]
# etcds started with the args of a rendered Kubernetes manifest, whose --pre-vote
# test_the_kubernetes_etcd_runs_with_pre_vote checks.
ETCD_FROM_MANIFESTS = ["tests/integration/test_etcd_tls_overlay.py"]
# etcd's gRPC proxy (`etcd grpc-proxy start`), no member: it takes no --pre-vote.
ETCD_GRPC_PROXIES = ["tests/integration/test_etcd_external_lp.py"]


@pytest.mark.parametrize("path", ETCD_GRPC_PROXIES)
def test_an_etcd_binary_started_as_a_proxy_starts_only_that(path: str) -> None:
    text = (ROOT / path).read_text()
    starts = [m.end() for m in re.finditer(r"find_etcd\(\),", text)]
    assert starts, f"{path} starts no etcd any more: update this list"
    for start in starts:
        assert text[start:start + 40].lstrip().startswith('"grpc-proxy", "start"'), path


@pytest.mark.parametrize("path", ETCD_COMMAND_LINES)
def test_every_etcd_command_line_enables_pre_vote(path: str) -> None:
    text = (ROOT / path).read_text()
    starts = [m.start() for m in re.finditer(r"find_etcd\(\),", text)]
    assert starts, f"{path} starts no etcd any more: update this list"
    for start in starts:
        window = text[start:start + 1200]
        assert '"--pre-vote"' in window, f"an etcd command line in {path} lacks --pre-vote"


def test_every_etcd_started_in_the_source_tree_is_listed_here() -> None:
    found = {str(p.relative_to(ROOT)) for top in ("meshxl", "bench", "tests")
             for p in (ROOT / top).rglob("*.py")
             if re.search(r"find_etcd\(\),", p.read_text())}
    assert found == set(ETCD_COMMAND_LINES) | set(ETCD_FROM_MANIFESTS) | set(ETCD_GRPC_PROXIES)


def test_the_kubernetes_etcd_runs_with_pre_vote() -> None:
    manifest = (ROOT / "deploy/kubernetes/base/etcd.yaml").read_text()
    assert "- --pre-vote=true" in manifest


def test_a_multi_member_client_is_balanced_and_a_single_one_stays_plain() -> None:
    import aetcd

    from meshxl.etcd import h2c

    plain = etcd.client("http://127.0.0.1:2379")
    assert type(plain) is h2c.Client and isinstance(plain, aetcd.Client)
    balanced = etcd.client("http://127.0.0.1:2379,http://127.0.0.2:2379")
    assert isinstance(balanced, etcd.BalancedClient)
    assert [ep.name for ep in balanced.balancer.endpoints] == ["127.0.0.1:2379",
                                                               "127.0.0.2:2379"]
