"""Durations as Istio's objects spell them (pure): a DestinationRule's Go durations and
an EnvoyFilter patch's proto JSON."""

from __future__ import annotations

__all__ = ["duration", "proto_duration"]


def duration(seconds: float) -> str:
    """A duration Istio (Go's time.ParseDuration and the CRD's CEL rules) accepts."""
    ms = round(seconds * 1000)
    if seconds > 0 and ms == 0:
        ms = 1  # Istio's CRD rejects durations under 1 ms
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    return f"{ms}ms"


def proto_duration(seconds: float) -> str:
    """A ``google.protobuf.Duration`` in proto JSON form (EnvoyFilter patch values are
    parsed as Envoy protos, and proto JSON accepts only decimal seconds)."""
    text = f"{seconds:.9f}".rstrip("0").rstrip(".")
    return f"{text or '0'}s"
