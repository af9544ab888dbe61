"""Member state history in etcd: the last state change of every member, its reason and
time, and how many failovers the member has caused (``cphaprob state``'s "last state
change" and failover counter).

Every control-plane replica derives the same changes from the same etcd revisions, so
every replica may write them: a record carries the etcd revision of the change it
describes, and a write is a compare-and-swap that only moves that revision forward.
The first replica to write a change wins; the others find it already there and count
nothing twice. Writes run in the background, in order, and never delay a push.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aetcd

from meshxl.etcd.keys import Keys
from meshxl.model import MemberState, ModelSpec, RuntimeState, cluster_view
from meshxl.model.runtime import SERVING, MemberView
from meshxl.model.spec import choose

__all__ = ["Transition", "MemberHistory", "reason", "transitions"]

log = logging.getLogger(__name__)

_TXN_OPS = 64  # etcd's default --max-txn-ops is 128: stay well inside


@dataclass(frozen=True)
class Transition:
    """One member's state transition (``from_state`` -> ``to_state``), as seen by one
    rebuild."""

    cluster: str
    member: str
    from_state: str
    to_state: str
    reason: str

    @property
    def failover(self) -> bool:
        """The member served before and does not now, or was judged sick (degraded): its
        sessions moved (all of them, or in load sharing a share stepping down)."""
        return self.from_state in SERVING and (self.to_state not in SERVING
                                               or self.to_state == MemberState.DEGRADED)


def reason(view: MemberView | None, cluster: str, state: RuntimeState) -> str:
    """Why a member is in its state, in words an operator can act on."""
    if view is None:
        return "removed from the cluster"
    return choose(_REASONS, view.state, "member state")(view, cluster, state)


def _member_down(view: MemberView, cluster: str, state: RuntimeState) -> str:
    action = state.members_down_of(cluster).get(view.name)
    return _admin("member down", action.reason if action else "", action.by if action else "")


def _site_offline(view: MemberView, cluster: str, state: RuntimeState) -> str:
    action = state.sites_offline.get(view.site)
    return _admin(f"site {view.site} offline", action.reason if action else "",
                  action.by if action else "")


#: Member state -> why a member is in it.
_REASONS: dict[MemberState, Callable[[MemberView, str, RuntimeState], str]] = {
    MemberState.READY: lambda view, cluster, state: "ready",
    MemberState.OVERLOADED: lambda view, cluster, state:
        "overloaded (reported by the application): keeps its sessions, gets no new ones",
    MemberState.ATTENTION: lambda view, cluster, state: attention_reason(view),
    MemberState.RETURNING: lambda view, cluster, state: returning_reason(view, cluster, state),
    MemberState.ADMIN_DOWN: _member_down,
    MemberState.SITE_OFFLINE: _site_offline,
    MemberState.PROBLEM: lambda view, cluster, state:
        f"problem reported: {', '.join(view.problems)}",
    MemberState.SYNCING: lambda view, cluster, state: "registered, session cache still syncing",
    MemberState.LOST: lambda view, cluster, state: reason_lost(),
    MemberState.DEGRADED: lambda view, cluster, state: degraded_reason(view, cluster, state),
}


def degraded_reason(view: MemberView, cluster: str, state: RuntimeState) -> str:
    health = state.health_of(cluster).get(view.name)
    why = health.reason if health is not None else "judged sick"
    return f"degraded: {why}" + ("" if health is None or health.moves else " (report only)")


def attention_reason(view: MemberView) -> str:
    """Why a member that reported trouble serves all the same."""
    if view.problems:
        return (f"active with problems ({', '.join(view.problems)}): no other member can "
                "serve, so it keeps serving (failover.all_withdrawn)")
    return ("overloaded, and no other member of its tier is ready: it keeps taking new "
            "sessions (failover.all_withdrawn)")


def returning_reason(view: MemberView, cluster: str, state: RuntimeState) -> str:
    reg = state.registrations_of(cluster).get(view.name)
    since = f" since {reg.returning}" if reg is not None and reg.returning else ""
    return (f"came back{since}: held behind the members that serve until failback "
            "(failover.failback, failback_delay)")


def reason_lost() -> str:
    return "registration lease ended (sidecar gone or partitioned from etcd)"


def _admin(what: str, why: str, by: str) -> str:
    text = what
    if by:
        text += f" by {by}"
    if why:
        text += f": {why}"
    return text


def _views(model: ModelSpec, state: RuntimeState, cluster: str) -> dict[str, MemberView]:
    spec = model.cluster(cluster)
    if spec is None:
        return {}
    return {m.name: m for m in cluster_view(spec, state).members}


def transitions(model: ModelSpec, before: RuntimeState, after: RuntimeState) -> list[Transition]:
    """Every member whose state differs between two runtime states (pure).

    Clusters whose registrations and admin records did not change are skipped without
    building their views, so a rebuild after a one-member change costs one cluster.
    """
    found: list[Transition] = []
    offline_changed = before.sites_offline != after.sites_offline
    for spec in model.clusters:
        name = spec.name
        if (not offline_changed
                and before.registrations_of(name) == after.registrations_of(name)
                and before.members_down_of(name) == after.members_down_of(name)
                and before.health_of(name) == after.health_of(name)):
            continue
        old, new = _views(model, before, name), _views(model, after, name)
        for member in sorted(old.keys() | new.keys()):
            was, now = old.get(member), new.get(member)
            was_state = str(was.state) if was else str(MemberState.LOST)
            now_state = str(now.state) if now else str(MemberState.LOST)
            if was_state == now_state and (was is None or now is None
                                           or was.problems == now.problems):
                continue
            if now is None and member in before.registrations_of(name) \
                    and member not in after.registrations_of(name):
                why = reason_lost()
            else:
                why = reason(now, name, after)
            found.append(Transition(name, member, was_state, now_state, why))
    return found


def _now(at: float | None = None) -> str:
    when = datetime.now(UTC) if at is None else datetime.fromtimestamp(at, UTC)
    return when.isoformat(timespec="milliseconds")


class MemberHistory:
    """Writes :class:`Transition` records to etcd in the background (see the module doc)."""

    def __init__(self, client: aetcd.Client, keys: Keys, replica: str) -> None:
        self._client = client
        self._keys = keys
        self._replica = replica
        self._queue: asyncio.Queue[tuple[int, list[Transition], float | None]] = (
            asyncio.Queue())
        self._task: asyncio.Task[None] | None = None
        self.written = 0
        """Records this replica wrote (the others' were there first)."""
        self.last_error: str | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def record(self, seen: Iterable[Transition], revision: int,
               at: float | None = None) -> None:
        """Queue the transitions seen at etcd ``revision`` (no I/O here); ``at``: when
        the rebuild saw them (Unix seconds; default: when they are written), the time a
        warm-up ramp counts from (:mod:`meshxl.xds.warmup`)."""
        batch = list(seen)
        if batch:
            self._queue.put_nowait((revision, batch, at))

    async def _run(self) -> None:
        while True:
            revision, batch, at = await self._queue.get()
            for attempt in range(3):
                try:
                    await self._write(revision, batch, at)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    log.warning("member history at revision %d not written (%s)%s", revision,
                                self.last_error, "; retrying" if attempt < 2 else "")
                    await asyncio.sleep(0.2 * (attempt + 1))

    async def _write(self, revision: int, batch: list[Transition], at: float | None) -> None:
        for start in range(0, len(batch), _TXN_OPS):
            chunk = batch[start:start + _TXN_OPS]
            # Compare-and-swap against what we read; a lost race re-reads and drops what
            # the winner already wrote (its records carry this revision).
            for _ in range(5):
                if await self._swap(revision, chunk, at):
                    break

    async def _swap(self, revision: int, batch: list[Transition], at: float | None) -> bool:
        tx = self._client.transactions
        compare, success = [], []
        keys = [self._keys.member_state(c.cluster, c.member).encode() for c in batch]
        current = await asyncio.gather(*(self._client.get(k) for k in keys))
        for transition, key, got in zip(batch, keys, current, strict=True):
            old: dict[str, Any] = {}
            if got is not None:
                with contextlib.suppress(ValueError):
                    loaded = json.loads(got.value)
                    old = loaded if isinstance(loaded, dict) else {}
                if int(old.get("revision", 0) or 0) >= revision:
                    continue  # another replica (or an earlier pass) recorded it
                compare.append(tx.mod(key) == got.mod_revision)
            else:
                compare.append(tx.version(key) == 0)
            record = self._record(transition, revision, old, at)
            success.append(tx.put(key, json.dumps(record).encode()))
        if not success:
            return True
        ok, _ = await self._client.transaction(compare=compare, success=success, failure=[])
        if ok:
            self.written += len(success)
        return bool(ok)

    def _record(self, transition: Transition, revision: int, old: dict[str, Any],
                at: float | None = None) -> dict[str, Any]:
        now = _now(at)
        record = {
            "state": transition.to_state, "from": transition.from_state,
            "reason": transition.reason,
            "at": now, "revision": revision, "replica": self._replica,
            "failovers": int(old.get("failovers", 0) or 0) + (1 if transition.failover else 0),
            "last_failover": old.get("last_failover"),
        }
        if transition.failover:
            record["last_failover"] = {"at": now, "to_state": transition.to_state,
                                       "reason": transition.reason}
        return record
