"""Loading and validating a model file: every problem named by field path and value."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

from .basics import DEFAULT_SITE
from .basics import ModelError as ModelError
from .basics import Problem as Problem
from .checks import NO_CLUSTERS, duplicates, membership_problems
from .decode import decode
from .document import ModelSpec
from .listeners import check_listeners
from .protocols import check_protocols
from .runtime import RuntimeState
from .spec import ClusterSpec
from .text import EMPTY_MODEL as EMPTY_MODEL
from .text import MAX_MODEL_BYTES as MAX_MODEL_BYTES
from .text import ModelForm, model_data


def parse_model(text: str | ModelForm, source: str = "<model>", *,
                expand: bool = True) -> ModelSpec:
    """Parse YAML (or JSON) text, or a stored :class:`~.text.ModelForm`, into a validated
    model, or raise ModelError. ``expand`` False (a statesync sidecar): the virtual
    systems are not compiled into clusters, and what only their clusters could break
    (their routes, listeners and protocols) is left to the control plane, which refuses
    such a model and keeps serving the last good one."""
    spec = decode(model_data(text, source), ModelSpec)
    if expand:  # virtual systems become clusters (vsls.py: never loaded in a sidecar)
        from .vsls import expand_model

        spec = expand_model(spec)
    problems = list(check_model(spec))
    if problems:
        raise ModelError(problems)
    return spec


def parse_unexpanded(text: str | ModelForm, source: str = "<model>") -> ModelSpec:
    """:func:`parse_model` as a statesync sidecar reads the model: the one declaration
    and its checks, the virtual systems left as entries (:mod:`.vsls` answers a
    sidecar's questions about them: :func:`~.vsls.sessions_of`, :func:`~.vsls.vs_roles`)."""
    return parse_model(text, source, expand=False)


def load_model(path: str | Path) -> ModelSpec:
    """Read and validate a model file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelError([Problem(str(p), f"cannot read the model file: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        raise ModelError([Problem(str(p), f"cannot read the model file: not UTF-8 text "
                                          f"(byte {exc.start})")]) from None
    return parse_model(text, source=str(p))


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def check_model(spec: ModelSpec) -> Iterator[Problem]:
    """Checks across the model that no one class can make (references, uniqueness,
    protocols, listeners)."""
    if not spec.clusters and not spec.virtual_systems and not spec.allow_empty:
        yield Problem("clusters", NO_CLUSTERS)  # (a VS that compiles to none is named)
    yield from _check_virtual(spec)
    virtual = spec.virtual_names
    yield from duplicates("clusters", [c.name for c in spec.clusters if c.name not in virtual],
                          "cluster name")
    routes: dict[tuple[str, int, str, str], str] = {}
    for i, cluster in enumerate(spec.clusters):
        base = f"clusters[{i}]"
        yield from _check_cluster(base, cluster)
        if cluster.listener is not None:
            for domain in cluster.route.domains:
                key = (cluster.listener.address, cluster.listener.port, domain,
                       cluster.route.prefix)
                if key in routes:
                    yield Problem(f"{base}.route", f"cluster {routes[key]!r} already routes "
                                  f"{domain}{cluster.route.prefix} on "
                                  f"{cluster.listener.address}:{cluster.listener.port}")
                routes.setdefault(key, cluster.name)
    yield from (Problem(*found) for found in check_protocols(spec.clusters))
    yield from (Problem(*found) for found in check_listeners(spec.clusters))


def _check_virtual(spec: ModelSpec) -> Iterator[Problem]:
    """Pools and virtual systems: names, references, enough members for the roles."""
    yield from duplicates("pools", [p.name for p in spec.pools], "pool name")
    for i, each in enumerate(spec.pools):
        base = f"pools[{i}]"
        yield from duplicates(f"{base}.sites", [s.name for s in each.sites], "site name")
        yield from duplicates(f"{base}.members", [m.name for m in each.members], "member name")
        sites = {s.name for s in each.sites}
        for j, m in enumerate(each.members):
            if m.site is not None and m.site not in sites:
                yield Problem(f"{base}.members[{j}].site", "unknown site (sites: "
                              f"{', '.join(sorted(sites)) or 'none declared'})", m.site)
    clusters = {c.name for c in spec.clusters if c.name not in spec.virtual_names}
    seen: set[str] = set()
    for i, vs in enumerate(spec.virtual_systems):
        base = f"virtual_systems[{i}]"
        pool = spec.pool(vs.pool)
        if pool is None:
            known = ", ".join(p.name for p in spec.pools) or "none declared"
            yield Problem(f"{base}.pool", f"unknown pool (pools: {known})", vs.pool)
        elif vs.mode == "high-availability" and len(pool.members) < 2 + vs.backups:
            yield Problem(f"{base}.backups", f"an active, a standby and {vs.backups} "
                          f"backup(s) need {2 + vs.backups} members; pool {pool.name!r} "
                          f"has {len(pool.members)}", vs.backups)
        elif pool.listener is None:
            yield Problem(f"pools[{spec.pools.index(pool)}].listener",
                          "a pool with virtual systems needs a listener (their domains "
                          "are routes of it)")
        field = "name" if vs.name is not None else "names"
        for j, name in enumerate(vs.all_names):
            where = f"{base}.{field}" + ("" if vs.name is not None else f"[{j}]")
            if name in clusters:
                yield Problem(where, "a cluster already has this name (a virtual system "
                              "is compiled as a cluster of its own)", name)
            elif name in seen:
                yield Problem(where, "duplicate virtual system name", name)
            seen.add(name)


def _check_cluster(base: str, c: ClusterSpec) -> Iterator[Problem]:
    yield from membership_problems(base, c)
    st = c.stickiness
    if st is not None:
        if st.algorithm == "maglev" and not _is_prime(st.maglev_table_size):
            yield Problem(f"{base}.stickiness.maglev_table_size", "must be a prime number",
                          st.maglev_table_size)
        if st.ring_minimum_size > st.ring_maximum_size:
            yield Problem(f"{base}.stickiness.ring_minimum_size",
                          f"must not exceed ring_maximum_size ({st.ring_maximum_size})",
                          st.ring_minimum_size)
    hc = c.health_check
    if hc.enabled and hc.timeout > hc.interval * 4:
        yield Problem(f"{base}.health_check.timeout",
                      f"is much longer than the interval ({hc.interval}s): checks would overlap",
                      hc.timeout)
    if c.retries.backoff_base > c.retries.backoff_max:
        yield Problem(f"{base}.retries.backoff_base", "must not exceed backoff_max",
                      c.retries.backoff_base)


def model_warnings(model: ModelSpec, runtime: RuntimeState | None = None) -> list[Problem]:
    """Things that are valid but defeat their purpose: a Maglev table too small to
    spread sessions evenly, and high availability inside one failure domain.

    An active and a standby on one site with no other site share a failure domain: the
    site's loss takes the whole cluster down (ClusterXL members belong in different
    racks, rooms or sites; in Kubernetes, in different nodes and zones).

    A static cluster's members are in the model. A ``membership: registered`` cluster's
    are known only at run time: with ``runtime`` they are its live registrations (and
    their sites); without it, only the members the model lists are judged.
    """
    found = []
    virtual = model.virtual_names
    for i, spec in enumerate(model.clusters):
        judged = cluster_warnings(i, spec, runtime)
        if spec.name in virtual:  # the site warning comes once per pool, below
            judged = [w for w in judged if w.path.endswith("maglev_table_size")]
        found.extend(judged)
    # Virtual systems: judged once per pool, not once per VS.
    used = {vs.pool for vs in model.virtual_systems if vs.mode == "high-availability"}
    for i, pool in enumerate(model.pools):
        default = pool.sites[0].name if pool.sites else DEFAULT_SITE
        sites = {m.site or default for m in pool.members}
        if pool.name in used and len(pool.members) >= 2 and len(sites) == 1:
            found.append(Problem(
                f"pools[{i}] ({pool.name})",
                f"every member is on site {sites.pop()}: each virtual system's active and "
                "standby share it, and one site failure takes them all down (put a member "
                "on a second site)"))
    return found


def cluster_warnings(index: int, spec: ClusterSpec,
                     runtime: RuntimeState | None = None) -> list[Problem]:
    """:func:`model_warnings` of one cluster (``index``: its place in the model)."""
    found = []
    default = spec.site_names()[0]
    if spec.registered and runtime is not None:
        listed = {m.name: m.site for m in spec.members}
        sites = [reg.site or listed.get(name) or default
                 for name, reg in runtime.registrations_of(spec.name).items()]
        what = "registered members"
    else:
        sites = [m.site or default for m in spec.members]
        what = "members"
    count = len(sites)
    st = spec.stickiness
    if st is not None and st.algorithm == "maglev" and st.maglev_table_size < 100 * count:
        found.append(Problem(
            f"clusters[{index}] ({spec.name}).stickiness.maglev_table_size",
            f"{st.maglev_table_size} entries for {count} {what}: Maglev spreads sessions "
            f"evenly with at least 100 entries per member (use a prime >= {100 * count})",
            st.maglev_table_size))
    if spec.high_availability and count >= 2 and len(set(sites)) == 1:
        found.append(Problem(
            f"clusters[{index}] ({spec.name})",
            f"active and standby are both on site {sites[0]} and no {what[:-1]} is on "
            "another site: one site failure takes the whole cluster down (put a member on "
            "a second site)"))
    return found
