"""Start one local server and wait until it is ready: etcd, the echo backend.

The demo and the benchmarks use these; the tests' fixtures (``tests/harness``) build
their richer etcd members (clusters, TLS, network namespaces) from the same command
builder.
"""

from __future__ import annotations

from collections.abc import Sequence

from meshxl.local import commands
from meshxl.local.ports import free_ports
from meshxl.local.procs import Owner, Process
from meshxl.local.wait import wait_http

__all__ = ["HOST", "start_echo", "start_etcd"]

HOST = "127.0.0.1"


async def start_etcd(owner: Owner, name: str = "etcd", *, extra: Sequence[str] = (),
                     timeout: float = 15.0) -> tuple[str, Process]:
    """A single-member etcd in the owner's directory: (client URL, process). Its data
    is the owner's scratch: removed when the owner closes."""
    client, peer = free_ports(2)
    url = f"http://{HOST}:{client}"
    proc = owner.spawn(name, commands.etcd(
        name=name, data_dir=owner.scratch(owner.root / f"{name}.data"), client_url=url,
        peer_url=f"http://{HOST}:{peer}", extra=extra))
    await wait_http(f"{url}/health", process=proc, timeout=timeout)
    return url, proc


async def start_echo(owner: Owner, name: str, port: int, *, host: str = HOST,
                     timeout: float = 15.0) -> Process:
    """A sample backend (``meshxl.demo.echo``) answering with its member name."""
    proc = owner.spawn(name, commands.echo(name, f"{host}:{port}"))
    await wait_http(f"http://{host}:{port}/healthz", process=proc, timeout=timeout)
    return proc
