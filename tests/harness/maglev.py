"""Envoy's Maglev table and a retry's re-picks, computed here to predict the real Envoy.

Envoy builds a cluster's table from its healthy hosts (``MaglevTable::
constructMaglevTableInternal``): each host, in the order of its hash key (``ip:port``),
has an offset ``xxHash64(key) % size`` and a skip ``xxHash64(key, 1) % (size - 1) + 1``,
and takes the next free slot of its permutation ``offset + skip * n`` in turns, a host
of half the largest weight every second turn. A request's slot is ``hash % size``; the
header hash policy's hash is ``xxHash64`` of the header's value.

A retry whose pick a retry host predicate (``previous_hosts``) rejects picks again up
to ``host_selection_retry_max_attempts`` times; pick ``i`` flips the hash's bits with
``~(i - 1)`` (``OriginalMaglevTable::chooseHost``), so a session's re-picks are about
a hundred *neighbouring* slots of the table, not independent ones. A member set whose
lighter members' permutations leave a long run of slots to the heavy member holds
sessions whose every re-pick is the heavy member: :func:`stranded` names them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import xxhash

_MASK = (1 << 64) - 1


def key_hash(value: str) -> int:
    """The hash Envoy's header hash policy gives a request carrying ``value``."""
    return xxhash.xxh64_intdigest(value.encode())


def table(hosts: Iterable[tuple[str, int]], size: int) -> list[str]:
    """The Maglev table of ``hosts`` (``(ip:port, weight)``, all healthy) as Envoy builds
    it: slot -> host key."""
    hosts = sorted(hosts)
    total = sum(weight for _, weight in hosts)
    weights = [weight * 1.0 / total for _, weight in hosts]
    heaviest = max(weights)
    offsets = [xxhash.xxh64_intdigest(key.encode()) % size for key, _ in hosts]
    skips = [xxhash.xxh64_intdigest(key.encode(), 1) % (size - 1) + 1 for key, _ in hosts]
    nexts = [0] * len(hosts)
    targets = [0.0] * len(hosts)
    slots: list[str | None] = [None] * size
    filled, turn = 0, 1
    while filled < size:
        for i, (key, _) in enumerate(hosts):
            if filled >= size:
                break
            if turn * weights[i] < targets[i]:
                continue
            targets[i] += heaviest
            while slots[slot := (offsets[i] + skips[i] * nexts[i]) % size] is not None:
                nexts[i] += 1
            slots[slot] = key
            nexts[i] += 1
            filled += 1
        turn += 1
    return [key for key in slots if key is not None]


def picks(slots: Sequence[str], value: str, repicks: int) -> list[str]:
    """The host of a request carrying ``value``, then those of its ``repicks`` re-picks."""
    h, size = key_hash(value), len(slots)
    return [slots[h % size]] + [slots[(h ^ (~(i - 1) & _MASK)) % size]
                                for i in range(1, repicks + 1)]


def stranded(slots: Sequence[str], values: Iterable[str], dead: str,
             repicks: int) -> set[str]:
    """The values whose request goes to ``dead`` and whose every re-pick is ``dead``
    too: their retries never leave it until it leaves the table."""
    return {v for v in values if set(picks(slots, v, repicks)) == {dead}}


__all__ = ["key_hash", "picks", "stranded", "table"]
