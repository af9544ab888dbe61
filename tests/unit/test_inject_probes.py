"""The injected statesync container's readiness and liveness probes, through the
webhook path: AdmissionReview -> JSON patch -> the pod, validated with the Kubernetes
schemas; and what the two endpoints report."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import yaml

from meshxl.kube import STATESYNC_CONTAINER, InjectConfig
from meshxl.kube.webhook import admission_response
from meshxl.statesync.app import Sidecar

FIXTURES = Path(__file__).parent / "fixtures" / "kube"


def _review(pod: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "operation": "CREATE", "namespace": "shop", "object": pod}}


@pytest.mark.parametrize("proxy", ["envoy", "none"])
def test_webhook_patch_gives_statesync_readiness_and_liveness(proxy: str) -> None:
    pod = yaml.safe_load((FIXTURES / "pod.yaml").read_text())
    config = InjectConfig(image="registry.example.com/meshxl:1.0", proxy=proxy,  # type: ignore[arg-type]
                          xds=("cp.meshxl-system.svc:18000",) if proxy == "envoy" else ())
    response = admission_response(_review(pod), config)["response"]
    assert response["allowed"] is True and response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    injected = jsonpatch.apply_patch(pod, patch)
    for version in ("1.29", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(injected, version, strict=True)
    sidecar = next(c for c in injected["spec"]["initContainers"]
                   if c["name"] == STATESYNC_CONTAINER)
    assert sidecar["restartPolicy"] == "Always"  # native sidecar: its readiness counts
    listen = sidecar["args"][sidecar["args"].index("--listen") + 1]
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        command = sidecar[probe]["exec"]["command"]
        assert command[:2] == ["python3", "-c"]
        assert f"http://{listen}{path}" in command[2]
        assert sidecar[probe]["timeoutSeconds"] >= 2
    assert sidecar["livenessProbe"]["periodSeconds"] * \
        sidecar["livenessProbe"]["failureThreshold"] >= 30, "no restart on a short stall"


def test_liveness_fails_when_a_background_loop_ended() -> None:
    async def scenario() -> list[str]:
        async def loop_forever() -> None:
            await asyncio.Event().wait()

        async def crashes() -> None:
            raise RuntimeError("watch bug")

        tasks = [asyncio.create_task(loop_forever()), asyncio.create_task(crashes())]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        fake = SimpleNamespace(_tasks=tasks)
        healthy = Sidecar.liveness_problems(fake)  # type: ignore[arg-type]
        tasks[0].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return healthy

    problems = asyncio.run(scenario())
    assert len(problems) == 1
    assert "crashes stopped: RuntimeError('watch bug')" in problems[0]
