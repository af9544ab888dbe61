"""The judge at work: every :data:`~meshxl.xds.health.WINDOW` it judges the members from
the requests the Envoys logged, and keeps this replica's judgements in etcd (under the
replica's lease, so they end with it) or, without etcd, in memory.

**Across replicas.** Each replica judges from the Envoys connected to it, so two of
them may each find another member sick at the same instant. What must hold across
members is therefore decided in etcd, not in one replica's memory: a write that adds
or changes a record reads the cluster's judgements (``clusters/C/health/``, every
replica's), keeps only what the cluster's :class:`~meshxl.xds.health.Bound` still
allows (:func:`within_bounds`: at most a minority of a load-sharing tier degraded, the
worst first; in high availability no record beside another replica's), and commits
only if no judgement of that cluster changed since that read (a transaction comparing
the range's revisions), else reads and decides again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from aetcd.utils import prefix_range_end

from meshxl.etcd.keys import Keys
from meshxl.model import ModelSpec, RuntimeState
from meshxl.model.records import DEGRADED_KIND, Health

from .health import WINDOW, Bound, Judge, Judgement, Samples, share
from .loadshares import LoadShares

log = logging.getLogger(__name__)

__all__ = ["WRITE_ATTEMPTS", "Judging", "report", "within_bounds"]

WRITE_ATTEMPTS = 3
"""Reads and transactions a write tries while other replicas' judgements change under it
(then the next window judges again)."""


class Judging:
    """One replica's judge, its loop and its records."""

    def __init__(self, replica: str, keys: Keys, samples: Samples,
                 on_change: Callable[[], None],
                 began: Callable[[str, float], float | None] | None = None) -> None:
        self.replica = replica
        self.keys = keys
        self.samples = samples
        self.judge = Judge(replica, began)
        self.on_change = on_change
        self.local: dict[tuple[str, str], Health] = {}
        """Without etcd: the judgements themselves (the control plane merges them into
        its runtime state)."""
        self.last = Judgement()
        self.load_shares = LoadShares()
        self.loads: dict[str, dict[str, float]] = {}
        """``shares: load`` clusters: the members' shares below 1 (:mod:`.loadshares`)."""

    def step(self, model: ModelSpec, runtime: RuntimeState, now: float,
             hosts: Mapping[str, tuple[str, ...]]) -> tuple[
                 dict[tuple[str, str], Health], list[tuple[str, str]]]:
        """Judge once: the records to write and the keys to remove (this replica's)."""
        self.last = judgement = self.judge.judge(model, runtime, self.samples, now, hosts)
        mine = {k: h for k, h in runtime.health.items() if h.by == self.replica}
        puts = {k: h for k, h in judgement.records.items() if mine.get(k) != h}
        deletes = [k for k in mine if k not in judgement.records]
        return puts, deletes

    async def run(self, model: Callable[[], ModelSpec | None],
                  runtime: Callable[[], RuntimeState],
                  hosts: Callable[[], Mapping[str, tuple[str, ...]]],
                  client: Any = None, lease: Callable[[], Any] | None = None) -> None:
        """Judge every window; write or remove records when they change; step the
        load-based shares."""
        while True:
            await asyncio.sleep(WINDOW - time.time() % WINDOW + 0.01)
            current = model()
            if current is None:
                continue
            try:
                loads = self.load_shares.update(current, runtime(), self.samples, time.time(),
                                                hosts())
                if loads != self.loads:
                    self.loads = loads
                    self.on_change()
                puts, deletes = self.step(current, runtime(), time.time(), hosts())
                if not puts and not deletes:
                    continue
                if client is None:
                    for key in deletes:
                        self.local.pop(key, None)
                    self.local.update(puts)
                    self.on_change()
                    written = dict(puts)
                else:
                    written = await self._write(client, lease() if lease else None, puts,
                                                deletes, self.last.bounds)
                for (cluster, member), health in written.items():
                    log.warning("%s/%s: %s (%s)", cluster, member, health.kind, health.reason)
                for cluster, member in deletes:
                    log.info("%s/%s: judgement ended", cluster, member)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("judging the members failed (tried again next window)")

    async def _write(self, client: Any, lease: Any, puts: Mapping[tuple[str, str], Health],
                     deletes: list[tuple[str, str]],
                     bounds: Mapping[str, Bound] | None = None) -> dict[tuple[str, str], Health]:
        """One transaction: the records put under the lease (those the clusters' bounds
        allow over every replica's records), this replica's old ones removed; the
        records written."""
        if lease is None and puts:
            return {}  # no lease yet: the next window tries again
        tx = client.transactions
        clusters = sorted({cluster for cluster, _ in puts})
        for _ in range(WRITE_ATTEMPTS):
            compare: list[Any] = []
            stored: dict[tuple[str, str], Health] = {}
            for cluster in clusters:
                prefix = self.keys.health_prefix(cluster).encode()
                got = await client.get_prefix(prefix)
                for kv in got.kvs:
                    member = kv.key[len(prefix):].decode()
                    try:
                        stored[(cluster, member)] = Health.from_dict(json.loads(kv.value))
                    except ValueError:
                        continue  # unreadable: counts for no bound (the watch logs it)
                end = prefix_range_end(prefix)
                compare.append(tx.mod(prefix, range_end=end) < got.header.revision + 1)
            allowed = within_bounds(self.replica, puts, deletes, stored, bounds or {})
            ops: list[Any] = []
            for (cluster, member), health in allowed.items():
                value = json.dumps(health.to_dict()).encode()
                ops.append(tx.put(self.keys.member_health(cluster, member).encode(), value,
                                  lease=lease))
            for cluster, member in deletes:
                ops.append(tx.delete(self.keys.member_health(cluster, member).encode()))
            if not ops:
                return {}
            succeeded, _ = await client.transaction(compare=compare, success=ops, failure=[])
            if succeeded:
                for key in puts.keys() - allowed.keys():
                    log.debug("%s/%s: not recorded: another replica's judgements leave no "
                              "room", *key)
                return allowed
        log.info("judgements of %s changed under every write; judged again next window",
                 ", ".join(clusters))
        return {}


