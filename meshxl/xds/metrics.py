"""The control plane's Prometheus metrics, on a registry of its own (several replicas
may share a process in tests and benchmarks). Names and meanings: docs/metrics.md.

The ADS servers (state of the world and delta) report through the methods below; the
control plane reports rebuilds, convergence and the debounce queue.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from meshxl.model import MemberState, ModelSpec, RuntimeState, cluster_view
from meshxl.model.vsls import placement_of, pool_shares

from .auth import REFUSAL_REASONS
from .failover import FAILOVER_CAUSES
from .types import TYPE_ORDER, type_label

__all__ = ["Convergence", "XdsMetrics", "member_state_counts", "placement_series"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)


class XdsMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.streams = Gauge("meshxl_xds_connected_streams", "ADS streams open now, by "
                             "protocol (sotw, delta).", ["protocol"], registry=r)
        self.streams_opened = Counter("meshxl_xds_streams_opened", "ADS streams accepted, "
                                      "by protocol.", ["protocol"], registry=r)
        self.pushes = Counter("meshxl_xds_pushes", "Discovery responses sent, by resource "
                              "type and protocol.", ["type", "protocol"], registry=r)
        self.push_seconds = Histogram("meshxl_xds_push_duration_seconds", "From a snapshot "
                                      "being published to its response being written on a "
                                      "stream, by resource type.", ["type"],
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.ack_seconds = Histogram("meshxl_xds_ack_duration_seconds", "From a response "
                                     "being written to Envoy's ACK or NACK of it, by resource "
                                     "type.", ["type"], buckets=_LATENCY_BUCKETS, registry=r)
        self.nacks = Counter("meshxl_xds_nacks", "Responses Envoy rejected, by resource "
                             "type.", ["type"], registry=r)
        self.convergence_seconds = Histogram(
            "meshxl_xds_convergence_seconds", "From a change being seen in etcd or the model "
            "file to the last connected Envoy acknowledging the snapshot built from it.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.rebuilds = Counter("meshxl_xds_rebuilds", "Snapshot rebuilds, by result "
                                "(published, unchanged, error).", ["result"], registry=r)
        self.rebuild_seconds = Histogram("meshxl_xds_rebuild_duration_seconds", "Compile "
                                         "and encode time of one rebuild.",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.debounce_pending = Gauge("meshxl_xds_debounce_pending_changes", "Changes seen "
                                      "and not yet built into a snapshot.", registry=r)
        self.debounce_wait = Gauge("meshxl_xds_debounce_oldest_change_age_seconds", "Age of "
                                   "the oldest change waiting for a rebuild (0 when none).",
                                   registry=r)
        self.failovers = Counter("meshxl_xds_failovers", "Members that stopped serving, by "
                                 "cluster and cause.", ["cluster", "cause"], registry=r)
        self.planned_waiting = Gauge("meshxl_xds_planned_moves_waiting", "Planned moves "
                                     "held back until their members replicated their young "
                                     "sessions (delayed sync).", registry=r)
        self.planned_unacknowledged = Counter("meshxl_xds_planned_moves_unacknowledged",
                                              "Planned moves that went ahead after "
                                              "sync_delay + 1 s without every member's "
                                              "acknowledgement.", registry=r)
        self.etcd_revision = Gauge("meshxl_xds_etcd_revision", "Last etcd revision of the "
                                   "mesh read by this replica.", registry=r)
        self.etcd_unreachable = Gauge("meshxl_xds_etcd_unreachable_seconds", "Seconds since "
                                      "this replica's watch of the mesh in etcd failed, "
                                      "while no full read has succeeded since (0 while it "
                                      "works).", registry=r)
        self.members = Gauge("meshxl_xds_members", "Members of the model's clusters by "
                             "state, as this replica compiles them.", ["cluster", "state"],
                             registry=r)
        self.model_warnings = Gauge("meshxl_xds_model_warnings", "Warnings about a "
                                    "cluster's model judged against its live members "
                                    "(Maglev table too small, high availability on one "
                                    "site).", ["cluster"], registry=r)
        self.warmup = Gauge("meshxl_xds_member_warmup_fraction", "Fraction of its weight "
                            "a member that joined or came back gets now, while its warm-up "
                            "ramp lasts (no series once it is over).", ["cluster", "member"],
                            registry=r)
        self._warming: set[tuple[str, str]] = set()
        self.degraded = Gauge("meshxl_xds_member_degraded", "1 while a member is judged "
                              "sick (degraded: slower or failing more than its peers; "
                              "docs/faults.md), no series otherwise.", ["cluster", "member"],
                              registry=r)
        self.degraded_share = Gauge("meshxl_xds_member_degraded_share", "Fraction of its "
                                    "weight a degraded load-sharing member (or a probed "
                                    "standby) gets now.", ["cluster", "member"], registry=r)
        self.vs_role = Gauge("meshxl_xds_vs_role", "1 for each role of each "
                             "high-availability virtual system (active, standby, backup) on "
                             "the pool member that holds it, as this replica places them.",
                             ["pool", "vs", "member", "role"], registry=r)
        self.pool_roles = Gauge("meshxl_xds_pool_member_roles", "Virtual systems whose "
                                "role (active, standby) a pool member holds.",
                                ["pool", "member", "role"], registry=r)
        self.pool_weight = Gauge("meshxl_xds_pool_member_active_weight", "Active virtual "
                                 "system weight a pool member holds.", ["pool", "member"],
                                 registry=r)
        self.pool_fair = Gauge("meshxl_xds_pool_member_fair_share", "A pool member's fair "
                               "share of the active weight (total x its capacity / the live "
                               "members' capacity; 0 while out of the placement).",
                               ["pool", "member"], registry=r)
        self._placement: dict[str, dict[tuple[str, ...], float]] = {}
        self._degraded: set[tuple[str, str]] = set()
        self._degraded_shares: set[tuple[str, str]] = set()
        self._warning_counts: dict[str, int] = {}
        self._member_counts: dict[tuple[str, str], int] = {}
        self._clusters: set[str] = set()
        self._labelled: dict[tuple[str, ...], Any] = {}
        for type_url in TYPE_ORDER:
            # At zero from the start: the first NACK is an increase a rule can see.
            self.nacks.labels(type_label(type_url))
        self.nodes = Gauge("meshxl_xds_nodes", "Envoy nodes with at least one open stream.",
                           registry=r)
        self.streams_refused = Counter(
            "meshxl_xds_streams_refused", "ADS streams refused, by reason: invalid_node_id, "
            "unauthenticated (no or a wrong token), permission_denied (the client "
            "certificate does not name the node id).", ["reason"], registry=r)
        for reason in REFUSAL_REASONS:
            self.streams_refused.labels(reason)  # at zero: the first refusal is an increase
        self.access_log_entries = Counter(
            "meshxl_xds_access_log_entries", "Access log entries from Envoys (the sick-member "
            "signal, docs/faults.md), by result: recorded, dropped (past a bound: entries "
            "per message or per second of a stream, names too long), unrouted (a cluster "
            "the node does not route to, or a host that is no member of it), refused (a "
            "stream that may not speak for its node).", ["result"], registry=r)
        for result in ("recorded", "dropped", "unrouted", "refused"):
            self.access_log_entries.labels(result)

    def know_clusters(self, names: Iterable[str]) -> None:
        """Start each new cluster's failover counters at zero, so that a rule sees its
        first failover as an increase (a series born at 1 shows none)."""
        for cluster in set(names) - self._clusters:
            for cause in FAILOVER_CAUSES:
                self.failovers.labels(cluster, cause)
            self._clusters.add(cluster)

    def set_members(self, counts: dict[tuple[str, str], int]) -> None:
        """Set ``meshxl_xds_members`` to ``counts``; a cluster gone from the model loses
        its series."""
        if counts == self._member_counts:
            return
        for key in self._member_counts.keys() - counts.keys():
            self.members.remove(*key)
        for (cluster, state), n in counts.items():
            self.members.labels(cluster, state).set(n)
        self._member_counts = dict(counts)

    def set_warming(self, fractions: Mapping[str, Mapping[str, float]]) -> None:
        """Set ``meshxl_xds_member_warmup_fraction``; a finished ramp loses its series."""
        now = {(c, m): share for c, members in fractions.items() for m, share in members.items()}
        for key in self._warming - now.keys():
            self.warmup.remove(*key)
        for (cluster, member), share in now.items():
            self.warmup.labels(cluster, member).set(share)
        self._warming = set(now)

    def set_degraded(self, degraded: Iterable[tuple[str, str]],
                     shares: Mapping[str, Mapping[str, float]]) -> None:
        """Set ``meshxl_xds_member_degraded`` and ``..._degraded_share``; a member judged
        well again (or no longer probed) loses its series."""
        sick = set(degraded)
        parts = {(c, m): share for c, members in shares.items() for m, share in members.items()}
        for key in self._degraded - sick:
            with contextlib.suppress(KeyError):
                self.degraded.remove(*key)
        for key in self._degraded_shares - parts.keys():
            with contextlib.suppress(KeyError):
                self.degraded_share.remove(*key)
        for key in sick:
            self.degraded.labels(*key).set(1)
        for key, share in parts.items():
            self.degraded_share.labels(*key).set(share)
        self._degraded, self._degraded_shares = sick, set(parts)

    def set_placement(self, series: Mapping[str, Mapping[tuple[str, ...], float]]) -> None:
        """Set the virtual systems' placement gauges (:func:`placement_series`); a role
        that moved, or a pool gone, loses its series."""
        gauges = {"vs_role": self.vs_role, "roles": self.pool_roles,
                  "weight": self.pool_weight, "fair": self.pool_fair}
        for name, gauge in gauges.items():
            now = dict(series.get(name, {}))
            before = self._placement.get(name, {})
            if now == before:
                continue
            for key in before.keys() - now.keys():
                with contextlib.suppress(KeyError):
                    gauge.remove(*key)
            for key, value in now.items():
                gauge.labels(*key).set(value)
            self._placement[name] = now

    def set_model_warnings(self, counts: dict[str, int]) -> None:
        """Set ``meshxl_xds_model_warnings`` to ``counts``; a cluster gone loses its series."""
        if counts == self._warning_counts:
            return
        for gone in self._warning_counts.keys() - counts.keys():
            self.model_warnings.remove(gone)
        for cluster, n in counts.items():
            self.model_warnings.labels(cluster).set(n)
        self._warning_counts = dict(counts)

    # -- reported by the ADS servers -------------------------------------------------

    def stream_opened(self, protocol: str) -> None:
        self.streams_opened.labels(protocol).inc()
        self.streams.labels(protocol).inc()

    def stream_closed(self, protocol: str) -> None:
        self.streams.labels(protocol).dec()

    def refused(self, reason: str) -> None:
        self.streams_refused.labels(reason).inc()

    def sent(self, type_url: str, protocol: str, since_published: float | None) -> None:
        """``since_published`` None: the stream opened after the snapshot was published
        (a connecting Envoy's first answer is not a push), so only the count moves."""
        pushes, push_seconds = self._children(("sent", type_url, protocol), lambda label: (
            self.pushes.labels(label, protocol), self.push_seconds.labels(label)), type_url)
        pushes.inc()
        if since_published is not None:
            push_seconds.observe(max(0.0, since_published))

    def answered(self, type_url: str, nack: bool, seconds: float) -> None:
        ack_seconds, nacks = self._children(("answered", type_url), lambda label: (
            self.ack_seconds.labels(label), self.nacks.labels(label)), type_url)
        ack_seconds.observe(max(0.0, seconds))
        if nack:
            nacks.inc()

    def _children(self, key: tuple[str, ...], make: Any, type_url: str) -> Any:
        """Labelled children, looked up once: ``labels()`` costs more than the
        observation, and a push to 1,000 Envoys makes 1,000 of each."""
        found = self._labelled.get(key)
        if found is None:
            found = self._labelled[key] = make(type_label(type_url))
        return found


def member_state_counts(model: ModelSpec | None,
                        runtime: RuntimeState) -> dict[tuple[str, str], int]:
    """(cluster, state) -> members in that state, every state of every cluster listed
    (zeros too: an alert on ``> 0`` then has a series to compare)."""
    counts: dict[tuple[str, str], int] = {}
    if model is None:
        return counts
    for spec in model.clusters:
        found = dict.fromkeys(MemberState, 0)
        for member in cluster_view(spec, runtime).members:
            found[member.state] += 1
        counts.update(((spec.name, str(state)), n) for state, n in found.items())
    return counts


def placement_series(model: ModelSpec | None,
                     runtime: RuntimeState) -> dict[str, dict[tuple[str, ...], float]]:
    """The virtual systems' placement as gauge series: ``vs_role`` (pool, vs, member,
    role) -> 1; per pool member ``roles`` (pool, member, active|standby) -> VSs,
    ``weight`` (pool, member) -> active weight held and ``fair`` -> its fair share."""
    out: dict[str, dict[tuple[str, ...], float]] = {
        "vs_role": {}, "roles": {}, "weight": {}, "fair": {}}
    if model is None:
        return out
    for pool in model.pools:
        placement = placement_of(model, pool, runtime)
        for vs, roles in placement.roles.items():
            held = (("active", (roles.active,)), ("standby", (roles.standby,)),
                    ("backup", roles.backup))
            for role, members in held:
                for member in members:
                    if member is not None:
                        out["vs_role"][(pool.name, vs, member, role)] = 1
        for member, (active, standby, weight, fair) in pool_shares(placement).items():
            out["roles"][(pool.name, member, "active")] = active
            out["roles"][(pool.name, member, "standby")] = standby
            out["weight"][(pool.name, member)] = weight
            out["fair"][(pool.name, member)] = round(fair, 3)
    return out


class Convergence:
    """Times "change seen -> every connected Envoy ACKed the snapshot built from it".

    A newer snapshot published before the last one converged keeps the older change's
    start (the operator waits from the first change). No I/O; single event loop.
    """

    def __init__(self, metrics: XdsMetrics) -> None:
        self._metrics = metrics
        self._versions: dict[str, str] = {}
        self._zones: dict[str, dict[str, str]] = {}
        self._seen_ns: int | None = None
        self._waiting: set[str] = set()

    @property
    def waiting(self) -> frozenset[str]:
        return frozenset(self._waiting)

    def published(self, versions: dict[str, str], seen_ns: int,
                  acked: dict[str, dict[str, str | None]],
                  zones: Mapping[str, dict[str, str]] | None = None,
                  node_zones: Mapping[str, str] | None = None) -> None:
        """A snapshot with ``versions`` is served; ``acked``: connected node -> the
        version it ACKed last per type; ``zones``: per zone with a variant, the versions
        its Envoys are served instead; ``node_zones``: connected nodes' zones."""
        self._versions = dict(versions)
        self._zones = dict(zones or {})
        node_zones = node_zones or {}
        if self._seen_ns is None:
            self._seen_ns = seen_ns
        if not acked:
            self._seen_ns, self._waiting = None, set()  # nothing to converge
            return
        self._waiting = {n for n, types in acked.items()
                         if not self._done(types, node_zones.get(n, ""))}
        self._finish()

    def node_changed(self, node_id: str, status: dict[str, Any]) -> None:
        """A node's status (as published: ``streams`` and ``types``) changed."""
        if node_id not in self._waiting:
            return
        types = {t: s.get("acked_version") for t, s in status.get("types", {}).items()}
        if status.get("streams", 0) == 0 or self._done(types, status.get("zone", "")):
            self._waiting.discard(node_id)
            self._finish()

    def _done(self, acked: dict[str, str | None], zone: str = "") -> bool:
        # Only the types this node subscribed to count (an Envoy without listeners
        # never asks for routes).
        variant = self._zones.get(zone, {}) if zone else {}
        return all(acked[t] == variant.get(t, v) for t, v in self._versions.items()
                   if t in acked)

    def _finish(self) -> None:
        if self._waiting or self._seen_ns is None:
            return
        self._metrics.convergence_seconds.observe(
            max(0.0, (time.time_ns() - self._seen_ns) / 1e9))
        self._seen_ns = None
