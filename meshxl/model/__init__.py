"""The cluster model: pure data, loading and validation, and the runtime view.

Nothing here does I/O beyond reading a file on request, and nothing imports the
rest of meshxl. The model is declared once (:mod:`.spec`, :mod:`.traffic`,
:mod:`.document`: msgspec Structs), read by :mod:`.decode`, and read the same way by the
control plane, the statesync sidecar, the CLI and the injector. The package's names are
loaded on first use: the runtime view imports no part of the declaration.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .document import ModelSpec, Pool, Telemetry, VirtualSystem
    from .load import ModelError, Problem, check_model, load_model, model_warnings, parse_model
    from .records import AdminAction, IstioEndpoint, Registration
    from .runtime import ClusterView, MemberState, MemberView, Role, RuntimeState, cluster_view
    from .spec import (
        DEFAULT_SITE,
        ClusterSpec,
        Cookie,
        Failover,
        HealthCheck,
        Listener,
        Member,
        OutlierDetection,
        Overrides,
        Pin,
        Retries,
        Route,
        SessionSync,
        Site,
        Stickiness,
        check_member_address,
        is_ip_literal,
    )

_HOMES = {
    "basics": ("DEFAULT_SITE", "ModelError", "Problem", "check_member_address",
               "is_ip_literal"),
    "load": ("check_model", "load_model", "model_warnings", "parse_model"),
    "records": ("AdminAction", "IstioEndpoint", "Registration"),
    "runtime": ("ClusterView", "MemberState", "MemberView", "Role", "RuntimeState", "cluster_view"),
    "spec": ("ClusterSpec", "Cookie", "Failover", "HealthCheck", "Listener", "Member",
             "OutlierDetection", "Overrides", "Pin", "Retries", "Route",
             "SessionSync", "Site", "Stickiness"),
    "document": ("ModelSpec", "Pool", "Telemetry", "VirtualSystem"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "DEFAULT_SITE", "AdminAction", "ClusterSpec", "ClusterView", "Cookie", "Failover",
    "HealthCheck", "IstioEndpoint",
    "Listener", "Member", "MemberState", "MemberView", "ModelError", "ModelSpec", "Pool",
    "OutlierDetection", "Overrides", "Pin", "Problem", "Registration", "Retries", "Role", "Route",
    "RuntimeState", "SessionSync", "Site", "Stickiness", "Telemetry", "VirtualSystem",
    "check_member_address",
    "check_model", "is_ip_literal",
    "cluster_view", "load_model", "model_warnings", "parse_model",
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
