"""Envoy's request tracing, as the model asks for it (pure: model -> protos).

Envoy's OpenTelemetry tracer, sampling parent-based as OpenTelemetry SDKs do by default,
with a trace-id ratio for its own traces (the SDKs' ``parentbased_traceidratio``): a
request whose W3C ``traceparent`` carries the caller's decision keeps it, sampled or
not, so a trace a client started stays whole through Envoy, the app and its sidecar;
of the traces Envoy starts itself (no ``traceparent``)
it records ``sampling_percent``, chosen by the trace id.

The connection manager's own ``random_sampling`` stays at 100 %: below that Envoy
drops a sampled caller's trace too (it sends the member ``traceparent`` with the
sampled flag off), and the sampler alone decides.
"""

from __future__ import annotations

from envoy.config.trace.v3 import opentelemetry_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.tracers.opentelemetry.samplers.v3 import (
    parent_based_sampler_pb2,
    trace_id_ratio_based_sampler_pb2,
)
from envoy.type.v3 import percent_pb2

from meshxl.model import Telemetry

__all__ = ["PARENT_BASED", "RATIO", "sampler", "trace"]

PARENT_BASED = "envoy.tracers.opentelemetry.samplers.parent_based"
RATIO = "envoy.tracers.opentelemetry.samplers.trace_id_ratio_based"
_PER_MILLION = 10_000
"""A percent in millionths: ``sampling_percent`` need not be whole."""


def sampler(percent: float) -> parent_based_sampler_pb2.ParentBasedSamplerConfig:
    """The caller's decision when there is one; else ``percent`` of the trace ids."""
    ratio = trace_id_ratio_based_sampler_pb2.TraceIdRatioBasedSamplerConfig()
    ratio.sampling_percentage.numerator = round(percent * _PER_MILLION)
    ratio.sampling_percentage.denominator = percent_pb2.FractionalPercent.MILLION
    config = parent_based_sampler_pb2.ParentBasedSamplerConfig()
    config.wrapped_sampler.name = RATIO
    config.wrapped_sampler.typed_config.Pack(ratio)
    return config


def trace(hcm: hcm_pb2.HttpConnectionManager, telemetry: Telemetry) -> None:
    """Trace ``hcm``'s requests to the collector cluster, a span per request and one per
    upstream attempt (a failed attempt and its retry both show in the trace)."""
    otel = opentelemetry_pb2.OpenTelemetryConfig(service_name=telemetry.service_name)
    otel.grpc_service.envoy_grpc.cluster_name = telemetry.collector_cluster
    otel.sampler.name = PARENT_BASED
    otel.sampler.typed_config.Pack(sampler(telemetry.sampling_percent))
    hcm.tracing.provider.name = "envoy.tracers.opentelemetry"
    hcm.tracing.provider.typed_config.Pack(otel)
    hcm.tracing.random_sampling.value = 100.0
    hcm.tracing.spawn_upstream_span.value = True
