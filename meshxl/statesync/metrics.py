"""The sidecar's Prometheus metrics, on a registry of its own (several sidecars may
share a process in tests and benchmarks), and their text exposition.

Counters, gauges and histograms are this module's own, written for one event loop:
prometheus-client (which the control plane uses) would cost every sidecar 3.54 MiB of
RSS (its HTTP servers, push gateway and multiprocess support come with it;
``bench/sidecar_libraries.py``, in the sidecar's own process, median of 5, 2026-11-27),
8 % of its 45 MiB idle target, and a lock on every increment. What
:meth:`StatesyncMetrics.render` writes is the Prometheus text format exactly as
prometheus-client's ``generate_latest`` writes it, less its ``_created`` series;
``tests/unit/test_statesync_metrics.py`` checks that line by line against prometheus-
client itself, with generated names, label values and numbers.
"""

from __future__ import annotations

import abc
import bisect
import functools
import math
from collections.abc import Callable, Sequence

from .signals import Signals

__all__ = ["CONTENT_TYPE", "PROCESS_WIDE", "Counter", "Gauge", "Histogram", "Registry",
           "StatesyncMetrics", "go_float", "render_hosted"]

CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"
"""The Content-Type of :meth:`Registry.render` (Prometheus' text format)."""

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5)


def go_float(value: float) -> str:
    """A sample value or bucket bound as Prometheus writes it: ``repr``, ``+Inf``,
    ``-Inf``, ``NaN``, and an exponent from 1e+06 on, as Go prints floats."""
    value = float(value)
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if value != value:
        return "NaN"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _labels(pairs: Sequence[tuple[str, str]]) -> str:
    """``{a="x",b="y"}`` by label name (``""`` without labels)."""
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_label_value(v)}"' for k, v in sorted(pairs)) + "}"


class _Family(abc.ABC):
    """A metric and its children, one per label set (created on first use)."""

    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 registry: Registry | None = None):
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _Child] = {}
        if registry is not None:
            registry.register(self)
        if not self.labelnames:
            self._unlabelled = self._child(())

    @abc.abstractmethod
    def _new(self) -> _Child:
        """A child of this kind (a counter's or gauge's value, a histogram's buckets)."""

    def _child(self, values: tuple[str, ...]) -> _Child:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._new()
        return child

    def labels(self, *values: object) -> _Child:
        """The child of these label values (in ``labelnames`` order)."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} has labels {self.labelnames}, got {values!r}")
        return self._child(tuple(str(v) for v in values))

    def lines(self) -> list[str]:
        """Its HELP and TYPE lines, then its samples."""
        name = self.name + ("_total" if self.kind == "counter" else "")
        doc = self.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out = [f"# HELP {name} {doc}\n", f"# TYPE {name} {self.kind}\n"]
        for values, child in self._children.items():
            child.lines(name, tuple(zip(self.labelnames, values, strict=True)), out)
        return out


class _Child(abc.ABC):
    __slots__ = ()

    @abc.abstractmethod
    def lines(self, name: str, labels: tuple[tuple[str, str], ...], out: list[str]) -> None:
        """Append the child's sample lines to ``out``."""


class _Value(_Child):
    __slots__ = ("value", "function")

    def __init__(self) -> None:
        self.value = 0.0
        self.function: Callable[[], float] | None = None

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount

    def set(self, value: float) -> None:
        self.value = float(value)

    def lines(self, name: str, labels: tuple[tuple[str, str], ...], out: list[str]) -> None:
        value = self.function() if self.function is not None else self.value
        out.append(f"{name}{_labels(labels)} {go_float(value)}\n")


class _Buckets(_Child):
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.sum += amount
        i = bisect.bisect_left(self.bounds, amount)
        if i < len(self.counts) and amount == amount:  # NaN: in no bucket
            self.counts[i] += 1

    def lines(self, name: str, labels: tuple[tuple[str, str], ...], out: list[str]) -> None:
        total = 0
        for bound, count in zip(self.bounds, self.counts, strict=True):
            total += count
            out.append(f"{name}_bucket{_labels((*labels, ('le', go_float(bound))))} "
                       f"{go_float(total)}\n")
        out.append(f"{name}_count{_labels(labels)} {go_float(total)}\n")
        if self.bounds[0] >= 0:  # a sum of negative observations is no counter: left out
            out.append(f"{name}_sum{_labels(labels)} {go_float(self.sum)}\n")


