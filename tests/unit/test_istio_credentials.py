"""The credentials epoch of ``render --xds-tls``'s EDS sources, which ``meshxl istio
label --credentials-refresh`` moves on so that the sidecars read their renewed Istio
certificates (the real Envoy's side: tests/integration/test_istio_eds.py)."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch

from meshxl.istio import IstioOptions, render_model
from meshxl.istio.credentials import (
    ANNOTATION,
    epoch_of,
    epoch_patch,
)
from meshxl.istio.endpoints import EPOCH_KEY, XdsClientTls
from meshxl.model import parse_model
from tests.unit.test_istio import MODELS, check_crd

HOUR = 3600.0


def rendered_filter(tls: bool = True) -> dict[str, Any]:
    options = IstioOptions(namespace="shop", endpoints="meshxl",
                           xds_address="meshxl-xds.meshxl-system.svc:18000",
                           xds_tls=XdsClientTls() if tls else None)
    (ef,) = [o for o in render_model(parse_model(MODELS["LS_COOKIE"]), options).objects
             if o["kind"] == "EnvoyFilter"]
    return ef


def epoch_in(ef: dict[str, Any]) -> tuple[str | None, list[str]]:
    values = [entry["value"] for p in ef["spec"]["configPatches"]
              for s in p["patch"]["value"].get("eds_cluster_config", {}).get(
                  "eds_config", {}).get("api_config_source", {}).get("grpc_services", [])
              for entry in s.get("initial_metadata", []) if entry["key"] == EPOCH_KEY]
    return ef["metadata"].get("annotations", {}).get(ANNOTATION), values


def test_the_rendered_source_carries_an_epoch_only_with_xds_tls() -> None:
    ef = rendered_filter()
    check_crd(ef)
    assert epoch_in(ef) == ("0", ["0"])
    assert epoch_in(rendered_filter(tls=False)) == (None, [])


def test_the_patch_moves_the_annotation_and_the_sources_together() -> None:
    ef = rendered_filter()
    epoch = epoch_of(1_000_000 * HOUR + 5, 6 * HOUR)
    assert epoch == str(1_000_000 // 6)
    ops = epoch_patch(ef, epoch)
    assert ops[0] == {"op": "test", "path": "/metadata/annotations/meshxl.io~1credentials-epoch",
                      "value": "0"}
    moved = jsonpatch.apply_patch(ef, ops)
    assert epoch_in(moved) == (epoch, [epoch])
    assert epoch_patch(moved, epoch) == []  # already there
    # Another writer moved it in between: the patch's test fails, nothing changes.
    other = copy.deepcopy(ef)
    other["metadata"]["annotations"][ANNOTATION] = "7"
    try:
        jsonpatch.apply_patch(other, ops)
        raise AssertionError("the test operation should have failed")
    except jsonpatch.JsonPatchTestFailed:
        pass
    # An EnvoyFilter without an epoch (not --xds-tls, or not meshxl's) is left alone.
    assert epoch_patch(rendered_filter(tls=False), epoch) == []
    assert epoch_patch({"metadata": {}}, epoch) == []


