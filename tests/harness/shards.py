"""Helpers for tests of session shards on real etcd: where a session's key is, which ids
hash to a shard, and etcd servers reached at more than one URL or from a network
namespace (``tests/integration/test_shards.py``, ``test_reshard_faults.py``,
``test_reshard_model.py``)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import aetcd

from meshxl.etcd.keys import Keys
from meshxl.etcd.shards import ShardMap
from meshxl.local import commands
from meshxl.local.ports import free_ports
from meshxl.local.procs import Owner, Process
from meshxl.local.wait import wait_http
from tests.harness.etcd import EtcdServer

__all__ = ["KEYS", "ids_in", "keys_in", "read_stored_map", "session_keys", "start_etcd_at",
           "start_two_port_etcd"]

KEYS = Keys()


def ids_in(shards: ShardMap, name: str, count: int, prefix: str = "s") -> list[str]:
    """``count`` session ids that hash to shard ``name``."""
    found = [f"{prefix}{i}" for i in range(2000) if shards.of(f"{prefix}{i}").name == name]
    assert len(found) >= count
    return found[:count]


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[-1].split(",")[0].rsplit(":", 1)
    return host, int(port.rstrip("/"))


async def session_keys(url: str, cluster: str) -> dict[str, bytes]:
    """Session id -> stored value of ``cluster``'s sessions in the etcd at ``url``."""
    host, port = _host_port(url)
    prefix = KEYS.sessions_prefix(cluster).encode()
    async with aetcd.Client(host=host, port=port, timeout=5) as client:
        return {kv.key[len(prefix):].decode(): kv.value
                for kv in await client.get_prefix(prefix)}


async def keys_in(url: str, cluster: str) -> set[str]:
    return set(await session_keys(url, cluster))


async def read_stored_map(url: str) -> bytes | None:
    """The shard map's stored bytes in the main etcd at ``url`` (None: none)."""
    host, port = _host_port(url)
    async with aetcd.Client(host=host, port=port, timeout=5) as client:
        got = await client.get(KEYS.shards.encode())
    return None if got is None else bytes(got.value)


async def start_etcd_at(harness: Owner, name: str, host: str,
                        wrap: Callable[[list[str]], list[str]] | None = None) -> EtcdServer:
    """A single-member etcd listening on ``host`` (an address of a network namespace
    test bed), run through ``wrap`` (inside a namespace) if given."""
    name = harness.unique_name(name)
    client_port, peer_port = free_ports(2)
    server = EtcdServer(harness, name=name, client_port=client_port, peer_port=peer_port,
                        initial_cluster=f"{name}=http://{host}:{peer_port}",
                        token=f"meshxl-test-{uuid.uuid4().hex[:12]}",
                        data_dir=harness.path(name) / "data", host=host, wrap=wrap)
    return await server.start()


async def start_two_port_etcd(harness: Owner, name: str,
                              host: str = "127.0.0.1") -> tuple[Process, str, str]:
    """A single-member etcd answering clients at two URLs on ``host`` (one cluster, two
    endpoints, as after a member was given a new address): its process and both URLs."""
    name = harness.unique_name(name)
    one, two, peer = free_ports(3)
    first, second = f"http://{host}:{one}", f"http://{host}:{two}"
    argv = commands.etcd(name=name, data_dir=harness.path(name) / "data", client_url=first,
                         peer_url=f"http://{host}:{peer}",
                         token=f"meshxl-test-{uuid.uuid4().hex[:12]}",
                         extra=["--listen-client-urls", f"{first},{second}"])
    process = harness.spawn(name, argv)
    await wait_http(f"{first}/health", process=process, timeout=20)
    await wait_http(f"{second}/health", process=process, timeout=20)
    return process, first, second


def value_of(raw: bytes) -> Any:
    """The JSON state inside a stored session record (for comparisons by value)."""
    import json

    from meshxl.statesync.record import SessionRecord

    return json.loads(SessionRecord.decode(raw).data)
