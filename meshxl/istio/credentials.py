"""Fresh certificates for the Istio sidecars' EDS streams (``render --xds-tls``).

Envoy's Google gRPC client reads the ``ssl_credentials`` files (istio-agent's
``OUTPUT_CERTS``) when it builds the cluster, and a reconnect presents what it read
then: a cluster istiod leaves unchanged past the workload certificate's lifetime (24 h
by default, renewed at about half of it) would reconnect with an expired certificate,
which meshxl's server refuses. So the rendered EDS source carries a credentials epoch
in its gRPC ``initial_metadata`` (:data:`~.endpoints.EPOCH_KEY`), and ``meshxl istio
label`` moves it forward every ``--credentials-refresh`` hours (the istio-endpoints
overlay: 6) on meshxl's EnvoyFilters. Each change is a new version of the cluster:
Envoy builds it anew (it warms from meshxl again before it replaces the old one) and
reads the files then.

The epoch is the wall clock divided by the period, so every labeler replica writes the
same value, and a JSON patch that tests the annotation first lets only one of them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .endpoints import EPOCH_KEY, eds_sources

__all__ = ["ANNOTATION", "DEFAULT_REFRESH", "CredentialsRefresher", "epoch_of", "epoch_patch"]

log = logging.getLogger(__name__)

ANNOTATION = "meshxl.io/credentials-epoch"
DEFAULT_REFRESH = 6 * 3600.0
"""Seconds between epochs: a certificate in use is then at most this plus its renewal
age (12 h of Istio's default 24 h) old."""


def epoch_of(now: float, period: float) -> str:
    """The epoch at wall-clock time ``now`` (seconds) for a refresh every ``period``."""
    return str(math.floor(now / period))


def epoch_patch(envoy_filter: Mapping[str, Any], epoch: str) -> list[dict[str, Any]]:
    """A JSON patch (RFC 6902) that moves ``envoy_filter`` to ``epoch``: a test of its
    annotation (another writer in between fails it), then the annotation and every
    EDS source's epoch entry. Empty when it is already there or carries no epoch."""
    meta = envoy_filter.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    current = annotations.get(ANNOTATION)
    if current is None or current == epoch:
        return []
    ops: list[dict[str, Any]] = [
        {"op": "test", "path": "/metadata/annotations/" + _escape(ANNOTATION),
         "value": current},
        {"op": "replace", "path": "/metadata/annotations/" + _escape(ANNOTATION),
         "value": epoch}]
    for path, service in eds_sources(envoy_filter):
        entries = service.get("initial_metadata")
        for k, entry in enumerate(entries if isinstance(entries, list) else []):
            if isinstance(entry, Mapping) and entry.get("key") == EPOCH_KEY:
                ops.append({"op": "replace", "path": f"{path}/initial_metadata/{k}/value",
                            "value": epoch})
    return ops


def _escape(key: str) -> str:
    """A JSON pointer's reference token (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")


@dataclass
class CredentialsRefresher:
    """Moves meshxl's EnvoyFilters in ``namespace`` (every one: None) to the epoch of
    the wall clock, checking every ``period`` / 6 (at most every 5 minutes). ``api``:
    :class:`~meshxl.istio.labeler.KubeApi`; ``api_errors``: what its calls raise."""

    api: Any
    namespace: str | None
    period: float = DEFAULT_REFRESH
    api_errors: tuple[type[Exception], ...] = ()
    moved: int = 0
    errors: int = 0

    async def refresh(self, now: float | None = None) -> int:
        """One pass; returns the EnvoyFilters moved. One whose patch fails (another
        writer moved it in between: its test fails) is logged, and the others go on."""
        epoch = epoch_of(time.time() if now is None else now, self.period)
        moved = 0
        for envoy_filter in await self.api.envoy_filters(self.namespace):
            ops = epoch_patch(envoy_filter, epoch)
            if not ops:
                continue
            meta = envoy_filter["metadata"]
            try:
                await self.api.patch_envoy_filter(meta["namespace"], meta["name"], ops)
            except self.api_errors as exc:
                self.errors += 1
                log.warning("envoyfilter %s/%s: credentials epoch %s not written: %s",
                            meta["namespace"], meta["name"], epoch, exc)
                continue
            log.info("envoyfilter %s/%s: credentials epoch %s (its clients build their EDS "
                     "sources anew, reading their certificates)", meta["namespace"],
                     meta["name"], epoch)
            moved += 1
        self.moved += moved
        return moved

    async def run(self) -> None:
        """Refresh for ever; a failed listing is logged, counted and tried again."""
        while True:
            try:
                await self.refresh()
            except self.api_errors as exc:
                self.errors += 1
                log.warning("listing the EnvoyFilters in %s failed: %s",
                            self.namespace or "all namespaces", exc)
            await asyncio.sleep(min(self.period / 6, 300.0))
