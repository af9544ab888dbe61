"""What ``meshxl status``, ``meshxl sync`` and ``meshxl verify`` report, read from etcd
(and, for verify, from Envoy admin APIs), one module per view over one read
(:mod:`~meshxl.operator.views.read`).

Every report is a JSON-able ``dict``; :mod:`meshxl.operator.tables` renders them.
"""

from meshxl.operator.views.failovers import failover_report
from meshxl.operator.views.read import MeshRead, model_warnings, read_mesh
from meshxl.operator.views.status import DEPARTED_SECONDS, live_report, status_report
from meshxl.operator.views.sync import sync_report
from meshxl.operator.views.verify import (
    EnvoyLive,
    expected_endpoints,
    expected_versions,
    fetch_envoy,
    verify,
    verify_report,
)
from meshxl.operator.views.vsls import vs_report

__all__ = [
    "DEPARTED_SECONDS", "EnvoyLive", "MeshRead", "expected_endpoints", "expected_versions",
    "failover_report", "fetch_envoy", "live_report", "model_warnings", "read_mesh",
    "status_report", "sync_report", "verify", "verify_report", "vs_report",
]
