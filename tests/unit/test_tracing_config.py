"""Envoy's request tracing compiled from the model (pure)."""

from __future__ import annotations

import pytest
from envoy.config.trace.v3 import opentelemetry_pb2
from envoy.extensions.tracers.opentelemetry.samplers.v3 import (
    parent_based_sampler_pb2,
    trace_id_ratio_based_sampler_pb2,
)
from envoy.type.v3 import percent_pb2

from meshxl.model import Telemetry
from meshxl.xds.resources import build_listener
from meshxl.xds.tracingconfig import PARENT_BASED, RATIO


def _tracing(listener):  # type: ignore[no-untyped-def]
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )

    hcm = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    return hcm


def test_no_tracing_unless_the_model_asks() -> None:
    assert not _tracing(build_listener("l", "127.0.0.1", 80, Telemetry())).HasField("tracing")


@pytest.mark.parametrize(("percent", "per_million"), [(1.0, 10_000), (0.5, 5_000),
                                                       (0.0, 0), (100.0, 1_000_000)])
def test_the_sampler_keeps_a_callers_decision_and_samples_envoys_roots(
        percent: float, per_million: int) -> None:
    telemetry = Telemetry(tracing=True, sampling_percent=percent, service_name="edge")
    tracing = _tracing(build_listener("l", "127.0.0.1", 80, telemetry)).tracing
    # Below 100 % Envoy would drop a sampled caller's trace before the sampler decides.
    assert tracing.random_sampling.value == 100.0
    assert tracing.spawn_upstream_span.value
    otel = opentelemetry_pb2.OpenTelemetryConfig()
    tracing.provider.typed_config.Unpack(otel)
    assert (otel.service_name, otel.grpc_service.envoy_grpc.cluster_name) == ("edge",
                                                                              "meshxl_otlp")
    assert otel.sampler.name == PARENT_BASED
    parent = parent_based_sampler_pb2.ParentBasedSamplerConfig()
    otel.sampler.typed_config.Unpack(parent)
    assert parent.wrapped_sampler.name == RATIO
    ratio = trace_id_ratio_based_sampler_pb2.TraceIdRatioBasedSamplerConfig()
    parent.wrapped_sampler.typed_config.Unpack(ratio)
    assert ratio.sampling_percentage.numerator == per_million
    assert ratio.sampling_percentage.denominator == percent_pb2.FractionalPercent.MILLION


def test_envoy_samples_one_percent_of_its_own_traces_by_default() -> None:
    assert Telemetry(tracing=True).sampling_percent == 1.0
