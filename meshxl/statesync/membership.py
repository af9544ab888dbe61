"""A member's registration in etcd, held under the sidecar's own lease.

This is ClusterXL's CCP and critical devices (pnotes) for a mesh member: the sidecar
writes ``Keys.member(cluster, member)`` under a lease it keeps alive, so the xDS control
plane (``membership: registered`` clusters) advertises the member to Envoy only while
the sidecar lives, only once it reports ``ready`` (its cache caught up: "syncing"
before that), and withdraws it while the application reports any problem.

When the sidecar dies, nothing deletes the key: etcd does when the lease expires, so
the member disappears from Envoy at most about ``ttl`` seconds (rounded up to whole
seconds, and never below etcd's own minimum lease TTL) after the last keepalive, plus
the control plane's debounce and the xDS push. A graceful :meth:`Membership.stop`
revokes the lease and the key goes at once.

The keepalive refreshes every ``ttl / 3``. Every lease grant, keepalive and
registration write goes to an etcd member that answers (``meshxl/etcd/balancer.py``), with a
short deadline per attempt, and is sent again to another member (or to the same one
once it has a new leader) when its member goes: a fault of one etcd member, the
leader included, costs a healthy member neither its lease nor its registration. The
lease counts as lost only when etcd says it is gone (for example the process was paused
with SIGSTOP longer than its TTL, or cut off from etcd that long). A refresh that has not
succeeded for a whole TTL makes :attr:`Membership.registered` False at once, but the
lease is asked about before it is given up: a new etcd leader extends every lease by its
election timeout, so an election that held keepalives up longer than ``ttl - ttl/3``
costs no lease (counting it lost then would rewrite every member's registration after
each election). Then :attr:`Membership.lease_losses` counts one, and the task grants a
new lease and writes the registration again, retrying with bounded backoff until etcd
answers.

Readiness depends on the member's own state: :meth:`Membership.not_ready_reason` is set
only until the first registration is written. A lease lost later is the control
plane's business (it withdraws the member whose key is gone); failing the health check
for it as well would make every member not ready at once whenever etcd cannot grant
leases for a moment (a leader election), which is what Envoy must never see.

While etcd does not answer at all (down, or this member cut off from it),
:attr:`Membership.etcd_unreachable` says so. The lease cannot be confirmed then, but the
member is no less able to serve than any other: the sidecar stays ready (see
``Sidecar.not_ready_reasons``) rather than failing its health check together with every
other member. If only this member is cut off, its lease ends in etcd and the control
plane withdraws it from Envoy all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import aetcd
from aetcd import rpc
from aetcd.exceptions import ConnectionFailedError, ConnectionTimeoutError

from meshxl import etcd
from meshxl.etcd.keys import Keys
from meshxl.model import Registration
from meshxl.model.limits import LEASE_TTL

from .failback import Rejoin
from .problems import ProblemLeases, check_ttl
from .registration import now as _now
from .registration import registration_document

__all__ = ["MIN_TTL", "Membership", "no_answer", "registration_document"]

log = logging.getLogger(__name__)

MIN_TTL = LEASE_TTL.low
"""Smallest accepted lease TTL (seconds; ``--lease-ttl``'s range,
:data:`meshxl.model.limits.LEASE_TTL`). etcd rounds TTLs up to whole seconds and to its
own minimum (about 1.5x the election timeout: 2 s with etcd's defaults)."""

_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 2.0


MAX_PROBLEMS = 32
"""Problems a member reports at once: each is stored in its registration."""


def no_answer(exc: BaseException) -> bool:
    """etcd did not answer (down, unreachable, no quorum), as opposed to refusing."""
    if isinstance(exc, TimeoutError | ConnectionFailedError | ConnectionTimeoutError | OSError
                  | etcd.EtcdUnavailable | etcd.MemberChanged):
        return True
    return isinstance(exc, rpc.AioRpcError) and exc.code() in (
        rpc.StatusCode.UNAVAILABLE, rpc.StatusCode.DEADLINE_EXCEEDED)


class Membership:
    """A member's registration in etcd under its own lease: it disappears from Envoy
    when the sidecar dies (lease ends), appears only when ready, and is withdrawn while
    the app reports a problem (ClusterXL critical devices / pnotes).

    State changes (:meth:`set_ready`, :meth:`set_problem`, :meth:`clear_problem`) are
    kept locally and written one at a time, the latest state winning. A write that etcd
    refuses does not raise: it is logged, kept in :attr:`last_error`, and retried by the
    keepalive task (which also rewrites everything after a lease loss).
    """

    def __init__(self, client: aetcd.Client, keys: Keys, cluster: str, member: str, *,
                 address: str, port: int, site: str | None = None, weight: int | None = None,
                 ttl: float = 3.0, sidecar: str = "",
                 istio: Mapping[str, str] | None = None, key: str | None = None) -> None:
        """``key``: the key kept under the lease (default: the member's registration
        in ``cluster``; a pool member's liveness key, :mod:`.pool_liveness`)."""
        try:
            LEASE_TTL.check(ttl, "membership lease ttl")
        except ValueError as exc:
            raise ValueError(
                f"{exc}: etcd leases shorter than about 2 s expire spuriously (use 2-10 s; "
                "the member leaves Envoy at most about ttl seconds after its sidecar "
                "dies)") from None
        self.client = client
        self.cluster = cluster
        self.member = member
        # ValueError on a bad cluster/member name
        self.key = keys.member(cluster, member) if key is None else key
        self.ttl = float(ttl)
        self.address = address
        self.port = port
        self.site = site
        self.weight = weight
        self.sidecar = sidecar
        self.istio = dict(istio) if istio is not None else None
        """Its pod's Istio endpoint metadata (``tls_mode``, ``workload``), under Istio."""
        self.lease_id: int | None = None
        self.shard_map: int | None = None
        """The session shard map version this sidecar serves (None: not sharded)."""
        self.sync_delay = 0.0
        """The sidecar's ``sync_delay`` (delayed sync), told to the control plane."""
        self.lease_losses = 0
        self.registrations = 0
        """Registrations written (the first at start, then one after each lease loss)."""
        self.last_error: str | None = None
        """The latest etcd trouble (kept after recovery, for status pages)."""
        self._failing = False
        self._unreachable_since: float | None = None  # monotonic; None: etcd answers
        self._ready = False
        self._problems: dict[str, dict[str, Any]] = {}
        self._expiry: dict[str, asyncio.TimerHandle] = {}  # problems with a TTL
        self.problem_leases = ProblemLeases(keys, cluster, member,
                                            lambda fn, what: self._call(fn, what))
        self.rejoin = Rejoin(self._rejoined)
        """Whether the member is held as "returning" after trouble (failback.py)."""
        self._pending: set[asyncio.Task[Any]] = set()
        self._overload: dict[str, str] | None = None
        self._since = ""
        self._version = 0          # bumped on every local change
        self._written = -1         # version last written under the current lease
        self._expires = 0.0        # monotonic time the current lease ends unless refreshed
        self._write_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        # Refuse at construction what the control plane would refuse to read.
        Registration.from_dict(self._document())

    # -- state ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def problems(self) -> dict[str, dict[str, Any]]:
        """Reported problems: name -> {"detail", "since"} and, for one reported with a
        TTL, "ttl" (seconds; it ends that long after its last report) (a copy)."""
        return {name: dict(info) for name, info in self._problems.items()}

    @property
    def registered(self) -> bool:
        """The lease is (as far as we know) alive and carries the registration."""
        return (self.lease_id is not None and self._written >= 0
                and time.monotonic() < self._expires)

    def not_ready_reason(self) -> str | None:
        """Why the member must not be advertised, as far as its registration goes: only
        before its first registration (see the module docstring)."""
        if self.registrations == 0:
            return "not registered in etcd yet"
        return None

    @property
    def etcd_unreachable(self) -> bool:
        """etcd has not answered this member's keepalives or registration since the
        last success: an etcd outage, or this member is cut off from etcd."""
        return self._unreachable_since is not None

    @property
    def unreachable_for(self) -> float | None:
        """Seconds etcd has not answered for, None while it answers."""
        since = self._unreachable_since
        return None if since is None else time.monotonic() - since

    @property
    def interval(self) -> float:
        """Seconds between keepalives."""
        return self.ttl / 3

    def _document(self) -> dict[str, Any]:
        return registration_document(
            address=self.address, port=self.port, site=self.site, weight=self.weight,
            ready=self._ready, problems=self._problems, sidecar=self.sidecar,
            pid=os.getpid(), since=self._since, updated=_now(), overload=self._overload,
            returning=self.rejoin.returning, shard_map=self.shard_map,
            sync_delay=self.sync_delay, istio=self.istio)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Grant the lease, write the registration (ready=False unless set before), and
        start the keepalive. Raises the etcd error if this first registration fails."""
        if self._task is not None:
            raise RuntimeError("membership already started")
        self._stopped = False
        self._since = _now()
        await self._restore_problems()
        await self._register()
        self._task = asyncio.get_running_loop().create_task(
            self._keepalive(), name=f"membership {self.cluster}/{self.member}")

    async def stop(self, *, revoke: bool = True) -> None:
        """Stop the keepalive; with ``revoke`` (graceful) the registration goes at once,
        without it it stays until the lease expires (what a crash looks like)."""
        self._stopped = True
        self.rejoin.cancel()
        for timer in self._expiry.values():
            timer.cancel()
        self._expiry.clear()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        async with self._write_lock:
            lease_id, self.lease_id = self.lease_id, None
            self._written = -1
            if revoke and lease_id is not None:
                try:
                    await self._call(lambda ep, t: ep.client.leasestub.LeaseRevoke(
                        rpc.LeaseRevokeRequest(ID=lease_id), timeout=t,
                        metadata=ep.client.metadata), "lease revoke")
                except Exception as exc:  # it expires on its own within ttl
                    self.last_error = f"revoke: {type(exc).__name__}: {exc}"
                    log.warning("member %s/%s: lease not revoked (%s); the registration "
                                "expires within %g s", self.cluster, self.member, exc,
                                self.ttl)

    # -- changes -------------------------------------------------------------------------

    async def set_shard_map(self, version: int) -> None:
        """Say in the registration that this sidecar serves shard map ``version``."""
        if version != self.shard_map:
            self.shard_map = version
            await self._changed()

    async def set_ready(self, ready: bool) -> None:
        """Advertise (True) or hold back as "syncing" (False); no-op if unchanged."""
        if ready == self._ready:
            return
        self._ready = ready
        self.rejoin.well(self._well(), "its cache caught up again")
        await self._changed()

    def _well(self) -> bool:
        """Able to serve by its own state: registered, caught up, no problem."""
        return self._ready and not self._problems and self.lease_id is not None

    def _rejoined(self) -> None:
        """The hold ended on its own (failback delay, policy): write it."""
        task = asyncio.get_running_loop().create_task(self._changed())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def set_problem(self, name: str, detail: str = "", ttl: float | None = None) -> bool:
        """Report a problem: the member is withdrawn while any is set (unless no other
        member can serve: ``failover.all_withdrawn``). With ``ttl`` the problem ends
        that many seconds after this report unless reported again (problems.py). True
        if new."""
        if not name or len(name) > 63 or len(detail) > 1024:
            raise ValueError("a problem needs a name of 1-63 characters and a detail of "
                             "at most 1024 (both are stored in the registration)")
        if ttl is not None:
            check_ttl(ttl)
        info = self._problems.get(name)
        if info is None and len(self._problems) >= MAX_PROBLEMS:
            raise ValueError(f"at most {MAX_PROBLEMS} problems at once")
        created = info is None
        if info is None:
            info = self._problems[name] = {"detail": detail, "since": _now()}
            changed = True
        else:
            changed = info["detail"] != detail or info.get("ttl") != ttl
            info["detail"] = detail
        had_ttl = "ttl" in info
        if ttl is None:
            info.pop("ttl", None)
        else:
            info["ttl"] = ttl
        self._expire_in(name, ttl)
        await self._persist(name, info, ttl, had_ttl)
        self.rejoin.well(self._well(), "")
        if changed:
            await self._changed()
        return created

    def _expire_in(self, name: str, ttl: float | None) -> None:
        timer = self._expiry.pop(name, None)
        if timer is not None:
            timer.cancel()
        if ttl is not None:
            self._expiry[name] = asyncio.get_running_loop().call_later(
                ttl, self._expired, name, ttl)

    def _expired(self, name: str, ttl: float) -> None:
        self._expiry.pop(name, None)
        log.warning("member %s/%s: problem %s not reported again within its ttl (%g s): "
                    "cleared", self.cluster, self.member, name, ttl)
        task = asyncio.get_running_loop().create_task(self.clear_problem(name))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _persist(self, name: str, info: dict[str, Any], ttl: float | None,
                       had_ttl: bool) -> None:
        """Keep a problem with a TTL in etcd (it outlives a restart until its TTL
        ends); best effort: the registration is what withdraws the member."""
        try:
            if ttl is not None:
                await self.problem_leases.keep(name, info["detail"], info["since"], ttl)
            elif had_ttl:
                await self.problem_leases.forget(name)
        except Exception as exc:
            self._failed(f"problem {name} not kept in etcd", exc)

    async def _restore_problems(self) -> None:
        """Problems with a TTL a previous sidecar of this member reported, still
        running: restored before the first registration (problems.py)."""
        try:
            restored = await self.problem_leases.restore()
        except Exception as exc:
            self._failed("problems of the previous sidecar not read", exc)
            return
        for p in restored:
            if p.name in self._problems or len(self._problems) >= MAX_PROBLEMS:
                continue
            self._problems[p.name] = {"detail": p.detail, "since": p.since, "ttl": p.ttl}
            self._expire_in(p.name, p.remaining)
            log.warning("member %s/%s: problem %s restored from before the restart "
                        "(%.0f s of its ttl left)", self.cluster, self.member, p.name,
                        p.remaining)

    @property
    def overload(self) -> dict[str, str] | None:
        """The application's overload report ({"detail", "since"}), or None (a copy)."""
        return dict(self._overload) if self._overload is not None else None

    async def set_overload(self, detail: str = "") -> bool:
        """The application is overloaded: the member keeps the sessions pinned to it and
        gets no new ones while another member of its tier is ready. True if new."""
        if len(detail) > 1024:
            raise ValueError("an overload detail has at most 1024 characters (it is "
                             "stored in the registration)")
        if self._overload is not None:
            if self._overload["detail"] == detail:
                return False
            self._overload["detail"] = detail
            await self._changed()
            return False
        self._overload = {"detail": detail, "since": _now()}
        await self._changed()
        return True

    async def clear_overload(self) -> bool:
        """The overload is over; True if one was reported."""
        if self._overload is None:
            return False
        self._overload = None
        await self._changed()
        return True

    async def clear_problem(self, name: str) -> bool:
        """Clear a problem; True if it was set."""
        info = self._problems.pop(name, None)
        if info is None:
            return False
        self._expire_in(name, None)
        if "ttl" in info:
            await self._persist(name, info, None, True)
        # Back with the hold, if any, in the same write (the control plane never sees
        # the member back without it).
        self.rejoin.well(self._well(), f"problem {name} cleared")
        await self._changed()
        return True

    async def _changed(self) -> None:
        self._version += 1
        if self.lease_id is not None and not self._stopped:
            try:
                await self._write()
            except Exception as exc:
                self._failed("registration not written (retrying)", exc)
                self._wake.set()

    # -- etcd ------------------------------------------------------------------------------

    async def _write(self, *, force: bool = False) -> None:
        """Put the latest state under the current lease, one put at a time.

        Callers that queued behind an in-flight put find their change already written
        by whoever went next, which carried the latest state.
        """
        async with self._write_lock:
            lease_id = self.lease_id
            if lease_id is None or (self._written == self._version and not force):
                return
            version = self._version
            value = json.dumps(self._document(), sort_keys=True).encode()
            request = rpc.PutRequest(key=self.key.encode(), value=value, lease=lease_id)
            await self._call(lambda ep, t: ep.client.kvstub.Put(
                request, timeout=t, metadata=ep.client.metadata), "registration write")
            if self.lease_id == lease_id:
                self._written = max(self._written, version)

    async def _register(self) -> None:
        """Grant a new lease and write the registration under it."""
        started = time.monotonic()
        withdrawn = self.registrations > 0 and await self._registration_gone()
        lease = await self._call(lambda ep, t: ep.client.leasestub.LeaseGrant(
            rpc.LeaseGrantRequest(TTL=math.ceil(self.ttl)), timeout=t,
            metadata=ep.client.metadata), "lease grant")
        async with self._write_lock:
            self.lease_id = lease.ID
            self._written = -1
            self._expires = started + lease.TTL
            self.rejoin.well(self._well(), "registered again after its registration ended",
                             back=withdrawn)
        try:
            await self._write(force=True)
        except BaseException:
            self.lease_id = None
            self.rejoin.well(False, "")
            with contextlib.suppress(Exception):
                await self._call(lambda ep, t: ep.client.leasestub.LeaseRevoke(
                    rpc.LeaseRevokeRequest(ID=lease.ID), timeout=t,
                    metadata=ep.client.metadata), "lease revoke", timeout=1.0)
            raise
        self.registrations += 1
        self._failing = False
        self._answered()
        log.info("member %s/%s registered under lease %x (ttl %d s)", self.cluster,
                 self.member, lease.ID, lease.TTL)

    async def _registration_gone(self) -> bool:
        """Whether the previous registration ended in etcd (its lease expired: the
        control plane withdrew the member) before this one. A lease given up while etcd
        was away, with the registration still there, withdrew nothing: an etcd outage
        makes no member "come back" (failback.py)."""
        try:
            got = await self._call(lambda ep, t: ep.client.kvstub.Range(
                rpc.RangeRequest(key=self.key.encode(), count_only=True), timeout=t,
                metadata=ep.client.metadata), "registration read")
        except Exception:  # the write below fails the same way and is retried
            return False
        return int(got.count) == 0

    async def _refresh(self) -> bool:
        """One keepalive; False when etcd says the lease is gone."""
        lease_id = self.lease_id
        assert lease_id is not None
        started = time.monotonic()

        # Until the lease would end: a refresh that lands late still keeps it.
        remaining = self._expires - started
        reply = await self._call(lambda ep, t: etcd.keepalive(ep.client, lease_id, t),
                                 "lease keepalive",
                                 timeout=max(remaining, self.interval))
        if reply is None or reply.TTL <= 0:
            return False
        self._expires = max(self._expires, started + reply.TTL)
        return True

    async def _call(self, fn: Any, what: str, *, timeout: float | None = None) -> Any:
        """One etcd request on a member that answers, short attempts, retried elsewhere."""
        return await etcd.balancer_of(self.client).call(
            fn, timeout=max(self.ttl, 2.0) if timeout is None else timeout,
            attempt_timeout=min(etcd.ATTEMPT_TIMEOUT, max(self.interval, 0.5)), what=what)

    def _lost(self, why: str) -> None:
        self.lease_losses += 1
        self.last_error = why
        log.warning("member %s/%s: lease %s lost (%s); registering again", self.cluster,
                    self.member, f"{self.lease_id:x}" if self.lease_id else "-", why)
        self.lease_id = None
        self._written = -1
        self.rejoin.well(False, "")

    def _answered(self) -> None:
        if self._unreachable_since is not None:
            log.info("member %s/%s: etcd answers again after %.1f s", self.cluster,
                        self.member, time.monotonic() - self._unreachable_since)
        self._unreachable_since = None

    def _failed(self, what: str, exc: BaseException) -> None:
        if no_answer(exc) and self._unreachable_since is None:
            self._unreachable_since = time.monotonic()
        message = f"{type(exc).__name__}: {exc}".rstrip(": ")
        if not self._failing or self.last_error != message:  # once per streak and cause
            log.warning("member %s/%s: %s: %s", self.cluster, self.member, what, message)
        self._failing = True
        self.last_error = message

    async def _sleep(self, seconds: float) -> None:
        """Sleep, or less when a failed write asks for attention."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        self._wake.clear()

    async def _keepalive(self) -> None:
        """Refresh every ttl/3; re-register after a loss; never raise (but on cancel)."""
        backoff = _BACKOFF_MIN
        delay = self.interval
        while True:
            await self._sleep(delay)
            try:
                # A lease past its local deadline is asked about, not given up: a new
                # etcd leader extends every lease by its election timeout, so a keepalive
                # held up by an election (longer than ttl - interval) still finds it.
                if self.lease_id is None:
                    await self._register()
                elif not await self._refresh():
                    overdue = time.monotonic() >= self._expires
                    self._lost("etcd reports the lease gone" + (
                        f" (no keepalive had succeeded for {self.ttl:g} s)" if overdue else ""))
                    delay = 0.0  # register at once
                    continue
                elif self._written != self._version:
                    await self._write()
                backoff, delay, self._failing = _BACKOFF_MIN, self.interval, False
                self._answered()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed("keepalive failed (retrying)" if self.lease_id is not None
                             else "registration failed (retrying)", exc)
                # A lease that may still be alive is retried well within its TTL.
                delay = backoff if self.lease_id is None else min(backoff, self.interval)
                backoff = min(backoff * 2, _BACKOFF_MAX)