def within_bounds(replica: str, puts: Mapping[tuple[str, str], Health],
                  deletes: Sequence[tuple[str, str]],
                  stored: Mapping[tuple[str, str], Health],
                  bounds: Mapping[str, Bound]) -> dict[tuple[str, str], Health]:
    """The ``puts`` of ``replica`` that keep every cluster's :class:`Bound` with the
    judgements ``stored`` in etcd now (every replica's) once ``deletes`` are removed.
    A record this replica already holds unchanged in kind is always kept; new ones go in
    the order given (the judge lists the worst first) while there is room."""
    after = {k: h for k, h in stored.items() if k not in deletes}
    allowed: dict[tuple[str, str], Health] = {}
    for key, health in puts.items():
        cluster, member = key
        bound = bounds.get(cluster)
        held = after.get(key)
        if bound is None or (held is not None and held.by == replica
                             and held.kind == health.kind):
            allowed[key] = after[key] = health
            continue
        others = [k for k, h in after.items() if k[0] == cluster and h.by != replica]
        if bound.exclusive and others:
            continue
        if not bound.exclusive and health.kind == DEGRADED_KIND and member in bound.tier:
            degraded = sum(1 for (c, m), h in after.items() if c == cluster and m != member
                           and m in bound.tier and h.kind == DEGRADED_KIND)
            if degraded + 1 > bound.degraded:
                continue
        if held is not None and held.by != replica:
            continue  # another replica's record of this member stays theirs
        allowed[key] = after[key] = health
    return allowed


def report(runtime: RuntimeState, model: ModelSpec | None, now: float) -> dict[str, Any]:
    """The judgements as ``/v1/status`` shows them (``degraded``)."""
    out: dict[str, Any] = {}
    specs = {c.name: c for c in model.clusters} if model is not None else {}
    for (cluster, member), health in sorted(runtime.health.items()):
        spec = specs.get(cluster)
        entry: dict[str, Any] = {**health.to_dict()}
        if spec is not None and health.kind == "degraded" and health.moves \
                and not spec.high_availability:
            entry["share"] = round(share(spec, health.since, now), 4)
        elif spec is not None and health.kind == "probe":
            entry["share"] = spec.degradation.probe_share
        out.setdefault(cluster, {})[member] = entry
    return out
