"""What the sidecar reads of the mesh in etcd: its session settings (the model's
``sessions`` block), the session shards (the main cluster's shard map), whether the
model places this member; and the form of the statistics it publishes there."""

from __future__ import annotations

import json
import logging
from typing import Any

import aetcd
from msgspec.structs import replace

from meshxl.errors import InputError
from meshxl.etcd.keys import Keys
from meshxl.etcd.mesh import read_model
from meshxl.etcd.shards import ShardMap, parse_shard_map
from meshxl.model.basics import ModelError
from meshxl.model.document import ModelSpec
from meshxl.model.load import parse_unexpanded
from meshxl.model.spec import SessionSync

from .cache import SessionCache
from .config import StatesyncConfig
from .writes import Settings

log = logging.getLogger("meshxl.statesync.app")

__all__ = ["cache_status", "model_mismatch", "session_settings", "shard_map",
           "sync_stats_value"]


def sync_stats_value(stats: dict[str, Any], published: float) -> bytes:
    """The stored form of a sidecar's statistics (``meshxl sync`` reads it back)."""
    return json.dumps({**stats, "published": published}, sort_keys=True, default=str).encode()


def model_mismatch(stored: bool, model: ModelSpec | None, cluster: str, site: str | None,
                   where: str) -> str | None:
    """Why the model does not place this member as configured, or None. ``stored``: a
    model is stored; ``model``: it as the mesh watch read it (None: it is invalid, and
    the control plane keeps its last good model and reports this one)."""
    if not stored:
        return f"no model in etcd at {where}: no Envoy is told about member registrations"
    if model is None:
        return None
    spec = model.cluster(cluster)
    if spec is None and _sessions_of(model, cluster) is not None:
        return None  # a virtual system: the control plane places its members
    if spec is None:
        names = ", ".join(c.name for c in model.clusters) or "none"
        return (f"cluster {cluster!r} is not in the model (clusters: {names}): no Envoy "
                "sends this member traffic")
    sites = spec.site_names()
    if site and sites and site not in sites:
        return (f"site {site!r} is not a site of cluster {cluster} in the model (sites: "
                f"{', '.join(sites)})")
    return None


async def shard_map(client: aetcd.Client, config: StatesyncConfig) -> ShardMap | None:
    """The session shards in the main etcd cluster (None: sessions live there). A stored
    map that cannot be used gives a map without shards saying why
    (:meth:`ShardMap.unusable`): the sidecar starts and serves no session until a usable
    one is stored (``resharding.py``)."""
    got = await client.get(Keys(config.etcd_root).shards.encode())
    if got is None:
        return None
    try:
        found = parse_shard_map(got.value)
    except InputError as exc:
        log.error("the stored shard map cannot be used (%s): no session is served until a "
                  "usable one is stored", exc)
        return ShardMap.unusable(f"the stored shard map cannot be used: {exc}")
    log.info("sessions in %d shards (map version %d): %s", len(found.shards), found.version,
             ", ".join(found.names))
    return found


def cache_status(cache: SessionCache | None) -> dict[str, Any]:
    """``/v1/status``' figures of a session cache (the first shard's with shards; None:
    the sidecar holds no usable shard map, so no cache)."""
    c = cache
    if c is None:
        return {"revision": 0, "etcd_revision": 0,
                "lag_seconds": None, "full_syncs": 0, "last_full_sync": None,
                "watch_starts": 0, "rewinds": 0, "errors": 0, "last_error": None,
                "bad_records": 0, "undecodable_sessions": 0}
    return {"revision": c.applied, "etcd_revision": c.history.highest,
            "lag_seconds": c.last_lag, "full_syncs": c.full_syncs,
            "last_full_sync": c.last_full_sync, "watch_starts": c.watch_starts,
            "rewinds": c.rewinds, "errors": c.errors,
            "last_error": c.last_error and c.last_error[:500], "bad_records": c.bad_records,
            "undecodable_sessions": len(c.undecodable)}


async def session_settings(client: aetcd.Client, config: StatesyncConfig) -> Settings:
    """CLI values win; otherwise the cluster's ``sessions`` block of the model in etcd."""
    defaults = SessionSync()
    got = await read_model(client, Keys(config.etcd_root))
    if got is not None:
        try:
            found = _sessions_of(parse_unexpanded(got, source="model in etcd"), config.cluster)
        except ModelError as exc:
            log.warning("model in etcd is invalid (%s); using session defaults", exc)
        else:
            if found is not None:  # a cluster's, or a virtual system's
                defaults = found
            else:
                log.info("cluster %r is not in the model in etcd; using session defaults",
                         config.cluster)
    given = {"ttl": config.session_ttl, "sync_delay": config.sync_delay,
             "max_bytes": config.max_bytes}
    # The model's block whole (a setting added to it needs no line here), the command
    # line's values over it.
    return replace(defaults, **{k: v for k, v in given.items() if v is not None})


def _sessions_of(model: ModelSpec, name: str) -> SessionSync | None:
    """:func:`meshxl.model.vsls.sessions_of`, that module (and the pools' placement code
    under it) loaded only when the model has virtual systems."""
    if not model.virtual_systems:
        spec = model.cluster(name)
        return spec.sessions if spec is not None else None
    from meshxl.model.vsls import sessions_of as of_model

    return of_model(model, name)
