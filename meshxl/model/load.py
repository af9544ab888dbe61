"""Loading and validating a model file: every problem named by field path and value."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from meshxl.bounded import check_depth, measure
from meshxl.errors import InputError

from .listeners import check_listeners
from .protocols import check_protocols
from .runtime import RuntimeState
from .spec import DEFAULT_SITE, ClusterSpec, ModelSpec


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a model: where (field path), what, and the bad value."""

    path: str
    message: str
    value: Any = None

    def __str__(self) -> str:
        shown = "" if self.value is None else f" (got {_short(self.value)})"
        return f"{self.path or '<model>'}: {self.message}{shown}"


class ModelError(InputError):
    """A model that cannot be served. ``problems`` lists every reason."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("function-", "literal[")):  # pydantic's internal loc parts
            continue
        else:
            out += f".{part}" if out else part
    return out


MAX_MODEL_BYTES = 4 * 1024 * 1024
"""Largest model text (a model stored in etcd must stay under etcd's 1.5 MiB anyway)."""
MAX_DEPTH = 64
"""Deepest nesting of mappings and lists (the model itself needs about six levels)."""
MAX_VALUES = 1_000_000
"""Most values a model may expand to, YAML aliases counted at every use (a "billion
laughs" document is a few lines of text that expand to more than memory holds)."""
_MODEL = "the model"


_CLoader = getattr(yaml, "CSafeLoader", None)


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load``, with libyaml when PyYAML has it: several times faster, which
    every model change pays on every control-plane replica (docs/performance.md).

    libyaml's composer recurses in C and crashes the process on deep nesting, so its
    (iterative) parser first checks the nesting depth from the event stream.
    """
    if _CLoader is None:
        return yaml.safe_load(text)
    check_depth(text, max_depth=MAX_DEPTH, name=_MODEL, loader=_CLoader)
    return yaml.load(text, Loader=_CLoader)  # noqa: S506 - CSafeLoader is the safe loader


def parse_model(text: str, source: str = "<model>") -> ModelSpec:
    """Parse YAML (or JSON) text into a validated model, or raise ModelError."""
    if len(text) > MAX_MODEL_BYTES:
        raise ModelError([Problem(source, f"the model is larger than {MAX_MODEL_BYTES} "
                                          "characters")])
    try:
        data = _load_yaml(text)
    except InputError as exc:
        raise ModelError([Problem(source, str(exc))]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        reason = getattr(exc, "problem", None) or str(exc)
        raise ModelError([Problem(where, f"YAML syntax error: {reason}")]) from None
    except RecursionError:
        raise ModelError([Problem(source, "YAML nested too deep")]) from None
    except Exception as exc:
        # PyYAML's constructors let other errors through for values they cannot build
        # (an impossible date, an empty !!timestamp): still bad input, nothing else.
        raise ModelError([Problem(source, f"YAML value error: {type(exc).__name__}: "
                                          f"{str(exc)[:200]}")]) from None
    try:
        measure(data, max_depth=MAX_DEPTH, max_values=MAX_VALUES, name=_MODEL)
    except InputError as exc:
        raise ModelError([Problem(source, str(exc))]) from None
    if data is None or (isinstance(data, str) and not data.strip()):
        raise ModelError([Problem(source, EMPTY_MODEL)])
    if not isinstance(data, dict):
        raise ModelError([Problem("", "the model must be a mapping with a 'clusters' list",
                                  type(data).__name__)])
    try:
        spec = ModelSpec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            value = err.get("input")
            if err["type"] == "missing":
                value = None
            elif err["type"] == "extra_forbidden":
                msg = "unknown field"
                value = None
            problems.append(Problem(_path(err["loc"]), msg, value))
        raise ModelError(problems) from None
    problems = list(check_model(spec))
    if problems:
        raise ModelError(problems)
    return spec


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


EMPTY_MODEL = ("the model is empty (an empty file or input, or a file caught mid-write): "
               "serving it would withdraw every listener from every Envoy")
NO_CLUSTERS = ("the model has no clusters: serving it would withdraw every listener from "
               "every Envoy (to do that on purpose, set 'allow_empty: true' in the model)")


def check_model(spec: ModelSpec) -> Iterator[Problem]:
    """Cross-field checks pydantic cannot express (references, uniqueness)."""
    if not spec.clusters and not spec.allow_empty:
        yield Problem("clusters", NO_CLUSTERS)
    yield from _duplicates("clusters", [c.name for c in spec.clusters], "cluster name")
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


def _duplicates(path: str, names: list[str], what: str) -> Iterator[Problem]:
    for name, count in Counter(names).items():
        if count > 1:
            idx = [i for i, n in enumerate(names) if n == name][1]
            yield Problem(f"{path}[{idx}].name", f"duplicate {what}", name)


def _check_cluster(base: str, c: ClusterSpec) -> Iterator[Problem]:
    yield from _duplicates(f"{base}.sites", [s.name for s in c.sites], "site name")
    yield from _duplicates(f"{base}.members", [m.name for m in c.members], "member name")
    sites = set(c.site_names())
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
    if c.failover.failback == "manual" and not c.high_availability:
        yield Problem(f"{base}.failover.failback", "manual failback (ClusterXL's Active Up) "
                      "keeps the active role where it went: it needs mode: "
                      "high-availability (load-sharing members all serve)", "manual")
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
    for i, spec in enumerate(model.clusters):
        found.extend(cluster_warnings(i, spec, runtime))
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
