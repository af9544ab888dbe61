"""The cluster model: pure data, loading and validation, and the runtime view.

Nothing here does I/O beyond reading a file on request, and nothing imports the
rest of meshxl.
"""

from .load import ModelError, Problem, check_model, load_model, model_warnings, parse_model
from .runtime import (
    AdminAction,
    ClusterView,
    MemberState,
    MemberView,
    Registration,
    Role,
    RuntimeState,
    cluster_view,
)
from .spec import (
    DEFAULT_SITE,
    ClusterSpec,
    Cookie,
    Failover,
    HealthCheck,
    Listener,
    Member,
    ModelSpec,
    OutlierDetection,
    Overrides,
    Pin,
    Retries,
    Route,
    SessionSync,
    Site,
    Stickiness,
    Telemetry,
    check_member_address,
    is_ip_literal,
)

__all__ = [
    "DEFAULT_SITE", "AdminAction", "ClusterSpec", "ClusterView", "Cookie", "Failover",
    "HealthCheck",
    "Listener", "Member", "MemberState", "MemberView", "ModelError", "ModelSpec",
    "OutlierDetection", "Overrides", "Pin", "Problem", "Registration", "Retries", "Role", "Route",
    "RuntimeState", "SessionSync", "Site", "Stickiness", "Telemetry", "check_member_address",
    "check_model", "is_ip_literal",
    "cluster_view", "load_model", "model_warnings", "parse_model",
]