class Counter(_Family):
    """Counts up (``inc``); exposed as ``NAME_total``."""

    kind = "counter"

    def _new(self) -> _Child:
        return _Value()

    def labels(self, *values: object) -> _Value:
        return super().labels(*values)  # type: ignore[return-value]

    def inc(self, amount: float = 1.0) -> None:
        self._unlabelled.inc(amount)  # type: ignore[attr-defined]


class Gauge(_Family):
    """A value that is set (``set``), or read from a function when exposed."""

    kind = "gauge"

    def _new(self) -> _Child:
        return _Value()

    def labels(self, *values: object) -> _Value:
        return super().labels(*values)  # type: ignore[return-value]

    def set(self, value: float) -> None:
        self._unlabelled.set(value)  # type: ignore[attr-defined]

    def set_function(self, function: Callable[[], float]) -> None:
        self._unlabelled.function = function  # type: ignore[attr-defined]


class Histogram(_Family):
    """Observations counted in buckets (sorted bounds; each bucket's count is
    cumulative when exposed, with ``+Inf`` last), their count and their sum (left out
    when a bucket is negative, as OpenMetrics asks)."""

    kind = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 buckets: Sequence[float], registry: Registry | None = None):
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds):
            raise ValueError("Buckets not in sorted order")
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        if len(bounds) < 2:
            raise ValueError("Must have at least two buckets")
        self.bounds = tuple(bounds)
        super().__init__(name, documentation, labelnames, registry=registry)

    def _new(self) -> _Child:
        return _Buckets(self.bounds)

    def labels(self, *values: object) -> _Buckets:
        return super().labels(*values)  # type: ignore[return-value]

    def observe(self, amount: float) -> None:
        self._unlabelled.observe(amount)  # type: ignore[attr-defined]


class Registry:
    """The metrics one sidecar exposes, in the order they were made."""

    def __init__(self) -> None:
        self.families: list[_Family] = []

    def register(self, family: _Family) -> None:
        if any(f.name == family.name for f in self.families):
            raise ValueError(f"metric {family.name} registered twice")
        self.families.append(family)

    def render(self) -> bytes:
        """The text exposition of every metric (``GET /metrics``)."""
        out: list[str] = []
        for family in self.families:
            out += family.lines()
        return "".join(out).encode()


