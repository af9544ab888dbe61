"""Node-status records in etcd from raw ADS clients: a refused node id costs no other
node its record, and every stream end removes its node's record."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aetcd
import grpc
import pytest
from envoy.service.discovery.v3.ads_pb2_grpc import AggregatedDiscoveryServiceStub

from meshxl.etcd.keys import Keys
from meshxl.local.wait import wait_until
from meshxl.operator.actions import apply_model
from meshxl.xds.types import CLUSTER
from tests.harness.ads import Envoy

pytestmark = pytest.mark.integration

KEYS = Keys()
MODEL = "clusters: [{name: web, members: [{name: a, address: 127.0.0.1, port: 8080}]}]\n"
GOOD_ID = "sidecar~10.0.0.1~pod-1.ns~ns.svc.cluster.local"


async def record(client: aetcd.Client, node_id: str) -> dict[str, Any] | None:
    got = await client.get(KEYS.node(node_id).encode())
    return None if got is None else json.loads(got.value)


async def test_bad_ids_are_refused_and_records_follow_every_stream_end(
        start_control_plane: Any, etcd: Any, etcd_client: aetcd.Client) -> None:
    await apply_model(etcd_client, KEYS, MODEL, "test")
    plane = await start_control_plane(etcd=etcd.url)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{plane.port}")
    stub = AggregatedDiscoveryServiceStub(channel)
    clients: list[Envoy] = []
    try:
        for bad_id in ("a/b", "", "x" * 5000):
            bad = Envoy(stub, bad_id)
            clients.append(bad)
            bad.request(CLUSTER)
        good = Envoy(stub, GOOD_ID)
        clients.append(good)
        good.request(CLUSTER)
        response = await good.recv()
        good.ack(response)
        for bad in clients[:-1]:
            async with asyncio.timeout(5):
                assert await bad.call.code() == grpc.StatusCode.INVALID_ARGUMENT

        async def acked() -> bool:
            found = await record(etcd_client, GOOD_ID)
            return found is not None and \
                found["types"][CLUSTER]["acked_version"] == response.version_info

        await wait_until(acked, timeout=10, what="the good node's ACK in etcd")
        nodes = await etcd_client.get_prefix(KEYS.nodes_prefix.encode())
        assert [KEYS.parse_node_key(kv.key.decode()) for kv in nodes] == [GOOD_ID]

        good.call.cancel()  # the stream ends while its handler is running

        async def gone() -> bool:
            return await record(etcd_client, GOOD_ID) is None

        await wait_until(gone, timeout=10, what="the record of a disconnected node removed")
        assert plane.ads.node_status()[GOOD_ID]["streams"] == 0
    finally:
        for client in clients:
            await client.stop()
        await channel.close()
