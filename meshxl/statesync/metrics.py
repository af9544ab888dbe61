"""The sidecar's Prometheus metrics, on a registry of its own (several sidecars may
share a process in tests and benchmarks)."""

from __future__ import annotations

import functools

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5)


class StatesyncMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.writes = Counter("meshxl_statesync_writes", "Session writes by operation and "
                              "result.", ["op", "result"], registry=r)
        self.reads = Counter("meshxl_statesync_reads", "Session reads by where the state "
                             "came from (cache, etcd, local, cache-unverified) and result.",
                             ["source", "result"], registry=r)
        # Each label set's counter looked up once (labels() takes a lock every call).
        self.write = functools.cache(self.writes.labels)
        self.read = functools.cache(self.reads.labels)
        self.conflicts = Counter("meshxl_statesync_write_conflicts", "Writes refused because "
                                 "another member wrote the session since (409).", registry=r)
        self.takeovers = Counter("meshxl_statesync_takeovers", "Sessions this member took "
                                 "over from another member.", registry=r)
        self.bulk_requests = Counter("meshxl_statesync_bulk_requests", "Multi-session "
                                     "requests by kind (get, save, transaction).", ["kind"],
                                     registry=r)
        self.bulk_items = Counter("meshxl_statesync_bulk_items", "Sessions named in "
                                  "multi-session requests, by kind (get, save, "
                                  "transaction); each is also counted as a read or a "
                                  "write.", ["kind"], registry=r)
        self.transactions = Counter("meshxl_statesync_transactions", "Transactions by "
                                    "result (committed, or the first failure: "
                                    "precondition_failed, conflict, not_found, "
                                    "unavailable).", ["result"], registry=r)
        self.batch_size = Histogram("meshxl_statesync_batch_size", "Operations per etcd "
                                    "transaction.", ["kind"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.batch_seconds = Histogram("meshxl_statesync_batch_duration_seconds", "Time of "
                                       "one batched etcd transaction.", ["kind"],
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.replication_lag = Histogram("meshxl_statesync_replication_lag_seconds", "From "
                                         "another member's write's timestamp to its arrival "
                                         "in this cache.",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.cached = Gauge("meshxl_statesync_cached_sessions", "Sessions in the cache.",
                            registry=r)
        self.local = Gauge("meshxl_statesync_local_sessions", "Sessions younger than "
                           "sync_delay, kept on this member only.", registry=r)
        self.revision = Gauge("meshxl_statesync_etcd_revision", "Last etcd revision "
                              "applied to the cache.", registry=r)
        self.undecodable = Counter("meshxl_statesync_undecodable_records", "Stored session "
                                   "records this sidecar could not decode (written by a "
                                   "foreign or broken writer), by where it met them.",
                                   ["where"], registry=r)
        self.undecodable_sessions = Gauge("meshxl_statesync_undecodable_sessions", "Sessions "
                                          "of the cluster whose stored record cannot be "
                                          "decoded now (PUT or DELETE replaces them).",
                                          registry=r)
        self.start_attempts = Counter("meshxl_statesync_start_attempts", "Attempts to start "
                                      "(connect to etcd, read the session settings, "
                                      "register) before the first succeeded.", registry=r)
        self.ready = Gauge("meshxl_statesync_ready", "1 when registered and caught up.",
                           registry=r)
        self.shard_up = Gauge("meshxl_statesync_shard_up", "1 while the session shard's "
                              "etcd answers this sidecar's watch (sharded sessions only).",
                              ["shard"], registry=r)
        self.shard_sessions = Gauge("meshxl_statesync_shard_cached_sessions", "Sessions of "
                                    "the shard in the cache.", ["shard"], registry=r)
        self.shard_map_version = Gauge("meshxl_statesync_shard_map_version", "The session "
                                       "shard map version this sidecar serves.", registry=r)
        self.shard_map_unusable = Gauge("meshxl_statesync_shard_map_unusable", "1 while the "
                                        "stored shard map cannot be used (the sidecar serves "
                                        "the last one it could; /v1/status says why).",
                                        registry=r)
        self.fenced = Counter("meshxl_statesync_shard_fenced", "Requests refused at a "
                              "session shard because its fence names a newer shard map "
                              "than the one they were planned under (answered 503).",
                              registry=r)
        self.etcd_unreachable = Gauge("meshxl_statesync_etcd_unreachable_seconds", "Seconds "
                                      "etcd has not answered this member's registration "
                                      "and keepalives for (0 while it answers).", registry=r)
        self.member = Gauge("meshxl_statesync_member_info", "Always 1: the cluster, member "
                            "and site this sidecar serves (to join its other series on).",
                            ["cluster", "member", "site"], registry=r)

        self.http_limits = Counter("meshxl_statesync_http_limits", "Connection-level limits "
                                   "of the API hit, by limit (connections, idle_timeout, "
                                   "header_timeout, body_timeout, write_timeout, head_size, "
                                   "body_size).", ["limit"], registry=r)
        self.connections = Gauge("meshxl_statesync_http_connections", "Client connections "
                                 "of the API open.", registry=r)

        # Children looked up once each (labels() takes a lock on every call).
        self.bulk_request = functools.cache(self.bulk_requests.labels)
        self.bulk_item = functools.cache(self.bulk_items.labels)
        self._batch_size = functools.cache(self.batch_size.labels)
        self._batch_seconds = functools.cache(self.batch_seconds.labels)

    def http_limit(self, limit: str) -> None:
        self.http_limits.labels(limit).inc()

    def on_batch(self, kind: str, size: int, seconds: float) -> None:
        self._batch_size(kind).observe(size)
        self._batch_seconds(kind).observe(seconds)
