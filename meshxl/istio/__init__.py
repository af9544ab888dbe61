"""Istio mode: DestinationRules and EnvoyFilters rendered from the meshxl model (pure),
the role labels of high-availability members (``meshxl istio label``) and ``check``.

istiod stays the control plane; the statesync sidecar works the same under Istio.
"""

from .labels import DEFAULT_SITE_LABEL, HA_FAILOVER_PRIORITY
from .render import (
    IstioOptions,
    IstioRenderError,
    Rendered,
    render_cluster,
    render_model,
)

__all__ = [
    "DEFAULT_SITE_LABEL", "HA_FAILOVER_PRIORITY", "IstioOptions", "IstioRenderError",
    "Rendered", "render_cluster", "render_model",
]
