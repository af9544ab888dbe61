"""Failback hysteresis: a member that comes back is held behind the members that serve.

A member that left the serving set by its own doing (a problem reported, its cache
re-reading etcd, its registration expiring, its sidecar restarting after a failover)
and then came back is
"returning": its registration says ``returning: {"since": ..., "behind": [...]}``,
naming the members that served when it came back, and every part that computes the
cluster's view (``model.cluster_view``: the control plane, the operator commands, this
sidecar) places it right after them while one of them serves. It is their standby
(it takes over when they fail, ahead of the other standbys), but takes its own place
back only when:

* ``failover.failback: automatic`` (ClusterXL's Primary Up): it has stayed well (ready,
  no problem) for ``failover.failback_delay``; every new problem or loss of sync starts
  the wait again. A member that flaps faster than the delay moves no session back
  until it stops flapping: sessions move away at its first fall and back once.
* ``failover.failback: manual`` (Active Up): none of the members it stood behind
  serves any more: the member that took over failed, or an operator moved the active
  role (``meshxl member down`` on the active, then ``member up``).

The sidecar is the only writer of its registration, so it holds the state and its
timer here; the view stays a pure function of etcd's contents and every control-plane
replica computes the same. A member that never served (a new one) joins at once, and
so does one whose sidecar has no model to read the policy from (the hold is 0 then).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from meshxl.model.basics import Failback

__all__ = ["Rejoin"]

log = logging.getLogger(__name__)


class Failover(Protocol):
    """What the hold reads of a cluster's ``failover`` settings
    (:class:`meshxl.model.spec.Failover`)."""

    @property
    def failback(self) -> Failback: ...
    @property
    def failback_delay(self) -> float: ...


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Rejoin:
    """Whether this member is returning, and when it stops (see the module doc).

    ``changed()`` is called (synchronously) whenever :attr:`returning` changes on its
    own (the failback delay ran out, the policy changed); a change caused by
    :meth:`well` is returned to the caller instead, which writes it with the change
    that caused it (one registration write: the control plane never sees the member
    back without the hold).
    """

    def __init__(self, changed: Callable[[], None]) -> None:
        self._changed = changed
        self.serving: Callable[[], tuple[str, ...]] = tuple
        """The members that serve now, in this member's view of the cluster (the
        sidecar sets it): the ones a member that comes back stands behind."""
        self.failback: Failback = "automatic"
        self.delay = 0.0
        self.served = False
        """The member served before: in this process, or a failover was recorded for it
        before its sidecar (re)started."""
        self.returning: dict[str, Any] | None = None
        """``{"since", "why", "behind"}`` while held, else None."""
        self._well = False
        self._release: asyncio.TimerHandle | None = None

    @property
    def holds(self) -> bool:
        """Whether the policy holds a member that comes back at all."""
        return self.failback == "manual" or self.delay > 0

    def configure(self, failover: Failover | None) -> None:
        """The cluster's ``failover`` settings (None: no model, no hold). Called on every
        change of the mesh: only a change of the settings touches the running wait."""
        failback: Failback = failover.failback if failover is not None else "automatic"
        delay = failover.failback_delay if failover is not None else 0.0
        if (failback, delay) == (self.failback, self.delay):
            return
        self.failback, self.delay = failback, delay
        if self.returning is not None and not self.holds:
            self._end("the cluster no longer holds members that come back")
        elif self._well:
            self._arm()

    def well(self, well: bool, why: str, *, back: bool = True) -> bool:
        """The member is (or is no longer) able to serve by its own state: registered,
        caught up, no problem. ``back``: becoming well means it comes back (it was
        withdrawn meanwhile). True when :attr:`returning` changed."""
        if well == self._well:
            return False
        self._well = well
        if not well:
            self._disarm()
            return False
        changed = False
        behind = self.serving() if (back and self.served and self.returning is None
                                    and self.holds) else ()
        if behind:  # nobody serving: nothing to stand behind, it takes its place
            self.returning = {"since": _now(), "why": why, "behind": list(behind)}
            log.info("member back (%s): held behind %s until failback (%s%s)", why,
                     ", ".join(behind), self.failback,
                     f", {self.delay:g} s" if self.failback == "automatic" else "")
            changed = True
        self.served = True
        self._arm()
        return changed

    def unheld(self) -> None:
        """The cluster's view no longer holds the member (none of the members it stood
        behind serves): the hold is over."""
        self._end("none of the members it stood behind serves any more")

    def cancel(self) -> None:
        self._disarm()

    def _arm(self) -> None:
        self._disarm()
        if self.returning is None or self.failback != "automatic" or not self._well:
            return
        self._release = asyncio.get_running_loop().call_later(
            self.delay, self._end, f"well for {self.delay:g} s")

    def _disarm(self) -> None:
        if self._release is not None:
            self._release.cancel()
            self._release = None

    def _end(self, why: str) -> None:
        self._disarm()
        if self.returning is None:
            return
        self.returning = None
        log.info("member takes its place back: %s", why)
        self._changed()
