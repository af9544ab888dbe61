"""The model's cross-field checks on names, sites and members (pure): :mod:`.load`
runs them on the model as read, for the control plane and for a sidecar alike."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from .basics import DEFAULT_SITE, Problem
from .runtime import ClusterShape

__all__ = ["NO_CLUSTERS", "duplicates", "membership_problems"]

NO_CLUSTERS = ("the model has no clusters: serving it would withdraw every listener from "
               "every Envoy (to do that on purpose, set 'allow_empty: true' in the model)")


def duplicates(path: str, names: list[str], what: str) -> Iterator[Problem]:
    """A problem at the second use of each name used more than once."""
    for name, count in Counter(names).items():
        if count > 1:
            idx = [i for i, n in enumerate(names) if n == name][1]
            yield Problem(f"{path}[{idx}].name", f"duplicate {what}", name)


def membership_problems(base: str, c: ClusterShape) -> Iterator[Problem]:
    """Sites and members named once each, members on declared sites and on endpoints
    of their own, a static cluster with members, manual failback only with an active
    member to keep."""
    yield from duplicates(f"{base}.sites", [s.name for s in c.sites], "site name")
    yield from duplicates(f"{base}.members", [m.name for m in c.members], "member name")
    sites = {s.name for s in c.sites} or {DEFAULT_SITE}
    seen: dict[tuple[str, int], str] = {}
    for j, m in enumerate(c.members):
        if m.site is not None and m.site not in sites:
            known = (", ".join(sorted(sites)) if c.sites
                     else f"none declared, so only {DEFAULT_SITE!r}")
            yield Problem(f"{base}.members[{j}].site", f"unknown site (sites: {known})", m.site)
        endpoint = (m.address, m.port)
        if endpoint in seen:
            yield Problem(f"{base}.members[{j}]",
                          f"same address and port as member {seen[endpoint]!r}",
                          f"{m.address}:{m.port}")
        seen.setdefault(endpoint, m.name)
    if not c.registered and not c.members:
        yield Problem(f"{base}.members", "a static cluster needs at least one member "
                      "(or use membership: registered)")
    if c.failover.failback == "manual" and not c.high_availability:
        yield Problem(f"{base}.failover.failback", "manual failback (ClusterXL's Active Up) "
                      "keeps the active role where it went: it needs mode: "
                      "high-availability (load-sharing members all serve)", "manual")
