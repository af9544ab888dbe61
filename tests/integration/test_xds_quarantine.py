"""What one stream's answers do to the node's other and later streams, over a real
grpc.aio server on loopback: a NACK never leaves a node below the last version it
accepted, and never with nothing, in state of the world and delta alike.

The sequences are the forged-NACK one (a second client claiming a connected node's id
rejects the versions the node runs, then the node restarts) and the genuine one (the
node rejects a new version, then restarts holding nothing).
"""

from __future__ import annotations

import pytest

from meshxl.xds.server import RETAINED_VERSIONS_MAX
from meshxl.xds.types import CLUSTER
from tests.harness.ads import AdsHarness, eventually, names, sent, snap, snapshot, versions


@pytest.fixture
def xds(delta_xds: AdsHarness) -> AdsHarness:
    """This file's streams are delta ones (SotW clients from ``xds.sotw``)."""
    return delta_xds


# -- state of the world ---------------------------------------------------------------------


async def test_sotw_forged_nack_of_the_running_version_changes_nothing(xds: AdsHarness) -> None:
    current = snapshot(1)
    xds.cache.set(current)
    envoy = xds.sotw("edge")
    envoy.request(CLUSTER)
    envoy.ack(await envoy.recv())
    await eventually(lambda: xds.acked(CLUSTER, "edge") == current.version(CLUSTER))

    forger = xds.sotw("edge")  # a second stream claiming the same node id
    forger.request(CLUSTER)
    forger.nack(await forger.recv(), "forged")
    await eventually(lambda: xds.ads.nacks == 1)
    await envoy.stop()
    await forger.stop()

    restarted = xds.sotw("edge")  # holds nothing
    restarted.request(CLUSTER)
    response = await restarted.recv()
    assert response.version_info == current.version(CLUSTER)
    assert names(response) == ["a", "b"]


async def test_sotw_node_that_never_accepted_is_still_served(xds: AdsHarness) -> None:
    """A forger who rejects the current version before a node ever connects cannot
    keep it from the node: with no accepted version, the current one is sent."""
    current = snapshot(1)
    xds.cache.set(current)
    forger = xds.sotw("new-node")
    forger.request(CLUSTER)
    forger.nack(await forger.recv(), "forged")
    await eventually(lambda: xds.ads.nacks == 1)
    # Not again on the stream that rejected it: no loop.
    await forger.silent()

    envoy = xds.sotw("new-node")
    envoy.request(CLUSTER)
    assert (await envoy.recv()).version_info == current.version(CLUSTER)


async def test_sotw_restart_after_a_rejection_gets_the_accepted_version(xds: AdsHarness) -> None:
    good, bad = snapshot(1), snapshot(2)
    xds.cache.set(good)
    envoy = xds.sotw("edge")
    envoy.request(CLUSTER)
    accepted = await envoy.recv()
    envoy.ack(accepted)
    await eventually(lambda: xds.acked(CLUSTER, "edge") == good.version(CLUSTER))
    xds.cache.set(bad)
    envoy.nack(await envoy.recv(), "bad", previous=accepted.version_info)
    await eventually(lambda: xds.ads.nacks == 1)
    # Envoy kept the good version: nothing is resent to it on this stream.
    await envoy.silent()
    await envoy.stop()

    restarted = xds.sotw("edge")
    restarted.request(CLUSTER)
    response = await restarted.recv()
    assert response.version_info == good.version(CLUSTER)
    restarted.ack(response)
    await restarted.silent()
    # A new version is sent normally.
    fixed = snapshot(3)
    xds.cache.set(fixed)
    assert (await restarted.recv()).version_info == fixed.version(CLUSTER)


async def test_sotw_ack_outweighs_a_later_nack_of_the_same_version(xds: AdsHarness) -> None:
    """The node ACKed a version, then (another stream of it) NACKed it: it is a version
    the node ran, so a restart gets it, not nothing."""
    current = snapshot(1)
    xds.cache.set(current)
    first = xds.sotw("edge")
    first.request(CLUSTER)
    first.ack(await first.recv())
    await eventually(lambda: xds.acked(CLUSTER, "edge") == current.version(CLUSTER))
    await first.stop()
    second = xds.sotw("edge")
    second.request(CLUSTER)
    second.nack(await second.recv(), "rejected later")
    await eventually(lambda: xds.ads.nacks == 1)
    await second.silent()  # not resent to the stream that rejected it
    await second.stop()

    third = xds.sotw("edge")
    third.request(CLUSTER)
    assert (await third.recv()).version_info == current.version(CLUSTER)


# -- delta ----------------------------------------------------------------------------------


