"""The judge at work: every :data:`~meshxl.xds.health.WINDOW` it judges the members from
the requests the Envoys logged, and keeps this replica's judgements in etcd (under the
replica's lease, so they end with it) or, without etcd, in memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from meshxl.etcd.keys import Keys
from meshxl.model import ModelSpec, RuntimeState
from meshxl.model.records import Health

from .health import WINDOW, Judge, Judgement, Samples, share
from .loadshares import LoadShares

log = logging.getLogger(__name__)

__all__ = ["Judging", "cut", "report"]


class Judging:
    """One replica's judge, its loop and its records."""

    def __init__(self, replica: str, keys: Keys, samples: Samples,
                 on_change: Callable[[], None]) -> None:
        self.replica = replica
        self.keys = keys
        self.samples = samples
        self.judge = Judge(replica)
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
                for (cluster, member), health in puts.items():
                    log.warning("%s/%s: %s (%s)", cluster, member, health.kind, health.reason)
                for cluster, member in deletes:
                    log.info("%s/%s: judgement ended", cluster, member)
                if client is None:
                    for key in deletes:
                        self.local.pop(key, None)
                    self.local.update(puts)
                    self.on_change()
                else:
                    await self._write(client, lease() if lease else None, puts, deletes)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("judging the members failed (tried again next window)")

    async def _write(self, client: Any, lease: Any, puts: Mapping[tuple[str, str], Health],
                     deletes: list[tuple[str, str]]) -> None:
        """One transaction: the records put under the lease, this replica's old ones
        removed."""
        if lease is None and puts:
            return  # no lease yet: the next window tries again
        tx = client.transactions
        ops: list[Any] = []
        for (cluster, member), health in puts.items():
            value = json.dumps(health.to_dict()).encode()
            ops.append(tx.put(self.keys.member_health(cluster, member).encode(), value,
                              lease=lease))
        for cluster, member in deletes:
            ops.append(tx.delete(self.keys.member_health(cluster, member).encode()))
        await client.transaction(compare=[], success=ops, failure=[])


def cut(*parts: Mapping[str, Mapping[str, float]]) -> Mapping[str, Mapping[str, float]]:
    """Per cluster and member, the product of the fractions of their weight each part
    gives them (the warm-up ramp's, a degraded member's, a load-based share)."""
    live = [p for p in parts if p]
    if len(live) <= 1:
        return live[0] if live else {}
    out: dict[str, dict[str, float]] = {}
    for part in live:
        for cluster, members in part.items():
            mine = out.setdefault(cluster, {})
            for member, fraction in members.items():
                mine[member] = mine.get(member, 1.0) * fraction
    return out


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
