"""Test harness: real etcd, Envoy and backend processes on loopback, always cleaned up.

Fixtures built on it live in ``tests/conftest.py``; import helpers from here.
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
from tests.harness.ports import free_port, free_ports
from tests.harness.procs import Harness, HarnessError, ManagedProcess
from tests.harness.waiting import WaitTimeout, wait_for

__all__ = [
    "Backend",
    "EnvoyFixture",
    "EtcdCluster",
    "EtcdNotInstalled",
    "EtcdServer",
    "Harness",
    "HarnessError",
    "Host",
    "ManagedProcess",
    "StartBackends",
    "StartEnvoy",
    "Outcome",
    "WaitTimeout",
    "by_session",
    "drive",
    "failures",
    "find_etcd",
    "free_port",
    "free_ports",
    "members_seen",
    "start_backends",
    "start_envoy",
    "start_etcd",
    "start_etcd_cluster",
    "wait_for",
]
