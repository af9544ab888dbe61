"""The model's warnings, judged against the runtime view the control plane serves.

``meshxl validate`` warns about a Maglev table too small for its members and about
high availability on one site, from the members the model lists. A ``membership:
registered`` cluster lists none: its members are known only from their registrations,
so only the control plane can judge it, each time they change. :class:`ModelWarnings`
does that on every rebuild, recomputing a cluster only when its spec or its
registrations changed, logs each warning once when it appears (and once when it
clears), and keeps the current ones for ``/v1/status`` and the
``meshxl_xds_model_warnings`` gauge. A ``membership: registered`` pool whose members
are live only by their virtual systems' registrations (sidecars older than the pool
liveness key, docs/vsls.md) is warned about the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from meshxl.model import ClusterSpec, ModelSpec, Registration, RuntimeState
from meshxl.model.load import cluster_warnings
from meshxl.model.vsls import unproven_warnings

__all__ = ["ModelWarnings"]

log = logging.getLogger(__name__)


class ModelWarnings:
    """The current warnings per cluster (see the module doc)."""

    def __init__(self) -> None:
        self.current: dict[str, list[str]] = {}
        self._inputs: dict[str, tuple[ClusterSpec, Mapping[str, Registration]]] = {}

    def update(self, model: ModelSpec, runtime: RuntimeState) -> None:
        names = set()
        for index, spec in enumerate(model.clusters):
            names.add(spec.name)
            regs = runtime.registrations_of(spec.name) if spec.registered else {}
            seen = self._inputs.get(spec.name)
            if seen is not None and seen[0] is spec and seen[1] == regs:
                continue
            self._inputs[spec.name] = (spec, dict(regs))
            self._set(spec.name, [str(p) for p in cluster_warnings(index, spec, runtime)])
        unproven = unproven_warnings(model, runtime)
        for pool in model.pools:
            key = f"pool:{pool.name}"
            names.add(key)
            found = unproven.get(pool.name)
            self._set(key, [found] if found is not None else [])
        for gone in set(self.current) - names:
            self._set(gone, [])
            del self.current[gone]
        for gone in set(self._inputs) - names:
            del self._inputs[gone]

    def _set(self, cluster: str, warnings: list[str]) -> None:
        before = self.current.get(cluster, [])
        for warning in warnings:
            if warning not in before:
                log.warning("model warning: %s", warning)
        for warning in before:
            if warning not in warnings:
                log.info("model warning cleared: %s", warning)
        self.current[cluster] = warnings

    def all(self) -> list[str]:
        return [w for cluster in sorted(self.current) for w in self.current[cluster]]
