"""``meshxl sync``: every sidecar's view of state synchronization, from the statistics
each one publishes in etcd."""

from __future__ import annotations

import time
from typing import Any

from meshxl.model import cluster_view
from meshxl.operator.views.read import MeshRead, clusters_of, model_warnings

__all__ = ["DEFAULT_PUBLISH_INTERVAL", "STALE_INTERVALS", "sync_report"]


STALE_INTERVALS = 3
"""Statistics older than this many publication intervals are flagged stale: the
sidecar publishes every interval (docs/operations.md), so its process, its etcd
connection or its lease is in trouble."""

DEFAULT_PUBLISH_INTERVAL = 2.0


def sync_report(read: MeshRead, cluster: str | None = None,
                now: float | None = None) -> dict[str, Any]:
    """``meshxl sync``: every sidecar's view of state synchronization."""
    now = time.time() if now is None else now
    known = {s.name for s in clusters_of(read, cluster)} if read.model else set()
    rows = []
    for (c, member), stats in sorted(read.sync.items()):
        if cluster is not None and c != cluster:
            continue
        published = stats.get("published")
        if not isinstance(published, int | float) or isinstance(published, bool):
            published = None
        interval = stats.get("publish_interval")
        if not isinstance(interval, int | float) or isinstance(interval, bool) \
                or not 0 < interval < 3600:
            interval = DEFAULT_PUBLISH_INTERVAL
        age = None if published is None else round(max(0.0, now - published), 3)
        rows.append({
            "cluster": c, "member": member, "in_model": c in known,
            "ready": stats.get("ready"), "reasons": stats.get("reasons", []),
            "revision": stats.get("revision"),
            "lag_seconds": stats.get("lag_seconds"),
            "cached_sessions": stats.get("cached_sessions"),
            "owned_sessions": stats.get("owned_sessions"),
            "local_sessions": stats.get("local_sessions"),
            "takeovers": stats.get("takeovers"),
            "last_full_sync": stats.get("last_full_sync"),
            "full_syncs": stats.get("full_syncs"),
            "write_conflicts": stats.get("write_conflicts"),
            "undecodable_sessions": stats.get("undecodable_sessions"),
            "errors": stats.get("errors"), "last_error": stats.get("last_error"),
            "lease_losses": stats.get("lease_losses"),
            "age_seconds": age, "publish_interval": interval,
            "stale": age is None or age > STALE_INTERVALS * interval,
            "shards": _shards(stats.get("shards")),
        })
    missing, unregistered = [], []
    for spec in clusters_of(read, cluster):
        for m in cluster_view(spec, read.runtime).members:
            registered = (spec.name, m.name) in read.registrations
            if registered and (spec.name, m.name) not in read.sync:
                missing.append({"cluster": spec.name, "member": m.name})
            elif not registered:  # its sidecar is down, or cannot reach etcd (waiting)
                unregistered.append({"cluster": spec.name, "member": m.name})
    warnings = [f"{r['cluster']}/{r['member']}: statistics are {r['age_seconds']} s old "
                f"(published every {r['publish_interval']} s): the sidecar is not publishing"
                for r in rows if r["stale"] and r["age_seconds"] is not None]
    warnings += [f"{r['cluster']}/{r['member']}: session shard {s['name']} unreachable"
                 + (f" for {s['unreachable_for']} s" if s.get("unreachable_for") else "")
                 + (f": {str(s['last_error'])[:200]}" if s.get("last_error") else "")
                 for r in rows if r["shards"] for s in r["shards"]["shards"]
                 if not s.get("reachable", True)]
    warnings += [f"{r['cluster']}/{r['member']}: {str(r['shards']['map_error'])[:300]} "
                 f"(serving shard map version {r['shards']['version']})"
                 for r in rows if r["shards"] and r["shards"].get("map_error")]
    return {"revision": read.revision, "sidecars": rows, "without_statistics": missing,
            "unregistered": unregistered,
            "warnings": warnings + model_warnings(read)}


def _shards(value: Any) -> dict[str, Any] | None:
    """A sidecar's published shards (``/v1/status``'s ``shards``), kept only if it has
    the expected form (published by another version, it may not)."""
    if not isinstance(value, dict) or not isinstance(value.get("shards"), list):
        return None
    shards = [s for s in value["shards"] if isinstance(s, dict) and isinstance(s.get("name"), str)]
    return {"version": value.get("version"), "shards": shards,
            "map_error": value.get("map_error") or None}
