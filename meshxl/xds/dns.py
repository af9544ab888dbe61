"""Member addresses that are host names, resolved by the control plane.

Envoy's own DNS cluster types (STRICT_DNS, LOGICAL_DNS) would make a cluster's
endpoints whatever DNS says, losing what meshxl decides per member: the EDS priority
(active, standby, backup), the weight, the site and the DRAINING state of a member
taken down. So the control plane resolves the names and sends one EDS endpoint per
resolved address, each carrying its member's priority, weight, site and state, the
host name kept in the endpoint's metadata (``filter_metadata.meshxl.address``).

Names are re-resolved every ``interval`` seconds (``serve xds --dns-interval``) and
at once when a new one appears. A failed resolution keeps the addresses the name last
resolved to (a DNS outage never withdraws a member) and is reported in the control
plane's status and log; a name that never resolved has no endpoint yet.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from meshxl.model import ModelSpec, RuntimeState, is_ip_literal

__all__ = ["MAX_ADDRESSES", "Resolution", "Resolver", "hostnames", "is_ip_literal",
           "resolve_names"]

log = logging.getLogger(__name__)

MAX_ADDRESSES = 32
"""Most addresses kept per name (the lowest, sorted): bounds the endpoints and the sum
of weights one member brings to Envoy."""
DEFAULT_INTERVAL = 5.0
DEFAULT_TIMEOUT = 2.0

Lookup = Callable[[str], Awaitable[list[str]]]


def hostnames(model: ModelSpec, runtime: RuntimeState | None = None) -> set[str]:
    """Every member address of the model and the registrations that is a name."""
    names = {m.address for c in model.clusters for m in c.members
             if not is_ip_literal(m.address)}
    if runtime is not None:
        names.update(r.address for r in runtime.registrations.values()
                     if not is_ip_literal(r.address))
    return names


async def _getaddrinfo(name: str) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(
        name, None, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [str(info[4][0]) for info in infos]


def _normalize(found: Iterable[str]) -> tuple[str, ...]:
    addresses = sorted({a for a in found if is_ip_literal(a)},
                       key=lambda a: (":" in a, ipaddress.ip_address(a)))
    return tuple(addresses[:MAX_ADDRESSES])


@dataclass(frozen=True)
class Resolution:
    """What one name resolves to (the last good answer) and how the last try went."""

    addresses: tuple[str, ...] = ()
    error: str | None = None
    resolved_at: float | None = None
    """time.time() of the last successful resolution."""

    def as_dict(self) -> dict[str, Any]:
        return {"addresses": list(self.addresses), "error": self.error,
                "resolved_at": self.resolved_at}


async def _resolve_one(name: str, lookup: Lookup, timeout: float,
                       last: Resolution) -> Resolution:
    try:
        async with asyncio.timeout(timeout):
            found = _normalize(await lookup(name))
        if not found:
            raise OSError("no IPv4 or IPv6 address")
    except asyncio.CancelledError:
        raise
    except TimeoutError:
        return Resolution(last.addresses, f"no answer within {timeout:g}s", last.resolved_at)
    except (OSError, UnicodeError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return Resolution(last.addresses, reason, last.resolved_at)
    return Resolution(found, None, time.time())


async def resolve_names(names: Iterable[str], *, lookup: Lookup | None = None,
                        timeout: float = DEFAULT_TIMEOUT) -> dict[str, tuple[str, ...]]:
    """One-shot resolution (``meshxl verify`` computes what the control plane serves)."""
    wanted = sorted(set(names))
    done = await asyncio.gather(*(_resolve_one(n, lookup or _getaddrinfo, timeout,
                                               Resolution()) for n in wanted))
    return {n: r.addresses for n, r in zip(wanted, done, strict=True) if r.addresses}


class Resolver:
    """Keeps the wanted names resolved; calls ``on_change`` when an answer changes."""

    def __init__(self, on_change: Callable[[], None], *, interval: float = DEFAULT_INTERVAL,
                 timeout: float = DEFAULT_TIMEOUT, lookup: Lookup | None = None) -> None:
        self._on_change = on_change
        self.interval = interval
        self._timeout = timeout
        self._lookup = lookup or _getaddrinfo
        self._wanted: frozenset[str] = frozenset()
        self._results: dict[str, Resolution] = {}
        self._addresses: Mapping[str, tuple[str, ...]] = MappingProxyType({})
        self._wake = asyncio.Event()
        self.rounds = 0

    @property
    def addresses(self) -> Mapping[str, tuple[str, ...]]:
        """Name -> addresses, for every wanted name that resolved at least once (an
        immutable mapping, replaced when something changes: compare it by identity)."""
        return self._addresses

    def status(self) -> dict[str, dict[str, Any]]:
        return {name: r.as_dict() for name, r in sorted(self._results.items())}

    def want(self, names: Iterable[str]) -> None:
        """The names the model and registrations use now; new ones are resolved at once."""
        wanted = frozenset(names)
        if wanted == self._wanted:
            return
        fresh = wanted - self._wanted
        self._wanted = wanted
        for gone in set(self._results) - wanted:
            del self._results[gone]
        self._publish()
        if fresh:
            self._wake.set()

    async def resolve(self) -> bool:
        """Resolve every wanted name once; True when some name's addresses changed."""
        names = sorted(self._wanted)
        results = await asyncio.gather(*(
            _resolve_one(n, self._lookup, self._timeout, self._results.get(n, Resolution()))
            for n in names))
        self.rounds += 1
        for name, result in zip(names, results, strict=True):
            if name not in self._wanted:
                continue  # no longer used
            before = self._results.get(name)
            self._results[name] = result
            if result.error is not None and (before is None or before.error != result.error):
                kept = (f"still using {', '.join(result.addresses)}" if result.addresses
                        else "the member has no endpoint until it resolves")
                log.warning("cannot resolve member address %s: %s (%s)", name,
                            result.error, kept)
            elif result.error is None and before is not None and before.error is not None:
                log.info("member address %s resolves again: %s", name,
                         ", ".join(result.addresses))
        return self._publish()

    def _publish(self) -> bool:
        current = {n: r.addresses for n, r in sorted(self._results.items()) if r.addresses}
        if current == dict(self._addresses):
            return False
        self._addresses = MappingProxyType(current)
        return True

    async def run(self) -> None:
        while True:
            if self._wanted and await self.resolve():
                self._on_change()
            self._wake.clear()
            try:
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
