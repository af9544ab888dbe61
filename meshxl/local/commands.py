"""One command-line builder per server meshxl runs locally.

etcd, ``meshxl serve xds``, ``meshxl serve statesync``, Envoy, the echo backend and the
demo's counter app: the demo, the benchmarks and the tests start them from here, so a
flag that matters (etcd's ``--pre-vote``, Envoy's base-id handling) is set in one place.
Pure functions: they build argv lists and start nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshxl.binaries import find_envoy, find_etcd

__all__ = [
    "APP_MODULES",
    "EtcdTls",
    "PYTHON",
    "app",
    "echo",
    "envoy",
    "etcd",
    "options",
    "statesync",
    "xds",
]

#: How Python children are started: unbuffered, so their logs are current.
PYTHON: tuple[str, ...] = (sys.executable, "-u")


def options(**values: Any) -> list[str]:
    """``--flag value`` pairs from keyword arguments (``snake_case`` -> ``--snake-case``):
    True is a bare flag, False and None are left out, a list repeats the flag."""
    out: list[str] = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            out.append(flag)
        elif isinstance(value, list | tuple):  # a repeatable option
            for each in value:
                out += [flag, str(each)]
        elif value is not False and value is not None:
            out += [flag, str(value)]
    return out


@dataclass(frozen=True)
class EtcdTls:
    """Client TLS of an etcd member: its server certificate, and the CA whose client
    certificates it requires (``--client-cert-auth``)."""

    ca: Path
    cert: Path
    key: Path


def etcd(
    *,
    name: str,
    data_dir: Path,
    client_url: str,
    peer_url: str,
    initial_cluster: str | None = None,
    token: str | None = None,
    state: str = "new",
    tls: EtcdTls | None = None,
    binary: str | None = None,
    heartbeat_ms: int = 50,
    election_ms: int = 500,
    extra: Sequence[str] = (),
) -> list[str]:
    """One etcd member listening on ``client_url`` (http or https) and ``peer_url``.

    ``initial_cluster`` defaults to this member alone; ``state`` "existing" joins a
    running cluster. Raft timings are short by default (heartbeat 50 ms, election
    500 ms) so a member is healthy in well under a second and a cluster re-elects
    quickly; across a WAN, etcd's tuning guide wants a heartbeat about the round trip
    and an election timeout of at least ten heartbeats.
    """
    argv = [
        binary or find_etcd(),
        "--name", name,
        "--data-dir", str(data_dir),
        "--listen-client-urls", client_url,
        "--advertise-client-urls", client_url,
        "--listen-peer-urls", peer_url,
        "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", initial_cluster or f"{name}={peer_url}",
        "--initial-cluster-state", state,
        "--heartbeat-interval", str(heartbeat_ms),
        "--election-timeout", str(election_ms),
        # etcd 3.4 runs without pre-vote: a member rejoining after a partition would
        # depose a healthy leader (3.5 has it on).
        "--pre-vote",
        "--logger", "zap",
        "--log-outputs", "stderr",
    ]  # fmt: skip
    if token is not None:
        argv += ["--initial-cluster-token", token]
    if tls is not None:
        argv += ["--client-cert-auth", "--trusted-ca-file", str(tls.ca),
                 "--cert-file", str(tls.cert), "--key-file", str(tls.key)]
    return argv + list(extra)


def xds(
    *,
    listen: str,
    admin: str | None = None,
    etcd: str | None = None,
    etcd_prefix: str | None = None,
    config: Path | str | None = None,
    replica: str | None = None,
    log_level: str | None = None,
    trace_file: Path | None = None,
    python: Sequence[str] = PYTHON,
    extra: Sequence[str] = (),
) -> list[str]:
    """``meshxl serve xds``: the control plane."""
    return [*python, "-m", "meshxl.cli", "serve", "xds", *options(
        listen=listen, admin=admin, etcd=etcd, etcd_prefix=etcd_prefix, config=config,
        replica=replica, log_level=log_level, trace_file=trace_file), *extra]


def statesync(
    *,
    cluster: str | list[str] | None,
    member: str,
    app: str,
    listen: str,
    etcd: str,
    python: Sequence[str] = PYTHON,
    **more: Any,
) -> list[str]:
    """``meshxl serve statesync``: one member's sidecar. ``more``: any further option of
    the command by its keyword name (``site=``, ``etcd_prefix=``, ``lease_ttl=``,
    ``log_level=``, ``trace_file=``, ``batch_max_ops=``...)."""
    if isinstance(more.get("lease_ttl"), float):
        more["lease_ttl"] = f"{more['lease_ttl']:g}"
    return [*python, "-m", "meshxl.cli", "serve", "statesync", *options(
        cluster=cluster, member=member, app=app, listen=listen, etcd=etcd, **more)]


def envoy(
    config: Path,
    *,
    binary: str | None = None,
    log_level: str = "info",
    component_log_level: str | None = None,
    concurrency: int = 1,
    base_id_path: Path | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """Envoy on bootstrap ``config``. ``base_id_path``: hot restart with a dynamic base id
    written there (several Envoys side by side); None disables hot restart."""
    argv = [
        binary or find_envoy(),
        "-c", str(config),
        "--log-level", log_level,
        "--concurrency", str(concurrency),
        "--drain-time-s", "1",
        "--parent-shutdown-time-s", "2",
    ]  # fmt: skip
    if component_log_level:
        argv += ["--component-log-level", component_log_level]
    if base_id_path is not None:
        argv += ["--use-dynamic-base-id", "--base-id-path", str(base_id_path)]
    else:
        argv += ["--disable-hot-restart"]
    return argv + list(extra)


def echo(name: str, listen: str, *, python: Sequence[str] = PYTHON) -> list[str]:
    """The sample backend (``meshxl.demo.echo``) answering with its member name."""
    return [*python, "-m", "meshxl.demo.echo", "--name", name, "--listen", listen]


#: The demo counter's member per protocol (WebSockets are the HTTP app's ``/counter/ws``).
APP_MODULES = {"http": "meshxl.demo.app", "websocket": "meshxl.demo.app",
               "grpc": "meshxl.demo.grpc_app", "tcp": "meshxl.demo.tcp_app"}


def app(name: str, *, cluster: str | None, listen: str, sidecar: str,
        trace_file: Path | None = None, python: Sequence[str] = PYTHON,
        protocol: str = "http", faults: Path | None = None,
        clusters_by_host: bool = False) -> list[str]:
    """The demo's counter app beside its statesync sidecar: ``meshxl.demo.app`` (HTTP and
    WebSocket), ``meshxl.demo.grpc_app`` or ``meshxl.demo.tcp_app``. ``faults``: the
    HTTP app's injected-faults file (:mod:`meshxl.demo.faults`); ``clusters_by_host``:
    the HTTP app beside a sidecar serving a pool's virtual systems."""
    module = APP_MODULES[protocol]
    if module != "meshxl.demo.app":
        trace_file = None  # only the HTTP app traces (Envoy traces every protocol's requests)
        if faults is not None:
            raise ValueError("only the HTTP sample app takes --faults")
    return [*python, "-m", module, *options(
        name=name, cluster=cluster, listen=listen, sidecar=sidecar, trace_file=trace_file,
        faults=faults, clusters_by_host=clusters_by_host)]
