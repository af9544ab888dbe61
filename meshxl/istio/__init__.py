"""Istio mode: DestinationRules and EnvoyFilters rendered from the meshxl model (pure).

istiod stays the control plane; the statesync sidecar works the same under Istio.
"""

from .render import (
    DEFAULT_MEMBER_LABEL,
    DEFAULT_SITE_LABEL,
    IstioOptions,
    IstioRenderError,
    Rendered,
    render_cluster,
    render_model,
)

__all__ = [
    "DEFAULT_MEMBER_LABEL", "DEFAULT_SITE_LABEL", "IstioOptions", "IstioRenderError",
    "Rendered", "render_cluster", "render_model",
]
