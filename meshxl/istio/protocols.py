"""What Istio needs per protocol (pure): the Service port that says it, and the parts of
the EnvoyFilter that depend on it.

Istio decides a port's protocol from the Service, not from meshxl: the port's
``appProtocol``, else its name (``grpc``, ``grpc-web``, ``http``, ``http2``, ``tcp``...,
alone or before a ``-``), else it sniffs the first bytes of each connection. From it
come the upstream protocol (HTTP/2 for ``grpc`` and ``http2``), whether HTTP routes
exist at all (not for ``tcp``) and so whether a header hash, retries or a route patch
can apply. So a gRPC cluster's Service port must say ``grpc`` (``grpc-orders``, or
``appProtocol: grpc``), a TCP cluster's ``tcp``: ``meshxl istio render`` warns and
``meshxl istio check`` reports a port that says otherwise (an error) or nothing (a
warning: sniffing works for HTTP, not for server-first TCP protocols, and detects gRPC
only as HTTP/2).

In the EnvoyFilter: a gRPC cluster's routes let the call's deadline bound it (no route
timeout, ``grpc-timeout`` honoured) and its members are checked with grpc.health.v1; a
TCP cluster is checked by connecting and has no route patch (its listener is Istio's TCP
proxy, which ``consistentHash.useSourceIp`` hashes); a cluster that refuses WebSockets
turns the upgrade off on its routes (Istio allows it on every HTTP route). Clusters
with long-lived connections close them when Envoy finds their member dead, as meshxl's
own xDS does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from meshxl.model import ClusterSpec
from meshxl.model.spec import Protocol, choose

from .durations import proto_duration

__all__ = ["ISTIO_PORT_PROTOCOLS", "declared_protocol", "health_check_patch",
           "port_problem", "protocol_warnings", "route_protocol_patch", "service_port"]

#: Istio's port protocols (name prefix or appProtocol), lower case.
ISTIO_PORT_PROTOCOLS = ("http", "http2", "https", "grpc", "grpc-web", "tcp", "tls", "mongo",
                        "mysql", "redis", "udp", "h2c")
#: What each meshxl protocol may be declared as.
_ACCEPTS: dict[Protocol, tuple[str, ...]] = {
    "http": ("http", "http2", "h2c"),
    "http2": ("http2", "h2c", "grpc", "grpc-web"),
    "grpc": ("grpc", "http2", "h2c"),
    "tcp": ("tcp",),
}
#: How to say it: the port name prefix and appProtocol Istio reads.
_SAY: dict[Protocol, str] = {"http": "http", "http2": "http2", "grpc": "grpc", "tcp": "tcp"}


def declared_protocol(port: Mapping[str, Any]) -> str | None:
    """The protocol a Service port declares to Istio (appProtocol, else the name's
    prefix), lower case; None when it declares none (Istio sniffs)."""
    app = port.get("appProtocol")
    if isinstance(app, str) and app.strip():
        value = app.strip().lower()
        return value.rsplit("/", 1)[-1] if value.startswith("kubernetes.io/") else value
    name = port.get("name")
    if isinstance(name, str) and name:
        lowered = name.lower()
        for protocol in sorted(ISTIO_PORT_PROTOCOLS, key=len, reverse=True):
            if lowered == protocol or lowered.startswith(f"{protocol}-"):
                return protocol
    return None


def port_problem(spec: ClusterSpec, port: Mapping[str, Any],
                 ) -> tuple[Literal["error", "warning"], str] | None:
    """What is wrong with the Service port for the cluster's protocol, if anything."""
    declared = declared_protocol(port)
    accepted = choose(_ACCEPTS, spec.protocol, "protocol")
    say = _SAY[spec.protocol]
    where = f"Service port {port.get('name') or port.get('port')}"
    if declared is None:
        if spec.protocol == "http":
            return None  # Istio's sniffing finds HTTP/1.1
        return "warning", (f"{where} declares no protocol and the cluster speaks "
                           f"{spec.protocol}: Istio sniffs it ({_SNIFFED[spec.protocol]}); "
                           f"name the port {say}-... or set appProtocol: {say}")
    if declared in accepted:
        return None
    return "error", (f"{where} declares {declared} and the cluster speaks {spec.protocol}: "
                     f"{_WRONG[spec.protocol]}; name the port {say}-... or set appProtocol: "
                     f"{say}")


_SNIFFED = {
    "http": "as HTTP",
    "http2": "as HTTP, then speaks to the members in the client's protocol",
    "grpc": "as HTTP/2, without gRPC's status codes in its telemetry",
    "tcp": "waiting for client bytes first: a server-first protocol stalls",
}
_WRONG = {
    "http": "Istio would not route it as HTTP (no header hash, retries or route patches)",
    "http2": "Istio would not speak HTTP/2 to the members",
    "grpc": "Istio would not speak HTTP/2 to the members, and a gRPC server answers "
            "nothing useful over HTTP/1.1",
    "tcp": "Istio would parse its bytes as that protocol instead of forwarding them",
}


def health_check_patch(spec: ClusterSpec) -> dict[str, Any]:
    """The health check's kind in proto JSON (``http_health_check``, ...)."""
    hc = spec.health_check
    if hc.type == "grpc":
        return {"grpc_health_check": {"service_name": hc.grpc_service}}
    if hc.type == "tcp":
        return {"tcp_health_check": {}}
    http: dict[str, Any] = {"path": hc.path, "expected_statuses": [
        {"start": s, "end": s + 1} for s in sorted(set(hc.expected_statuses))]}
    if spec.protocol in ("http2", "grpc"):
        http["codec_client_type"] = "HTTP2"
    return {"http_health_check": http}


def route_protocol_patch(spec: ClusterSpec) -> dict[str, Any]:
    """What the protocol adds to the route action patch."""
    out: dict[str, Any] = {}
    if spec.protocol == "grpc":
        out["timeout"] = proto_duration(spec.route.timeout)
        out["max_stream_duration"] = {"grpc_timeout_header_max": "0s"}
    if not spec.websocket_upgrades:
        out["upgrade_configs"] = [{"upgrade_type": "websocket", "enabled": False}]
    return out


def protocol_warnings(spec: ClusterSpec, service: Mapping[str, Any] | None,
                      port: int) -> list[str]:
    """What the Service port must declare for the cluster's protocol
    (module docstring)."""
    if service is None:
        if spec.protocol == "http":
            return []
        return [f"cluster {spec.name}: speaks {spec.protocol}: its Service port must say so "
                f"to Istio (name it {spec.protocol}-... or set appProtocol: "
                f"{spec.protocol})"]
    entry = service_port(service, port)
    found = port_problem(spec, entry) if entry is not None else None
    return [f"cluster {spec.name}: {found[1]}"] if found is not None else []


def service_port(service: Mapping[str, Any], port: int) -> Mapping[str, Any] | None:
    """The Service's port entry with number ``port``."""
    spec = service.get("spec")
    ports = spec.get("ports") if isinstance(spec, Mapping) else None
    for entry in ports if isinstance(ports, list) else []:
        if isinstance(entry, Mapping) and entry.get("port") == port:
            return entry
    return None

