"""Everything meshxl knows about etcd: connecting to it, and what it keeps there.

* :mod:`~meshxl.etcd.connect`: endpoints, TLS and credential settings and
  :func:`client`, the one way to get a client (re-exported here:
  ``from meshxl import etcd; etcd.client(urls)``);
* :mod:`~meshxl.etcd.balancer` (the health of several members and the choice of one
  per request), :mod:`~meshxl.etcd.balanced` (the aetcd client over them),
  :mod:`~meshxl.etcd.watch` (watches that follow a member's health),
  :mod:`~meshxl.etcd.auth` (TLS and token authentication, which aetcd lacks);
* :mod:`~meshxl.etcd.keys`: the key layout, the one place that knows it;
* :mod:`~meshxl.etcd.mesh`: the mesh in etcd (model and runtime state) mirrored by a
  watch, read by the control plane, the sidecars and the operator views.

The client's names are loaded on first use: importing :mod:`meshxl.etcd.keys` (the
``meshxl`` command does, for every command) must not import gRPC, whose logging
settings a command decides before gRPC starts (``meshxl.cli.main``).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshxl.etcd.auth import EtcdAuthError
    from meshxl.etcd.balanced import BalancedClient
    from meshxl.etcd.balancer import (
        ATTEMPT_TIMEOUT,
        DOWN,
        LAGGING,
        NO_LEADER,
        PROBE_INTERVAL,
        PROBE_INTERVAL_TROUBLE,
        PROBE_TIMEOUT,
        SLOW_ATTEMPT,
        TROUBLE_HOLD,
        UNKNOWN,
        UP,
        Balancer,
        Endpoint,
        EtcdUnavailable,
        MemberChanged,
        balancer_of,
        keepalive,
        retryable,
    )
    from meshxl.etcd.connect import (
        EtcdEndpointError,
        EtcdSecurity,
        EtcdSecurityError,
        check_credentials,
        check_settings,
        client,
        credentials_refused,
        describe_error,
        parse_urls,
        read_secret_file,
    )
    from meshxl.etcd.watch import cancel_watch, watch_responses

_HOMES = {
    "auth": ("EtcdAuthError",),
    "balanced": ("BalancedClient",),
    "balancer": ("ATTEMPT_TIMEOUT", "DOWN", "LAGGING", "NO_LEADER", "PROBE_INTERVAL",
                 "PROBE_INTERVAL_TROUBLE", "PROBE_TIMEOUT", "SLOW_ATTEMPT", "TROUBLE_HOLD",
                 "UNKNOWN", "UP", "Balancer", "Endpoint", "EtcdUnavailable", "MemberChanged",
                 "balancer_of", "keepalive", "retryable"),
    "connect": ("EtcdEndpointError", "EtcdSecurity", "EtcdSecurityError", "check_credentials",
                "check_settings", "client", "credentials_refused", "describe_error",
                "parse_urls", "read_secret_file"),
    "watch": ("cancel_watch", "watch_responses"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "ATTEMPT_TIMEOUT", "DOWN", "LAGGING", "NO_LEADER", "PROBE_INTERVAL", "PROBE_INTERVAL_TROUBLE",
    "PROBE_TIMEOUT", "SLOW_ATTEMPT", "TROUBLE_HOLD", "UNKNOWN", "UP", "BalancedClient",
    "Balancer", "Endpoint", "EtcdAuthError", "EtcdEndpointError", "EtcdSecurity",
    "EtcdSecurityError", "EtcdUnavailable", "MemberChanged", "balancer_of", "check_credentials",
    "cancel_watch", "check_settings", "client", "credentials_refused", "describe_error",
    "keepalive", "parse_urls", "read_secret_file", "retryable", "watch_responses",
]


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})
