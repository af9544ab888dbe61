"""What a sidecar has seen of one etcd cluster's history, from every answer it got.

Every etcd answer carries a header with the cluster's id and its revision when it
answered. The sidecar's reads and writes of sessions are linearizable (the session
store's batches and the cache's reads alike), so within one history an answer is never
below the revision of an answer received before its request was sent, whichever member
gives it. An answer below that, or from another cluster id, means the history was
replaced: etcd was restored from a backup (its revision goes back to the snapshot's), or
replaced by another cluster on the same address. So is a session that etcd now has at a
revision below the one this sidecar holds it at: a restore whose revision was moved past
every old one (``--bump-revision``, ``meshxl restore bump``) goes back nowhere else.

:class:`History` is that check, one per etcd cluster (with session shards, one per
shard: each cluster counts its own revisions). Everything that asks etcd about sessions
reports the answer here, watch or not (``store.py``'s batches, ``cache.py``'s reads),
and whoever keeps state from before (the session cache and what the member observed of
each session) hears of a rewind from here, once, whichever path saw it first
(:meth:`History.listen`). A watch's events are no answers to a question sent after
another one (a watch may lag on its member); they only raise what was seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from meshxl.errors import Unavailable

__all__ = ["Floor", "History", "Rewound"]


class Rewound(Unavailable):
    """etcd's revision is below one this sidecar saw, or its cluster id changed: its
    history was replaced (what was kept from it is dropped, and read again)."""

    def __init__(self, applied: int, now: int, cluster: tuple[int, int] | None = None,
                 *, session: str | None = None):
        if cluster is not None:
            message = f"etcd's cluster id changed from {cluster[0]:x} to {cluster[1]:x}"
        elif session is not None:
            message = (f"etcd's revision went back: session {session!r} is at revision "
                       f"{now} in etcd, below revision {applied} this sidecar had of it")
        else:
            message = f"etcd's revision went back from {applied} to {now}"
        super().__init__(message)
        self.applied, self.now, self.cluster = applied, now, cluster


Floor = tuple[int, int]
"""What was seen when a request was sent: (the history's generation, its highest
revision). An answer is compared with it, not with what other answers brought since:
requests in flight together may be answered in any order."""


class History:
    """One etcd cluster's history as this sidecar saw it (the module docstring)."""

    def __init__(self) -> None:
        self.highest = 0
        """The highest revision any answer (or watch event) of this history carried."""
        self.cluster_id = 0
        """The cluster id answers carry (0: none yet)."""
        self.generation = 0
        """How many times the history was found replaced."""
        self.answered_at = 0.0
        """``time.monotonic()`` of the last answer (0: none yet)."""
        self._listeners: list[Callable[[Rewound], None]] = []

    def listen(self, listener: Callable[[Rewound], None]) -> None:
        """Call ``listener`` with each rewind found, whichever path found it."""
        self._listeners.append(listener)

    def floor(self) -> Floor:
        """Taken just before a request is sent, for :meth:`answered`."""
        return self.generation, self.highest

    def answered(self, header: Any, floor: Floor) -> Rewound | None:
        """etcd's answer (its ``ResponseHeader``) to a linearizable request sent at
        ``floor``: the rewind it shows (after telling the listeners), or None."""
        revision, cluster = int(header.revision), int(header.cluster_id)
        self.answered_at = time.monotonic()
        if floor[0] != self.generation:  # sent before a rewind found since: of which
            return None                  # history, who can tell
        known = self.cluster_id
        if known and cluster and cluster != known:
            rewound = Rewound(self.highest, revision, (known, cluster))
        elif revision < floor[1]:
            rewound = Rewound(self.highest, revision)
        else:
            rewound = None
        if rewound is None:
            if revision > self.highest:
                self.highest = revision
            if cluster and not known:
                self.cluster_id = cluster
            return None
        self._replaced(rewound, revision, cluster or known)
        return rewound

    def went_back(self, session: str, held: int, now: int) -> Rewound:
        """A session etcd has at revision ``now`` (not 0), below revision ``held`` this
        sidecar had of it from etcd before asking: the rewind (listeners told). The
        answer that said so was not below what was seen (else :meth:`answered` found
        it first): the history's revision was moved past the old one, which still
        bounds it from below."""
        rewound = Rewound(max(held, self.highest), now, session=session)
        self._replaced(rewound, self.highest, self.cluster_id)
        return rewound

    def watched(self, revision: int) -> None:
        """A watch brought ``revision`` (committed: no later answer may be below it)."""
        if revision > self.highest:
            self.highest = revision

    def _replaced(self, rewound: Rewound, highest: int, cluster: int) -> None:
        """The history starts again, at ``highest``; everyone keeping state hears it."""
        self.generation += 1
        self.highest, self.cluster_id = highest, cluster
        for listener in self._listeners:
            listener(rewound)
