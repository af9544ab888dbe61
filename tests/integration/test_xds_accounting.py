"""ACK/NACK accounting, stream cleanup and bounds at the ADS edge, with hand-made
DiscoveryRequests against the real gRPC server."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshxl.etcd.keys import Keys
from meshxl.nodeid import NODE_ID_MAX, node_id_problem
from meshxl.xds.cache import SnapshotCache
from meshxl.xds.nodes import NACK_TEXT_MAX, Nack, NodeStatus
from meshxl.xds.server import AdsServer
from meshxl.xds.sotw import SotwStream
from meshxl.xds.types import CLUSTER
from tests.harness.ads import AdsHarness, eventually, snap, snapshot
from tests.harness.clock import window

# -- (a) ACK and NACK as the xDS protocol defines them -------------------------------------


@pytest.mark.parametrize("held", ["", "previous"])
async def test_sotw_request_after_nack_with_same_nonce_is_not_an_ack(
        xds: AdsHarness, held: str) -> None:
    good, bad = snapshot(1), snapshot(2)
    xds.cache.set(good)
    envoy = xds.envoy()
    envoy.request(CLUSTER)
    accepted = await envoy.recv()
    envoy.ack(accepted)
    await eventually(lambda: xds.types("envoy-1")[CLUSTER]["acked_version"]
                     == good.version(CLUSTER))

    xds.cache.set(bad)
    rejected = await envoy.recv()
    envoy.nack(rejected, "bad cluster", previous=accepted.version_info)
    await eventually(lambda: xds.ads.nacks == 1)
    # Envoy's subscriptions change: it repeats the NACKed nonce, without error, with the
    # version it holds (empty when it never accepted one of this stream's responses).
    version = accepted.version_info if held else ""
    envoy.request(CLUSTER, version=version, nonce=rejected.nonce)
    await envoy.silent()
    assert xds.types("envoy-1")[CLUSTER]["acked_version"] == good.version(CLUSTER)
    answers = xds.answers  # type: ignore[attr-defined]
    assert (("envoy-1", CLUSTER, bad.version(CLUSTER), None) not in answers), answers
    assert xds.ads.nacks == 1


async def test_sotw_ack_needs_the_sent_version(xds: AdsHarness) -> None:
    xds.cache.set(snapshot(1))
    envoy = xds.envoy()
    envoy.request(CLUSTER)
    response = await envoy.recv()
    envoy.request(CLUSTER, version="", nonce=response.nonce)  # not applied: no ACK
    await envoy.silent()
    assert xds.types("envoy-1")[CLUSTER]["acked_version"] is None
    envoy.ack(response)
    await eventually(lambda: xds.types("envoy-1")[CLUSTER]["acked_version"]
                     == response.version_info)


async def test_sotw_repeated_nack_counts_once(xds: AdsHarness) -> None:
    xds.cache.set(snapshot(1))
    envoy = xds.envoy()
    envoy.request(CLUSTER)
    response = await envoy.recv()
    envoy.nack(response, "no")
    envoy.nack(response, "no")
    await envoy.silent()
    assert xds.ads.nacks == 1


async def test_delta_request_after_nack_with_same_nonce_is_not_an_ack(
        delta_xds: AdsHarness) -> None:
    delta_xds.cache.set(snap({"a": 1}))
    envoy = delta_xds.envoy()
    envoy.request(CLUSTER)
    first = await envoy.recv()
    envoy.ack(first)
    await eventually(lambda: delta_xds.acked(CLUSTER) == first.system_version_info)
    delta_xds.cache.set(snap({"a": 2}))
    rejected = await envoy.recv()
    envoy.nack(rejected, "bad cluster")
    await eventually(lambda: delta_xds.ads.nacks == 1)
    envoy.request(CLUSTER, ["extra"], nonce=rejected.nonce)  # a subscription change
    await envoy.recv()  # "extra" does not exist: answered as removed
    await window(0.1, "an ACK would be counted by now")
    assert delta_xds.acked(CLUSTER) == first.system_version_info
    assert delta_xds.ads.nacks == 1


# -- (b) cleanup on every stream end ---------------------------------------------------------


class _Context:
    """The parts of grpc.aio's ServicerContext a stream uses: a plaintext peer."""

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    async def write(self, _: bytes) -> None:
        pass

    async def abort(self, code: Any, details: str) -> None:
        raise AssertionError(f"aborted: {code} {details}")


async def test_stream_cancelled_twice_leaves_no_ghost_node() -> None:
    """The handler task is cancelled, then cancelled again while it cleans up (a slow
    reader): the node must still count the stream as gone."""
    cache = SnapshotCache()
    cache.set(snapshot(1))
    changes: list[list[tuple[str, dict[str, Any]]]] = []

    async def on_change(batch: list[tuple[str, dict[str, Any]]]) -> None:
        changes.append(batch)

    ads = AdsServer(cache, on_status_change=on_change)
    release = asyncio.Event()

    async def requests() -> AsyncIterator[DiscoveryRequest]:
        yield DiscoveryRequest(type_url=CLUSTER, node=Node(id="ghost"))
        try:
            await asyncio.Event().wait()
        finally:
            await release.wait()  # a reader slow to stop
        yield DiscoveryRequest()  # pragma: no cover

    task = asyncio.create_task(ads._run(requests(), _Context(), SotwStream(ads)))  # type: ignore[arg-type]
    await eventually(lambda: ads.node_status().get("ghost", {}).get("streams") == 1)
    task.cancel()
    await window(0.05, "the handler now waits for its reader")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    release.set()
    await asyncio.sleep(0)
    assert ads.node_status()["ghost"]["streams"] == 0
    await ads.close()
    assert changes[-1][-1][1]["streams"] == 0  # the disconnect reached the status callback