class StatesyncMetrics:
    """One sidecar's metrics. ``signals``: those of the process, shared by the clusters
    one process hosts (:func:`render_hosted`); None: its own."""

    def __init__(self, signals: Signals | None = None) -> None:
        self.registry = Registry()
        r = self.registry
        self.writes = Counter("meshxl_statesync_writes", "Session writes by operation and "
                              "result.", ["op", "result"], registry=r)
        self.reads = Counter("meshxl_statesync_reads", "Session reads by where the state "
                             "came from (cache, etcd, local, cache-unverified) and result.",
                             ["source", "result"], registry=r)
        # Each label set's counter looked up once.
        self.write = functools.cache(self.writes.labels)
        self.read = functools.cache(self.reads.labels)
        self.conflicts = Counter("meshxl_statesync_write_conflicts", "Writes refused because "
                                 "another member wrote the session since (409).", registry=r)
        self.superseded = Counter("meshxl_statesync_superseded", "Sessions kept on this "
                                  "member (delayed sync) given up because another member "
                                  "wrote them in etcd meanwhile.", registry=r)
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
        self.planned_flushed = Counter("meshxl_statesync_planned_flushed_sessions", "Young "
                                       "sessions replicated before their sync_delay because "
                                       "a planned move away from this member began.",
                                       registry=r)
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

        self.quota_refused = Counter("meshxl_statesync_quota_refused", "Write requests "
                                     "refused (429) for the cluster's quota, by quota "
                                     "(sessions, bytes, writes_per_second).", ["quota"],
                                     registry=r)
        self.http_limits = Counter("meshxl_statesync_http_limits", "Connection-level limits "
                                   "of the API hit, by limit (connections, idle_timeout, "
                                   "header_timeout, body_timeout, write_timeout, head_size, "
                                   "body_size).", ["limit"], registry=r)
        self.connections = Gauge("meshxl_statesync_http_connections", "Client connections "
                                 "of the API open.", registry=r)

        self.signals = signals or Signals()
        self._signal_gauges(r)

        # Children looked up once each.
        self.bulk_request = functools.cache(self.bulk_requests.labels)
        self.bulk_item = functools.cache(self.bulk_items.labels)
        self._batch_size = functools.cache(self.batch_size.labels)
        self._batch_seconds = functools.cache(self.batch_seconds.labels)

    def _signal_gauges(self, r: Registry) -> None:
        """The signals of a sick member (signals.py), read when exposed: NaN for a
        window without samples, no pressure series without PSI."""
        signals = self.signals
        lag = Gauge("meshxl_statesync_event_loop_lag_seconds", "How late the sidecar's "
                    "event loop ran a timer due every 0.25 s, over the last 10 s (stat: "
                    "last, p99, max; NaN without samples).", ["stat"], registry=r)
        commit = Gauge("meshxl_statesync_etcd_commit_seconds", "Time of this sidecar's "
                       "write transactions to etcd, sent to answered, over the last 10 s "
                       "(stat: last, p99, max; NaN without samples).", ["stat"], registry=r)
        for stat in ("last", "p99", "max"):
            lag.labels(stat).function = functools.partial(signals.loop_lag.window.stat, stat)
            commit.labels(stat).function = functools.partial(signals.commits.stat, stat)
        pressure = Gauge("meshxl_statesync_cpu_pressure_ratio", "CPU pressure (PSI some "
                         "avg10, 0-1): the share of the last 10 s in which a runnable task "
                         "waited for a CPU, of this process's cgroup or, without one, of "
                         "the machine (source).", ["source"], registry=r)
        if signals.pressure.source is not None:
            pressure.labels(signals.pressure.source[0]).function = signals.pressure.ratio

    def http_limit(self, limit: str) -> None:
        self.http_limits.labels(limit).inc()

    def on_batch(self, kind: str, size: int, seconds: float) -> None:
        self._batch_size(kind).observe(size)
        self._batch_seconds(kind).observe(seconds)
        self.signals.on_batch(kind, seconds)

    def render(self) -> bytes:
        """``GET /metrics``: every metric in Prometheus' text format."""
        return self.registry.render()


PROCESS_WIDE = frozenset({
    "meshxl_statesync_http_limits", "meshxl_statesync_http_connections",
    "meshxl_statesync_event_loop_lag_seconds", "meshxl_statesync_etcd_commit_seconds",
    "meshxl_statesync_cpu_pressure_ratio"})
"""The metrics of the process rather than of a cluster: its HTTP server and its signals."""


def render_hosted(process: StatesyncMetrics, clusters: dict[str, StatesyncMetrics]) -> bytes:
    """``GET /metrics`` of a sidecar hosting several clusters: each metric once (its HELP
    and TYPE lines), with every cluster's series labelled ``cluster`` (the metrics of
    :data:`PROCESS_WIDE` from ``process``, unlabelled), as if one registry held them."""
    out: list[str] = []
    by_cluster = [(name, m.registry.families) for name, m in sorted(clusters.items())]
    for i, family in enumerate(process.registry.families):
        if family.name in PROCESS_WIDE:
            out += family.lines()
            continue
        head = family.lines()[:2]  # HELP and TYPE (the process's own series: none)
        out += head
        name = head[1].split(" ")[2]
        own = "cluster" in family.labelnames
        for cluster, families in by_cluster:
            each = families[i]
            for values, child in each._children.items():
                labels = tuple(zip(each.labelnames, values, strict=True))
                child.lines(name, labels if own else (("cluster", cluster), *labels), out)
    return "".join(out).encode()
