"""How the client behaves: timeouts, retries, connections (one frozen, validated object).

Two retry budgets, both a :class:`Backoff`:

* ``unavailable``: the same request again after a 503 (etcd does not answer) or no
  answer at all, with exponential backoff and jitter. Sized to ride over an etcd
  leader election or a member restart (about a second), not a long outage: the
  default waits at most 3.1 s in all before the last of its 6 tries.
* ``conflicts``: ``update`` reading and applying its function again after a 409 or
  412, short and fully jittered, so concurrent writers of one session spread out.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from meshxl.errors import InputError

__all__ = ["DEFAULT_URL", "Backoff", "ClientSettings"]

DEFAULT_URL = "http://127.0.0.1:7070"
"""The sidecar's default ``--listen`` address."""


@dataclass(frozen=True, kw_only=True)
class Backoff:
    """``attempts`` tries in all; before try n+2, a pause of ``first * factor**n``
    seconds, at most ``cap``, less a random part of up to ``jitter`` of it (0: exact,
    1: anywhere between 0 and the nominal pause)."""

    attempts: int = 6
    first: float = 0.1
    factor: float = 2.0
    cap: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not 1 <= self.attempts <= 1000:
            raise InputError(f"Backoff.attempts must be 1 to 1000, got {self.attempts}")
        if not (0 <= self.first <= 60 and 0 <= self.cap <= 600):
            raise InputError(f"Backoff.first (0-60 s) and cap (0-600 s) are out of range: "
                             f"{self.first}, {self.cap}")
        if not 1 <= self.factor <= 10:
            raise InputError(f"Backoff.factor must be 1 to 10, got {self.factor}")
        if not 0 <= self.jitter <= 1:
            raise InputError(f"Backoff.jitter must be 0 to 1, got {self.jitter}")

    def nominal(self) -> list[float]:
        """The pauses before tries 2..attempts, without jitter (the longest they get)."""
        return [min(self.cap, self.first * self.factor ** n) for n in range(self.attempts - 1)]

    def delays(self, rng: random.Random) -> Iterator[float]:
        """The pauses with jitter, drawn from ``rng``: each in ``[d * (1 - jitter), d]``."""
        for pause in self.nominal():
            yield pause * (1.0 - self.jitter * rng.random())

    @property
    def budget(self) -> float:
        """The longest the pauses add up to."""
        return sum(self.nominal())


NO_RETRY = Backoff(attempts=1)


@dataclass(frozen=True, kw_only=True)
class ClientSettings:
    """Everything but the address and the token."""

    timeout: float = 10.0
    """Seconds for one request and its answer, waiting for a free connection included
    (longer than the sidecar's own 5 s etcd deadline, so a slow etcd comes back as the
    sidecar's 503, not as a client timeout). Both clients hold every request to it
    as a whole (connecting, writing, every read), whatever the peer does: a slow drip or
    a flood of interim answers cannot stretch it."""
    connect_timeout: float = 2.0
    """Seconds to connect (the sidecar is on loopback: a refusal is immediate)."""
    unavailable: Backoff = field(default_factory=Backoff)
    """Retries after a 503 or no answer."""
    conflicts: Backoff = field(default_factory=lambda: Backoff(
        attempts=8, first=0.005, factor=2.0, cap=0.1, jitter=1.0))
    """``update``'s reads and writes again after a 409 or 412."""
    max_connections: int = 100
    """Connections to the sidecar at once (the async client; more requests wait for
    one, within ``timeout``); idle ones the sync client keeps."""
    pipeline: int = 16
    """Requests the async client sends on one connection before their answers come
    (HTTP/1.1 pipelining; 1: one at a time). Requests made together leave in one write
    and their answers come back in one read: on loopback, the system calls per request,
    not the bytes, are what a request costs. The sidecar runs a connection's pipelined
    session writes side by side (each session's in order), anything else in turn."""
    keepalive: float = 15.0
    """Seconds an idle connection is kept for reuse: under the sidecar's 30 s, so the
    client never reuses one the server is closing."""
    max_answer: int = 64 * 1024 * 1024
    """Bytes of an answer's body at most (a larger one is refused, its connection
    dropped): the sidecar's largest answers are bulk reads of at most 1 MiB sessions,
    so a broken or hostile peer cannot make the client hold more."""

    def __post_init__(self) -> None:
        if not 0 < self.timeout <= 600:
            raise InputError(f"timeout must be above 0 and at most 600 s, got {self.timeout}")
        if not 0 < self.connect_timeout <= 600:
            raise InputError("connect_timeout must be above 0 and at most 600 s, got "
                             f"{self.connect_timeout}")
        if not 1 <= self.max_connections <= 1024:
            raise InputError(f"max_connections must be 1 to 1024, got {self.max_connections}")
        if not 1 <= self.pipeline <= 128:
            raise InputError(f"pipeline must be 1 to 128, got {self.pipeline}")
        if not 1024 <= self.max_answer <= 1024 ** 3:
            raise InputError(f"max_answer must be 1 KiB to 1 GiB, got {self.max_answer}")
        if not 0 <= self.keepalive <= 29:
            raise InputError("keepalive must be 0 to 29 s (the sidecar closes idle "
                             f"connections after 30 s), got {self.keepalive}")
