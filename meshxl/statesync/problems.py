"""Problems reported with a TTL: they end unless renewed, and they outlive a restart.

A member's problems (ClusterXL's critical devices, pnotes) come in two kinds:

* **without a TTL** (``PUT /v1/problems/NAME``): set until ``DELETE``, for the life of
  the sidecar process. A restarted sidecar starts without them, as a ClusterXL pnote
  registration lasts until reboot: nothing else guarantees that anybody would ever
  clear one whose reporter is gone.
* **with a TTL** (``{"ttl": "30s"}``): the problem ends TTL seconds after its last
  report unless the reporter sends it again (a heartbeat: the same PUT, as a Consul TTL
  check or keepalived's ``track_script`` is run again). A reporter that crashes or
  hangs cannot keep its member withdrawn. Such a problem is kept in etcd
  (``Keys.problem``) under a lease of its TTL, renewed with each report, so a sidecar
  that restarts restores it before it registers: the member does not serve between the
  sidecar's restart and the reporter's next heartbeat, and nothing outlives the TTL.

etcd counts lease TTLs in whole seconds (and never below its own minimum, about
1.5x the election timeout), so a restored problem may last up to that much longer
than its TTL; in the running sidecar the TTL is exact (a local timer).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aetcd import rpc

from meshxl import etcd
from meshxl.etcd.keys import Keys
from meshxl.model.limits import PROBLEM_TTL

__all__ = ["MAX_TTL", "MIN_TTL", "ProblemLeases", "Restored", "check_ttl"]

log = logging.getLogger(__name__)

MIN_TTL = PROBLEM_TTL.low
"""Shortest problem TTL (seconds): a heartbeat faster than this is a busy loop."""
MAX_TTL = PROBLEM_TTL.high
"""Longest problem TTL (a day): longer than that, report it without one."""

Call = Callable[[Callable[[etcd.Endpoint, float], Awaitable[Any]], str], Awaitable[Any]]


def check_ttl(ttl: float) -> float:
    """``ttl`` if it is a usable problem TTL, else ValueError saying what is."""
    if not PROBLEM_TTL.fits(ttl):  # finite, in range
        raise ValueError(f"a problem's ttl is {MIN_TTL:g} s to {MAX_TTL:g} s (a day), "
                         f"got {ttl!r}")
    return ttl


@dataclass(frozen=True)
class Restored:
    """A problem found in etcd at start, with the seconds its lease has left."""

    name: str
    detail: str
    since: str
    ttl: float
    remaining: float


def _time_to_live(lease: int) -> Callable[[etcd.Endpoint, float], Awaitable[Any]]:
    def ask(ep: etcd.Endpoint, timeout: float) -> Awaitable[Any]:
        # aetcd's gRPC stubs are untyped: the call is typed here, where it is made.
        call: Awaitable[Any] = ep.client.leasestub.LeaseTimeToLive(
            rpc.LeaseTimeToLiveRequest(ID=lease), timeout=timeout,
            metadata=ep.client.metadata)
        return call
    return ask


class ProblemLeases:
    """One member's problems with a TTL in etcd, each under a lease of its TTL.

    ``call(fn, what)`` runs one etcd request on a member that answers (the membership's
    balanced call). Every method may raise the etcd error; the caller decides whether
    that fails the report.
    """

    def __init__(self, keys: Keys, cluster: str, member: str, call: Call) -> None:
        self._keys = keys
        self._cluster = cluster
        self._member = member
        self._call = call
        self._leases: dict[str, tuple[int, float, str]] = {}  # name -> (lease, ttl, detail)

    def _key(self, name: str) -> bytes:
        return self._keys.problem(self._cluster, self._member, name).encode()

    async def keep(self, name: str, detail: str, since: str, ttl: float) -> None:
        """Store the problem under a lease of ``ttl`` or, when it is stored already with
        the same TTL and detail, renew that lease (a heartbeat writes nothing)."""
        held = self._leases.get(name)
        if held is not None and held[1] == ttl and held[2] == detail:
            if await self._renew(held[0]):
                return
        lease = await self._call(lambda ep, t: ep.client.leasestub.LeaseGrant(
            rpc.LeaseGrantRequest(TTL=math.ceil(ttl)), timeout=t,
            metadata=ep.client.metadata), "problem lease grant")
        value = json.dumps({"detail": detail, "since": since, "ttl": ttl}).encode()
        request = rpc.PutRequest(key=self._key(name), value=value, lease=lease.ID)
        await self._call(lambda ep, t: ep.client.kvstub.Put(
            request, timeout=t, metadata=ep.client.metadata), "problem write")
        self._leases[name] = (lease.ID, ttl, detail)
        if held is not None:  # the key is under the new lease now: the old one holds nothing
            await self._revoke(held[0])

    async def forget(self, name: str) -> None:
        """The problem ended (cleared or expired): its record goes."""
        held = self._leases.pop(name, None)
        if held is not None:
            await self._revoke(held[0])

    async def restore(self) -> list[Restored]:
        """The problems a previous sidecar of this member left with time to run; their
        leases are adopted (renewed by the next report)."""
        prefix = self._keys.problems_prefix(self._cluster, self._member).encode()
        end = prefix[:-1] + bytes([prefix[-1] + 1])
        found = await self._call(lambda ep, t: ep.client.kvstub.Range(
            rpc.RangeRequest(key=prefix, range_end=end), timeout=t,
            metadata=ep.client.metadata), "problem read")
        restored = []
        for kv in found.kvs:
            name = kv.key[len(prefix):].decode("utf-8", "replace")
            try:
                doc = json.loads(kv.value)
                detail, since, ttl = str(doc["detail"]), str(doc["since"]), float(doc["ttl"])
                check_ttl(ttl)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("problem record %s ignored: %s", name[:80], exc)
                continue
            if not kv.lease:
                continue
            left = await self._call(_time_to_live(kv.lease), "problem lease time to live")
            if left.TTL <= 0:
                continue
            self._leases[name] = (kv.lease, ttl, detail)
            restored.append(Restored(name, detail, since, ttl, float(left.TTL)))
        return restored

    async def _renew(self, lease: int) -> bool:
        reply = await self._call(lambda ep, t: etcd.keepalive(ep.client, lease, t),
                                 "problem lease keepalive")
        return reply is not None and reply.TTL > 0

    async def _revoke(self, lease: int) -> None:
        try:
            await self._call(lambda ep, t: ep.client.leasestub.LeaseRevoke(
                rpc.LeaseRevokeRequest(ID=lease), timeout=t, metadata=ep.client.metadata),
                "problem lease revoke")
        except rpc.AioRpcError as exc:
            if exc.code() != rpc.StatusCode.NOT_FOUND:  # expired already: nothing to do
                raise
