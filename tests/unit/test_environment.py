"""The installed packages fit together (what set-up must guarantee on a fresh machine)."""

from __future__ import annotations


def test_opentelemetry_protos_are_not_shadowed_by_xds_protos() -> None:
    """xds-protos carries an older copy of opentelemetry/proto at the same paths; the OTLP
    receiver and exporters need opentelemetry-proto's own (scripts/setup.sh reinstalls it)."""
    from opentelemetry.proto.common.v1 import common_pb2

    assert hasattr(common_pb2, "InstrumentationScope"), (
        "opentelemetry/proto comes from xds-protos: run "
        "`pip install --force-reinstall --no-deps opentelemetry-proto`")


def test_envoy_protos_import_with_the_newer_opentelemetry_protos() -> None:
    from envoy.config.trace.v3 import opentelemetry_pb2
    from envoy.extensions.access_loggers.open_telemetry.v3 import logs_service_pb2

    assert opentelemetry_pb2.OpenTelemetryConfig.DESCRIPTOR.full_name
    assert logs_service_pb2.OpenTelemetryAccessLogConfig.DESCRIPTOR.fields_by_name["body"]
