"""Istio mode: DestinationRules and EnvoyFilters rendered from the meshxl model (pure),
the labels of member pods (``meshxl istio label``: roles in high availability, serving
in load sharing) and ``check``.

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
