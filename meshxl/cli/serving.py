"""What the server commands run once their options are read, without click.

``meshxl serve statesync`` runs in every pod. Its options are read by click when the
``meshxl`` command goes its usual way, or by :mod:`.entry` before click is imported
(docs/performance.md, "Sidecar footprint"): both end in :func:`serve_statesync` here,
which nothing of click reaches. Also here for the other servers: logging set up and a
server run with tracing (:func:`traced`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from .errors import checked, run

__all__ = ["etcd_security_from", "serve_statesync", "setup_logging", "statesync_listens",
           "traced"]

T = TypeVar("T")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # grpc's own debug lines (one per event loop lookup) would drown meshxl's.
    logging.getLogger("grpc").setLevel(max(logging.INFO, logging.getLogger().level))


def etcd_security_from(given: Mapping[str, Any]) -> Any:
    """The etcd TLS and credential settings of the options ``given`` (``ca``, ``cert``,
    ``key``, ``user``, ``password_file``), checked, or an
    :class:`~meshxl.etcd.EtcdSecurityError`. The password is never a command-line value:
    it comes from a file or the MESHXL_ETCD_PASSWORD variable."""
    import os

    from meshxl.etcd import EtcdSecurity, EtcdSecurityError, read_secret_file

    password = os.environ.get("MESHXL_ETCD_PASSWORD") or None
    if given.get("password_file") is not None:
        if password is not None:
            raise EtcdSecurityError("give the etcd password once: --etcd-password-file or "
                                    "MESHXL_ETCD_PASSWORD, not both")
        password = read_secret_file(given["password_file"], "etcd password file")
    security = EtcdSecurity(ca=given.get("ca"), cert=given.get("cert"), key=given.get("key"),
                            user=given.get("user") or None, password=password,
                            password_file=given.get("password_file"))
    security.check()
    return security


def traced(component: str, trace_file: Path | None, attributes: dict[str, Any],
           coro_fn: Callable[[], Awaitable[T]],
           loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None) -> T:
    """Run a server with tracing set up (OTEL_* and --trace-file), flushed at exit, on
    the event loop ``loop_factory`` makes (asyncio's by default)."""
    from meshxl.telemetry.tracing import setup_tracing, shutdown_tracing

    checked(lambda: setup_tracing(component, attributes=attributes, trace_file=trace_file))
    # SIGTERM ends the server like Ctrl-C: cleanup runs and the spans are flushed.
    try:
        return run(coro_fn, loop_factory=loop_factory, sigterm=True)
    finally:
        shutdown_tracing()


def serve_statesync(clusters: tuple[str, ...], pool: str | None, member: str,
                    app_address: str, site: str | None,
                    weight: int | None, listens: tuple[str, ...], socket_mode: str,
                    token_file: Path | None, etcd_urls: str,
                    etcd_credentials_dir: Path | None, etcd_root: str,
                    session_ttl: float | None, sync_delay: float | None,
                    max_session_bytes: int | None, lease_ttl: float, batch_max_ops: int,
                    max_inflight: int, max_connections: int | None, trace_file: Path | None,
                    log_level: str, etcd_security: Callable[[], Any],
                    istio_workload: str | None = None, istio_tls_mode: str = "",
                    dapr: str = "off", dapr_http_port: int = 3500,
                    dapr_grpc_port: int = 50001, dapr_app_id: str | None = None,
                    dapr_key_prefix: str = "appid", dapr_store: str = "statestore") -> None:
    """The session-state sidecar, from ``meshxl serve statesync``'s option values;
    ``etcd_security``: the etcd TLS and credential settings, built when called;
    ``istio_workload``, ``istio_tls_mode``: its pod's, under Istio."""
    import os

    from meshxl.loops import loop_factory
    from meshxl.statesync.app import StatesyncConfig
    from meshxl.statesync.app import serve as serve_sidecar
    from meshxl.statesync.auth import read_token
    from meshxl.statesync.config import DaprConfig
    from meshxl.statesync.credentials import cluster_security

    setup_logging(log_level)
    checked(lambda: _check_hosted(clusters, pool))
    # Hosting several: the process's settings name the pool (or the first cluster).
    cluster = pool if pool is not None else clusters[0]
    listen, unix_socket = checked(lambda: statesync_listens(listens))
    dapr_config = checked(lambda: DaprConfig(
        http_port=dapr_http_port, grpc_port=dapr_grpc_port, app_id=dapr_app_id or None,
        key_prefix=dapr_key_prefix, store=dapr_store)) if dapr == "on" else None
    config = checked(lambda: StatesyncConfig(
        cluster=cluster, member=member, app=app_address, etcd=etcd_urls, listen=listen,
        unix_socket=unix_socket, socket_mode=int(socket_mode, 8),
        site=site, weight=weight, etcd_root=etcd_root, session_ttl=session_ttl,
        sync_delay=sync_delay, max_bytes=max_session_bytes, lease_ttl=lease_ttl,
        batch_max_ops=batch_max_ops, max_inflight=max_inflight,
        max_connections=max_connections, etcd_security=etcd_security(),
        etcd_credentials_dir=etcd_credentials_dir,
        token=read_token(token_file, dict(os.environ)),
        istio_workload=istio_workload or None, istio_tls_mode=istio_tls_mode or "",
        dapr=dapr_config))
    if pool is None and len(set(clusters)) == 1:  # one cluster: its own entry, if any
        config = checked(lambda: dataclasses.replace(config, etcd_security=cluster_security(
            etcd_credentials_dir, cluster, config.etcd_security)))
    for name in clusters[1:]:  # each name checked as the process's is
        checked(functools.partial(dataclasses.replace, config, cluster=name))
    traced("statesync", trace_file, {"meshxl.cluster": cluster, "meshxl.member": member},
           lambda: serve_sidecar(config, clusters, pool), loop_factory=checked(loop_factory))


def _check_hosted(clusters: tuple[str, ...], pool: str | None) -> None:
    """What the sidecar serves is given: a cluster or more, a pool or both."""
    import re

    from meshxl.errors import InputError
    from meshxl.model.basics import NAME_PATTERN

    if not clusters and pool is None:
        raise InputError("give --cluster (one or more) or --pool: the clusters this sidecar "
                         "serves")
    if pool is not None and not re.fullmatch(NAME_PATTERN, pool):
        raise InputError(f"invalid pool name {pool[:80]!r}: 1-63 lowercase letters, digits, "
                         "'.', '_' or '-', starting and ending with a letter or digit")


def statesync_listens(values: tuple[str, ...]) -> tuple[str, str | None]:
    """``--listen`` values -> (HOST:PORT, Unix socket path or None): one of each at
    most, HOST:PORT by default."""
    from meshxl.addr import ListenError, unix_path

    tcp = [v for v in values if unix_path(v) is None]
    unix = [p for v in values if (p := unix_path(v)) is not None]
    if len(tcp) > 1 or len(unix) > 1:
        raise ListenError("--listen: give one HOST:PORT and one unix:PATH at most, got "
                          + ", ".join(values))
    return (tcp[0] if tcp else "127.0.0.1:7070"), (unix[0] if unix else None)
