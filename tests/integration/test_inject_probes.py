"""The injected probe commands, run as the kubelet runs them, against a real
statesync sidecar: ready only when registered, caught up and without problems."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from meshxl.kube import STATESYNC_CONTAINER, InjectConfig, mutate_pod
from meshxl.local.procs import run
from meshxl.local.wait import wait_until

FIXTURES = Path(__file__).resolve().parents[1] / "unit" / "fixtures" / "kube"


async def _exit_code(command: list[str]) -> int:
    code, _, _ = await run(command, timeout=20)
    return code


async def test_probe_commands_against_a_real_sidecar(etcd: Any, start_backends: Any,
                                                     start_sidecar: Any) -> None:
    (backend,) = await start_backends(["orders-0"])
    sidecar = await start_sidecar(cluster="orders", member="orders-0", etcd=etcd.url,
                                  app_port=backend.port)
    pod = yaml.safe_load((FIXTURES / "pod.yaml").read_text())
    injected = mutate_pod(pod, InjectConfig(image="meshxl:test", proxy="none", xds=()))
    container = next(c for c in injected["spec"]["initContainers"]
                     if c["name"] == STATESYNC_CONTAINER)
    listen = container["args"][container["args"].index("--listen") + 1]

    def command(probe: str) -> list[str]:
        cmd = list(container[probe]["exec"]["command"])
        cmd[2] = cmd[2].replace(listen, sidecar.url.removeprefix("http://"))
        return cmd

    assert await _exit_code(command("readinessProbe")) == 0
    assert await _exit_code(command("livenessProbe")) == 0
    await sidecar.set_problem("disk-full", "test")

    async def not_ready() -> bool:
        return await _exit_code(command("readinessProbe")) != 0
    await wait_until(not_ready, timeout=20, what="readiness probe fails with a problem")
    assert await _exit_code(command("livenessProbe")) == 0, "a problem is not a restart"
    await sidecar.clear_problem("disk-full")

    async def ready() -> bool:
        return await _exit_code(command("readinessProbe")) == 0
    await wait_until(ready, timeout=20, what="readiness probe passes again")