async def test_delta_forged_nack_of_the_running_version_changes_nothing(xds: AdsHarness) -> None:
    current = snap({"a": 1, "b": 1})
    xds.cache.set(current)
    envoy = xds.envoy("edge")
    envoy.request(CLUSTER)
    envoy.ack(await envoy.recv())
    await eventually(lambda: xds.acked(CLUSTER, "edge") == current.version(CLUSTER))

    forger = xds.envoy("edge")
    forger.request(CLUSTER)
    forger.nack(await forger.recv(), "forged")
    await eventually(lambda: xds.ads.nacks == 1)
    await forger.silent()
    await envoy.stop()
    await forger.stop()

    restarted = xds.envoy("edge")
    restarted.request(CLUSTER)
    assert sent(await restarted.recv()) == versions(current, CLUSTER)


async def test_delta_restart_after_a_rejection_gets_the_accepted_versions(
        xds: AdsHarness) -> None:
    good = snap({"a": 1, "b": 1})
    xds.cache.set(good)
    envoy = xds.envoy("edge")
    envoy.request(CLUSTER)
    envoy.ack(await envoy.recv())
    await eventually(lambda: xds.acked(CLUSTER, "edge") == good.version(CLUSTER))
    bad = snap({"a": 2, "b": 1, "c": 1})  # a changed, c is new: both rejected
    xds.cache.set(bad)
    rejected = await envoy.recv()
    assert set(sent(rejected)) == {"a", "c"}
    envoy.nack(rejected, "bad")
    await eventually(lambda: xds.ads.nacks == 1)
    await envoy.silent()  # Envoy kept a at version 1: nothing to send it
    await envoy.stop()

    restarted = xds.envoy("edge")
    restarted.request(CLUSTER)
    response = await restarted.recv()
    # a as the node accepted it, b (unchanged) as it is, c not at all: it was not in
    # the configuration the node accepted.
    assert sent(response) == {"a": versions(good, CLUSTER)["a"],
                              "b": versions(bad, CLUSTER)["b"]}
    restarted.ack(response)
    await restarted.silent()
    assert xds.acked(CLUSTER, "edge") == good.version(CLUSTER)  # not the bad one

    fixed = snap({"a": 3, "b": 1, "c": 1})
    xds.cache.set(fixed)
    response = await restarted.recv()
    assert sent(response) == {"a": versions(fixed, CLUSTER)["a"],
                              "c": versions(fixed, CLUSTER)["c"]}
    restarted.ack(response)
    await eventually(lambda: xds.acked(CLUSTER, "edge") == fixed.version(CLUSTER))


async def test_delta_reconnect_holding_the_accepted_version_gets_no_resend(
        xds: AdsHarness) -> None:
    """A running Envoy moving to another stream says what it holds: the accepted
    versions it holds are not sent again, the rejected ones not at all."""
    good = snap({"a": 1, "b": 1})
    xds.cache.set(good)
    envoy = xds.envoy("edge")
    envoy.request(CLUSTER)
    envoy.ack(await envoy.recv())
    await eventually(lambda: xds.acked(CLUSTER, "edge") == good.version(CLUSTER))
    xds.cache.set(snap({"a": 2, "b": 1}))
    envoy.nack(await envoy.recv(), "bad")
    await eventually(lambda: xds.ads.nacks == 1)
    await envoy.stop()

    moved = xds.envoy("edge")
    moved.request(CLUSTER, initial=versions(good, CLUSTER))
    await moved.silent()


# -- bounds ---------------------------------------------------------------------------------


async def test_accepted_versions_of_disconnected_nodes_are_bounded(xds: AdsHarness) -> None:
    """Nodes that each accepted another version and left: only the most recent
    RETAINED_VERSIONS_MAX versions are kept for them to fall back to; a node whose
    version was dropped is served the current version (never nothing)."""
    count = RETAINED_VERSIONS_MAX + 2
    for i in range(count):
        xds.cache.set(snapshot(i + 1))
        envoy = xds.sotw(f"node-{i}")
        envoy.request(CLUSTER)
        envoy.ack(await envoy.recv())
        await eventually(lambda i=i: xds.acked(CLUSTER, f"node-{i}") is not None)
        await envoy.stop()
        await eventually(lambda i=i: xds.status(f"node-{i}")["streams"] == 0)
    kept = xds.ads._retained[CLUSTER]
    assert len(kept) == RETAINED_VERSIONS_MAX
    assert snapshot(1).version(CLUSTER) not in kept
    assert snapshot(count).version(CLUSTER) in kept

    current = snapshot(count + 1)
    xds.cache.set(current)
    for n, (node, expected) in enumerate((("node-0", current),
                                          (f"node-{count - 1}", snapshot(count)))):
        forger = xds.sotw(node)  # rejects the current version for that node
        forger.request(CLUSTER)
        forger.nack(await forger.recv(), "forged")
        await eventually(lambda n=n: xds.ads.nacks == n + 1)
        await forger.stop()
        restarted = xds.sotw(node)
        restarted.request(CLUSTER)
        assert (await restarted.recv()).version_info == expected.version(CLUSTER), node
        await restarted.stop()
