"""The control plane's side of endpoints from meshxl under Istio: the per-resource EDS
service beside ADS, and the endpoints marked for Istio's mutual TLS (``serve xds
--istio-mtls``). The rendering: tests/unit/test_istio_endpoints.py."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format

from meshxl.model import RuntimeState, parse_model
from meshxl.xds.cache import SnapshotCache
from meshxl.xds.compiler import ISTIO_TLS_MATCH, Compiler
from meshxl.xds.server import ADS_SERVICE, EDS_SERVICE, AdsServer
from tests.unit.test_istio import MODELS


def test_istio_mtls_marks_every_endpoint() -> None:
    model = parse_model(MODELS["LS_COOKIE"] + MODELS["HA_ONE_SITE"].replace("clusters:\n", ""))
    marked = Compiler(istio_mtls=True).compile(model, RuntimeState())
    plain = Compiler().compile(model, RuntimeState())
    for name in ("cart", "orders"):
        endpoints = [e for g in marked.endpoints[name].endpoints for e in g.lb_endpoints]
        assert len(endpoints) == len([m for c in model.clusters if c.name == name
                                      for m in c.members])
        for endpoint in endpoints:
            match = endpoint.metadata.filter_metadata[ISTIO_TLS_MATCH]
            assert json_format.MessageToDict(match) == {"tlsMode": "istio"}
        assert all(not e.HasField("metadata") for g in plain.endpoints[name].endpoints
                   for e in g.lb_endpoints)
        # Only the metadata differs.
        for group in marked.endpoints[name].endpoints:
            for endpoint in group.lb_endpoints:
                endpoint.ClearField("metadata")
        assert marked.endpoints[name] == plain.endpoints[name]


def test_the_xds_server_serves_eds_beside_ads() -> None:
    """Envoy's per-resource gRPC config source calls
    ``EndpointDiscoveryService/StreamEndpoints`` (``DeltaEndpoints`` for DELTA_GRPC):
    the ADS handlers, same messages."""
    services: dict[str, set[str]] = {}

    class Server:
        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            for handler in handlers:
                name = handler.service_name()
                services[name] = {m for m in ("StreamAggregatedResources",
                                              "DeltaAggregatedResources",
                                              "StreamEndpoints", "DeltaEndpoints")
                                  if handler.service(_Call(f"/{name}/{m}")) is not None}

    AdsServer(SnapshotCache()).register(Server())  # type: ignore[arg-type]
    assert services == {ADS_SERVICE: {"StreamAggregatedResources", "DeltaAggregatedResources"},
                        EDS_SERVICE: {"StreamEndpoints", "DeltaEndpoints"}}


class _Call(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()
