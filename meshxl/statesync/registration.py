"""The registration a member's sidecar keeps in etcd under its lease, as JSON.

:class:`meshxl.model.Registration` reads it on the control plane's side; this module
writes it (:class:`.membership.Membership` keeps it current).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

__all__ = ["now", "registration_document"]


def now() -> str:
    """The time as registrations write it (UTC, ISO 8601, milliseconds)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def registration_document(
    *, address: str, port: int, site: str | None, weight: int | None, ready: bool,
    problems: dict[str, dict[str, Any]], sidecar: str, pid: int, since: str, updated: str,
    overload: dict[str, str] | None = None, returning: dict[str, str] | None = None,
    shard_map: int | None = None, sync_delay: float = 0.0,
    istio: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The JSON object stored at the member key (read by ``Registration.from_dict``)."""
    doc: dict[str, Any] = {"address": address, "port": port}
    if site is not None:
        doc["site"] = site
    if weight is not None:
        doc["weight"] = weight
    doc.update(
        ready=ready,
        problems=sorted(problems),
        problem_details={name: dict(problems[name]) for name in sorted(problems)},
        sidecar=sidecar, pid=pid, since=since, updated=updated,
    )
    if overload is not None:
        doc["overload"] = dict(overload)
    if returning is not None:
        doc["returning"] = dict(returning)
    if shard_map is not None:
        doc["shard_map"] = shard_map  # the version served: an online reshard waits for it
    if sync_delay > 0:
        doc["sync_delay"] = sync_delay  # planned moves away from it wait for its flush
    if istio is not None:
        doc["istio"] = dict(istio)  # its pod's Istio endpoint metadata (IstioEndpoint)
    return doc
