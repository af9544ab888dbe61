"""Pinned sessions under Istio (pure): Envoy's stateful session filter as the
EnvoyFilter patches it in, exactly as meshxl's own xDS sends it
(``meshxl.xds.resources.pin_config``), and the EDS statuses a pin may target."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meshxl.model import ClusterSpec
from meshxl.model.spec import Pin, PinCarrier, choose
from meshxl.protowire import type_url

from .durations import proto_duration

__all__ = ["PIN_TARGETS", "STATEFUL_SESSION", "pin_of", "pin_per_route"]

STATEFUL_SESSION = "envoy.extensions.filters.http.stateful_session.v3."
#: EDS statuses a pin may target: healthy (istiod sends its ready endpoints so), unknown
#: and degraded (overloaded: keeps its sessions). Not DRAINING, which Istio's own
#: persistent sessions add: a drained or terminating member's sessions move. (meshxl's
#: own xDS targets only unknown and degraded: it lets a sick member's pins go by sending
#: it HEALTHY, meshxl.xds.stepdown; istiod's EDS is not meshxl's to set.)
PIN_TARGETS = ("HEALTHY", "UNKNOWN", "DEGRADED")


def _pin_cookie(pin: Pin) -> tuple[str, dict[str, Any]]:
    assert pin.cookie is not None
    return "envoy.http.stateful_session.cookie", {
        "@type": type_url("envoy.extensions.http.stateful_session.cookie.v3."
                          "CookieBasedSessionState"),
        "cookie": {"name": pin.cookie.name, "path": pin.cookie.path,
                   "ttl": proto_duration(pin.cookie.ttl)}}


def _pin_header(pin: Pin) -> tuple[str, dict[str, Any]]:
    return "envoy.http.stateful_session.header", {
        "@type": type_url("envoy.extensions.http.stateful_session.header.v3."
                          "HeaderBasedSessionState"),
        "name": pin.header}


#: Where a pin travels -> Envoy's session state extension (name, proto JSON config).
_PIN_STATES: dict[PinCarrier, Callable[[Pin], tuple[str, dict[str, Any]]]] = {
    "cookie": _pin_cookie,
    "header": _pin_header,
}


def pin_per_route(pin: Pin) -> dict[str, Any]:
    """The stateful session filter's per-route configuration (meshxl's xDS:
    ``resources.pin_config``)."""
    name, state = choose(_PIN_STATES, pin.carrier, "pin carrier")(pin)
    return {"@type": type_url(f"{STATEFUL_SESSION}StatefulSessionPerRoute"),
            "stateful_session": {"session_state": {"name": name, "typed_config": state},
                                 "strict": pin.strict}}


def pin_of(spec: ClusterSpec) -> Pin | None:
    return spec.stickiness.pin if spec.stickiness is not None else None