# -- (c) node ids refused at the edge ------------------------------------------------------


@pytest.mark.parametrize("node_id", ["", "a/b", "x" * (NODE_ID_MAX + 1), "sp ace", "é"])
async def test_bad_node_id_is_refused_and_others_are_served(xds: AdsHarness, node_id: str) -> None:
    xds.cache.set(snapshot(1))
    bad = xds.envoy(node_id)
    bad.request(CLUSTER)
    async with asyncio.timeout(5):
        assert await bad.call.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "node id" in await bad.call.details()
    assert node_id not in xds.ads.node_status()
    good = xds.envoy("sidecar~10.0.0.1~pod-1.ns~ns.svc.cluster.local")
    good.request(CLUSTER)
    good.ack(await good.recv())
    await eventually(lambda: xds.types(good.node_id)[CLUSTER]["acked_version"] is not None)


async def test_oversized_type_url_is_refused(xds: AdsHarness) -> None:
    xds.cache.set(snapshot(1))
    envoy = xds.envoy()
    envoy.request("t" * 10_000)
    async with asyncio.timeout(5):
        assert await envoy.call.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- (d) bounded NACK texts and log lines ----------------------------------------------------


async def test_nack_text_is_bounded_and_repeats_are_not_logged(
        xds: AdsHarness, caplog: pytest.LogCaptureFixture) -> None:
    huge = "E" * 200_000
    envoy = xds.envoy()
    caplog.set_level(logging.INFO, logger="meshxl.xds.server")
    for version in range(1, 6):
        xds.cache.set(snapshot(version))
        if version == 1:
            envoy.request(CLUSTER)
        response = await envoy.recv()
        envoy.nack(response, huge)
        await eventually(lambda v=version: xds.ads.nacks == v)  # type: ignore[misc]
    error = xds.ads.node_status()["envoy-1"]["last_nack"]["error"]
    assert len(error) <= NACK_TEXT_MAX
    assert error.startswith("EEEE") and "characters cut" in error
    rejected = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert len(rejected) == 1
    assert len(rejected[0].getMessage()) < NACK_TEXT_MAX + 500


# -- the stored format ------------------------------------------------------------------------

_ids = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1,
               max_size=NODE_ID_MAX)


@settings(max_examples=200, deadline=None)
@given(node_id=st.text(min_size=1, max_size=300))
def test_any_node_id_makes_one_key_that_reads_back(node_id: str) -> None:
    keys = Keys("/meshxl")
    key = keys.node(node_id)
    assert "/" not in key[len(keys.nodes_prefix):]
    assert keys.parse_node_key(key) == node_id


@settings(max_examples=100, deadline=None)
@given(node_id=_ids.filter(lambda n: node_id_problem(n) is None),
       error=st.text(max_size=3000), cluster=st.text(max_size=40),
       versions=st.dictionaries(st.sampled_from([CLUSTER, "type.googleapis.com/x.Y"]),
                                st.text(max_size=20), max_size=2))
def test_node_status_round_trips_through_its_stored_form(
        node_id: str, error: str, cluster: str, versions: dict[str, str]) -> None:
    ads = AdsServer(SnapshotCache())
    node = NodeStatus(node_id, cluster=cluster, streams=1, connected_at=1.5)
    for type_url, version in versions.items():
        node.status(type_url).sent_version = version
    ads._nodes[node_id] = node
    ads.answered(node, CLUSTER, "v1", error, None, nack=True)
    status = ads.node_status()[node_id]
    keys = Keys()
    key, value = keys.node(node_id), json.dumps({**status, "replica": "r"}).encode()
    assert len(value) < 16 * 1024
    assert keys.parse_node_key(key) == node_id
    read = json.loads(value)
    read.pop("replica")
    assert read == status
    assert isinstance(node.last_nack, Nack)
    assert len(read["last_nack"]["error"]) <= NACK_TEXT_MAX


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(st.text(max_size=3000), st.builds(
    lambda n: "".join(chr(0x41 + i % 26) for i in range(n)), st.integers(0, 5000))),
    limit=st.integers(64, 2048))
def test_bounded_text_keeps_both_ends_within_the_limit(text: str, limit: int) -> None:
    from meshxl.xds.nodes import bound_text

    out = bound_text(text, limit)
    assert len(out) <= limit
    if len(text) <= limit:
        assert out == text
    else:
        # The note takes at most 29 characters for texts under 10,000 characters.
        assert out.startswith(text[: (limit - 40) // 3])
        assert out.endswith(text[-((limit - 40) * 2 // 3):])
