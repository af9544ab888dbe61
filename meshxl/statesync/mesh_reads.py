"""What the sidecar reads of the mesh in etcd: its session settings (the model's
``sessions`` block), the session shards (the main cluster's shard map), whether the
model places this member; and the form of the statistics it publishes there."""

from __future__ import annotations

import json
import logging
from typing import Any

import aetcd

from meshxl.etcd.keys import Keys
from meshxl.etcd.shards import ShardMap, parse_shard_map
from meshxl.model import ModelError, parse_model
from meshxl.model import SessionSync as SessionDefaults

from .config import StatesyncConfig
from .writes import Settings

log = logging.getLogger("meshxl.statesync.app")

__all__ = ["model_mismatch", "session_settings", "shard_map", "sync_stats_value"]


def sync_stats_value(stats: dict[str, Any], published: float) -> bytes:
    """The stored form of a sidecar's statistics (``meshxl sync`` reads it back)."""
    return json.dumps({**stats, "published": published}, sort_keys=True, default=str).encode()


def model_mismatch(raw: bytes | None, cluster: str, site: str | None,
                   where: str) -> str | None:
    """Why the model does not place this member as configured, or None."""
    if raw is None:
        return f"no model in etcd at {where}: no Envoy is told about member registrations"
    try:
        model = parse_model(raw.decode("utf-8", "replace"), source="model in etcd")
    except ModelError:
        return None  # the control plane keeps its last good model and reports this one
    spec = model.cluster(cluster)
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
    """The session shards in the main etcd cluster (None: sessions live there)."""
    got = await client.get(Keys(config.etcd_root).shards.encode())
    if got is None:
        return None
    found = parse_shard_map(got.value)
    log.info("sessions in %d shards (map version %d): %s", len(found.shards), found.version,
             ", ".join(found.names))
    return found


async def session_settings(client: aetcd.Client, config: StatesyncConfig) -> Settings:
    """CLI values win; otherwise the cluster's ``sessions`` block of the model in etcd."""
    defaults = SessionDefaults()
    got = await client.get(Keys(config.etcd_root).model.encode())
    if got is not None:
        try:
            spec = parse_model(got.value.decode(), source="model in etcd").cluster(config.cluster)
        except ModelError as exc:
            log.warning("model in etcd is invalid (%s); using session defaults", exc)
        else:
            if spec is not None:
                defaults = spec.sessions
            else:
                log.info("cluster %r is not in the model in etcd; using session defaults",
                         config.cluster)
    return Settings(
        ttl=config.session_ttl if config.session_ttl is not None else defaults.ttl,
        sync_delay=config.sync_delay if config.sync_delay is not None else defaults.sync_delay,
        max_bytes=config.max_bytes if config.max_bytes is not None else defaults.max_bytes,
        replication=defaults.replication,
    )
