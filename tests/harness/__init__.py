"""Test harness: pytest glue over :mod:`meshxl.local` for real etcd, Envoy and backend
processes on loopback, always cleaned up.

Processes, ports and waiting come from ``meshxl.local`` (``procs.Owner``,
``ports.free_port``, ``wait.wait_until``); this package adds the test-side views
(etcd members with aetcd clients, Envoy's admin API, the sidecar's HTTP API). Fixtures
built on it live in ``tests/conftest.py``.
"""

from tests.harness.backends import Backend, StartBackends, start_backends
from tests.harness.envoy import EnvoyFixture, Host, StartEnvoy, start_envoy
from tests.harness.etcd import (
    EtcdCluster,
    EtcdNotInstalled,
    EtcdServer,
    find_etcd,
    start_etcd,
    start_etcd_cluster,
)
from tests.harness.load import Outcome, by_session, drive, failures, members_seen

__all__ = [
    "Backend",
    "EnvoyFixture",
    "EtcdCluster",
    "EtcdNotInstalled",
    "EtcdServer",
    "Host",
    "StartBackends",
    "StartEnvoy",
    "Outcome",
    "by_session",
    "drive",
    "failures",
    "find_etcd",
    "members_seen",
    "start_backends",
    "start_envoy",
    "start_etcd",
    "start_etcd_cluster",
]
