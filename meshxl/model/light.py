"""What a statesync sidecar reads of the model, without pydantic.

A sidecar needs a few parts of its cluster: the ``sessions`` settings, the
``failover`` policy, and what decides its member's role (mode, membership, sites,
members, ``site_affinity``). Importing pydantic and building the whole model's
validators would cost every pod about 12 MiB (``docs/performance.md``, "Sidecar
footprint"), so :func:`parse_light` reads those parts from the model's data and checks
them by the model's own rules: the same enumerations, names, durations, ranges and
cross-field checks (:mod:`.basics`, :mod:`.checks`), and the same lax coercions
pydantic applies to them (``"8080"`` is a port, ``"1.0"`` an integer, ``yes`` a bool).
A model is refused when one of those parts is wrong; the other parts (stickiness,
health checks, routes, overrides...) are left to the control plane, which refuses a
model that is wrong there and keeps serving the last good one, so a sidecar could
follow such a model where the control plane does not (``meshxl apply`` refuses it).
``tests/unit/test_model_light.py`` holds it to the pydantic model with generated
models.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from .basics import (
    ALL_WITHDRAWN,
    DEFAULT_SITE,
    FAILBACKS,
    HIGH_AVAILABILITY,
    MEMBERSHIPS,
    MODES,
    NAME_PATTERN,
    PROTOCOLS,
    REGISTERED,
    REPLICATIONS,
    SITE_AFFINITIES,
    AllWithdrawn,
    Failback,
    Membership,
    Mode,
    ModelError,
    Problem,
    Protocol,
    Replication,
    SiteAffinity,
    check_duration,
    check_member_address,
    choose,
    read_duration,
)
from .checks import NO_CLUSTERS, duplicates, membership_problems
from .lax import Unfit, as_text, in_range
from .light_pools import LightPool, read_pools, vs_settings
from .limits import MEMBER_WEIGHT, PORT, SESSION_BYTES, SYNC_DELAY
from .text import ModelForm, model_data

__all__ = ["CLUSTER_FIELDS", "LightCluster", "LightFailover", "LightMember", "LightModel",
           "LightQuota", "LightSessions", "LightSite", "LightVirtualSystem",
           "parse_light"]

CLUSTER_FIELDS = frozenset({
    "name", "protocol", "websocket", "drain_window", "warmup", "mode", "membership",
    "stickiness", "sites", "site_affinity", "members", "health_check", "outlier_detection",
    "retries", "listener", "route", "connect_timeout", "priority_spillover", "sessions",
    "failover", "overrides", "degradation", "shares"})
"""Every field a cluster may have (``ClusterSpec``'s; a test keeps them equal)."""
MODEL_FIELDS = frozenset({"clusters", "pools", "virtual_systems", "telemetry", "allow_empty"})
"""Every field of a model (``ModelSpec``'s). A sidecar reads ``clusters``, and of pools
and virtual systems their names, members and session settings (a sidecar hosting a
pool's virtual systems, docs/vsls.md); the rest is the control plane's."""


@dataclass(frozen=True, slots=True)
class LightSite:
    name: str
    weight: int = 100
    failover_rank: int | None = None


@dataclass(frozen=True, slots=True)
class LightMember:
    name: str
    address: str
    port: int
    site: str | None = None
    weight: int = 100
    priority: int | None = None


@dataclass(frozen=True, slots=True)
class LightQuota:
    sessions: int | None = None
    bytes: int | None = None
    writes_per_second: float | None = None
    hold_refused: bool = True
    writes_burst: int | None = None


@dataclass(frozen=True, slots=True)
class LightSessions:
    ttl: float = 1800.0
    sync_delay: float = 0.0
    max_bytes: int = 1_048_576
    replication: Replication = "all"
    quota: LightQuota = LightQuota()


@dataclass(frozen=True, slots=True)
class LightFailover:
    all_withdrawn: AllWithdrawn = "keep-best"
    failback: Failback = "automatic"
    failback_delay: float = 10.0


@dataclass(frozen=True, slots=True)
class LightCluster:
    name: str
    protocol: Protocol = "http"
    mode: Mode = "high-availability"
    membership: Membership = "static"
    site_affinity: SiteAffinity = "global"
    sites: tuple[LightSite, ...] = ()
    members: tuple[LightMember, ...] = ()
    sessions: LightSessions = LightSessions()
    failover: LightFailover = LightFailover()

    @property
    def high_availability(self) -> bool:
        return choose(HIGH_AVAILABILITY, self.mode, "mode")

    @property
    def registered(self) -> bool:
        return choose(REGISTERED, self.membership, "membership")

    def site_names(self) -> list[str]:
        return [s.name for s in self.sites] or [DEFAULT_SITE]


@dataclass(frozen=True, slots=True)
class LightVirtualSystem:
    """A virtual system as a sidecar reads it: it is a cluster of its pool's members."""

    name: str
    pool: str
    sessions: LightSessions = LightSessions()
    mode: Mode = "high-availability"
    weight: int = 1
    backups: int = 0


@dataclass(frozen=True, slots=True)
class LightModel:
    clusters: tuple[LightCluster, ...] = ()
    virtual_systems: tuple[LightVirtualSystem, ...] = ()
    """Those compiled: named once, not a cluster's name, on a pool of the model."""
    pools: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """Each pool's name and its members' names."""
    placed_pools: tuple[LightPool, ...] = ()
    """The pools read whole: their virtual systems' roles can be placed (light_pools.py)."""

    def cluster(self, name: str) -> LightCluster | None:
        return next((c for c in self.clusters if c.name == name), None)

    def sessions_of(self, name: str) -> LightSessions | None:
        """The ``sessions`` settings of cluster or virtual system ``name`` (None:
        neither is in the model)."""
        spec = self.cluster(name) or self.virtual_system(name)
        return None if spec is None else spec.sessions

    def virtual_system(self, name: str) -> LightVirtualSystem | None:
        return next((v for v in self.virtual_systems if v.name == name), None)

    def pool_members(self, pool: str) -> tuple[str, ...] | None:
        """The pool's members' names (None: no such pool)."""
        return next((members for name, members in self.pools if name == pool), None)

    def pool_systems(self, pool: str) -> list[str]:
        """The names of the pool's virtual systems, in the model's order."""
        return [v.name for v in self.virtual_systems if v.pool == pool]


def parse_light(text: str | ModelForm, source: str = "<model>") -> LightModel:
    """The parts of a model a sidecar reads (YAML or JSON text), or ModelError naming
    every problem in them."""
    reader = _Reader()
    model = reader.model(model_data(text, source))
    if reader.problems:
        raise ModelError(reader.problems)
    return model


# -- coercions as pydantic's lax mode makes them --------------------------------------------

_NAME = re.compile(NAME_PATTERN)
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})
_T = TypeVar("_T")


def _rate(value: Any) -> float:
    """A number greater than 0, at most 1,000,000 (writes per second)."""
    if isinstance(value, bool):
        raise Unfit("expected a number")
    try:
        number = float(as_text(value) if isinstance(value, str | bytes) else value)
    except (TypeError, ValueError, Unfit):
        raise Unfit("expected a number") from None
    if not 0 < number <= 1_000_000:
        raise Unfit("expected a number greater than 0, at most 1000000")
    return number


def _optional(read: Callable[[Any], _T]) -> Callable[[Any], _T | None]:
    return lambda value: None if value is None else read(value)


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str | bytes):
        try:
            text = as_text(value).lower()
        except Unfit:
            text = ""
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
    raise Unfit("expected a boolean")


def _one_of(values: tuple[str, ...]) -> Callable[[Any], Any]:
    def read(value: Any) -> str:
        if isinstance(value, str) and value in values:
            return value
        raise Unfit("expected one of " + ", ".join(values))
    return read


def _name(value: Any) -> str:
    text = as_text(value)
    if not _NAME.fullmatch(text):
        raise Unfit("expected a name: lower-case letters, digits, '.', '_' and '-', "
                   "at most 63, starting and ending with a letter or digit")
    return text


def _address(value: Any) -> str:
    text = as_text(value)
    if not 1 <= len(text) <= 253:
        raise Unfit("expected 1 to 253 characters")
    try:
        return check_member_address(text)
    except ValueError as exc:
        raise Unfit(str(exc)) from None


def _duration(*, positive: bool, high: float | None = None) -> Callable[[Any], float]:
    def read(value: Any) -> float:
        try:
            seconds = read_duration(value)
            if isinstance(seconds, bytes | bytearray):
                seconds = float(as_text(seconds))
        except ValueError as exc:
            raise Unfit(str(exc)) from None
        if not isinstance(seconds, float):
            raise Unfit("expected a duration such as 250ms, 1s or 2m")
        if not (seconds > 0 if positive else seconds >= 0):
            raise Unfit("expected a duration greater than 0" if positive
                       else "expected a duration of 0 or more")
        try:
            check_duration(seconds)
        except ValueError as exc:
            raise Unfit(str(exc)) from None
        if high is not None and seconds > high:
            raise Unfit(f"expected a duration of at most {high:g} s")
        return seconds
    return read


_MISSING = object()


class _Reader:
    """Reads the model's data, collecting every problem (as pydantic does)."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def _object(self, data: Any, path: str, fields: frozenset[str]) -> dict[str, Any] | None:
        """``data`` as a mapping of known fields (None, and a problem, if it is not)."""
        if not isinstance(data, dict):
            self.problems.append(Problem(path, "expected a mapping", data))
            return None
        for key in data:
            if key not in fields:
                self.problems.append(Problem(f"{path}.{key}" if path else str(key),
                                             "unknown field"))
        return data

    def _field(self, data: dict[str, Any], path: str, key: str, read: Callable[[Any], _T],
               default: Any = _MISSING) -> Any:
        where = f"{path}.{key}" if path else key
        if key not in data:
            if default is _MISSING:
                self.problems.append(Problem(where, "Field required"))
            return default
        try:
            return read(data[key])
        except Unfit as exc:
            self.problems.append(Problem(where, str(exc), data[key]))
            return default

    def _list(self, data: dict[str, Any], path: str, key: str,
              read: Callable[[Any, str], _T | None]) -> tuple[_T, ...]:
        value = data.get(key, [])
        where = f"{path}.{key}"
        if not isinstance(value, list | tuple):
            self.problems.append(Problem(where, "expected a list", value))
            return ()
        items = (read(item, f"{where}[{i}]") for i, item in enumerate(value))
        return tuple(item for item in items if item is not None)

    def model(self, data: dict[Any, Any]) -> LightModel:
        self._object(data, "", MODEL_FIELDS)
        allow_empty = self._field(data, "", "allow_empty", _boolean, False)
        clusters = data.get("clusters", [])
        if not isinstance(clusters, list | tuple):
            self.problems.append(Problem("clusters", "expected a list", clusters))
            return LightModel()
        read = [self.cluster(c, f"clusters[{i}]") for i, c in enumerate(clusters)]
        model = LightModel(tuple(c for c in read if c is not None))
        if self.problems:
            return model
        pools, placed = read_pools(data.get("pools"))
        model = LightModel(model.clusters, self.virtual_systems(
            data.get("virtual_systems"), {c.name for c in model.clusters},
            {name for name, _ in pools}), pools, placed)
        if self.problems:
            return model
        if not model.clusters and not allow_empty and not data.get("virtual_systems"):
            self.problems.append(Problem("clusters", NO_CLUSTERS))
        self.problems.extend(duplicates("clusters", [c.name for c in model.clusters],
                                        "cluster name"))
        for i, cluster in enumerate(model.clusters):
            self.problems.extend(membership_problems(f"clusters[{i}]", cluster))
        return model

    def cluster(self, data: Any, path: str) -> LightCluster | None:
        found = self._object(data, path, CLUSTER_FIELDS)
        if found is None:
            return None
        before = len(self.problems)
        f = self._field
        name = f(found, path, "name", _name)
        protocol = f(found, path, "protocol", _one_of(PROTOCOLS), "http")
        site_affinity = f(found, path, "site_affinity", _one_of(SITE_AFFINITIES), "global")
        cluster = LightCluster(
            name=name, protocol=protocol,
            mode=f(found, path, "mode", _one_of(MODES), "high-availability"),
            membership=f(found, path, "membership", _one_of(MEMBERSHIPS), "static"),
            site_affinity=site_affinity,
            sites=self._list(found, path, "sites", self.site),
            members=self._list(found, path, "members", self.member),
            sessions=self.sessions(found.get("sessions", {}), f"{path}.sessions"),
            failover=self.failover(found.get("failover", {}), f"{path}.failover"))
        if len(self.problems) > before:
            return None
        self.problems.extend(_local_sites(path, cluster, found.get("stickiness")))
        return cluster

    def virtual_systems(self, data: Any, clusters: set[str],
                        pools: set[str]) -> tuple[LightVirtualSystem, ...]:
        """The virtual systems that are compiled (the control plane validates the rest:
        an entry it would refuse is left out here, never an error of the sidecar's), each
        with its ``sessions`` block read as a cluster's."""
        found: list[LightVirtualSystem] = []
        taken = set(clusters)
        for i, entry in enumerate(data if isinstance(data, list) else []):
            if not isinstance(entry, dict) or entry.get("pool") not in pools:
                continue
            names = entry.get("names") or [entry.get("name")]
            sessions = self.sessions(entry.get("sessions", {}),
                                     f"virtual_systems[{i}].sessions")
            mode, weight, backups = vs_settings(entry) or ("high-availability", 1, 0)
            for name in names if isinstance(names, list) else []:
                if isinstance(name, str) and _NAME.fullmatch(name) and name not in taken:
                    taken.add(name)
                    found.append(LightVirtualSystem(name, entry["pool"], sessions, mode,
                                                    weight, backups))
        return tuple(found)

    def site(self, data: Any, path: str) -> LightSite | None:
        found = self._object(data, path, frozenset({"name", "weight", "failover_rank"}))
        if found is None:
            return None
        return LightSite(self._field(found, path, "name", _name),
                         self._field(found, path, "weight", in_range(*MEMBER_WEIGHT.whole), 100),
                         self._field(found, path, "failover_rank",
                                     _optional(in_range(0, 100)), None))

    def member(self, data: Any, path: str) -> LightMember | None:
        found = self._object(data, path, frozenset({"name", "address", "port", "site",
                                                    "weight", "priority"}))
        if found is None:
            return None
        f = self._field
        return LightMember(f(found, path, "name", _name), f(found, path, "address", _address),
                           f(found, path, "port", in_range(*PORT.whole)),
                           f(found, path, "site", _optional(_name), None),
                           f(found, path, "weight", in_range(*MEMBER_WEIGHT.whole), 100),
                           f(found, path, "priority", _optional(in_range(0, 100)), None))

    def sessions(self, data: Any, path: str) -> LightSessions:
        found = self._object(data, path, frozenset({"ttl", "sync_delay", "max_bytes",
                                                    "replication", "quota"}))
        if found is None:
            return LightSessions()
        f, default = self._field, LightSessions()
        return LightSessions(
            f(found, path, "ttl", _duration(positive=True), default.ttl),
            f(found, path, "sync_delay", _duration(positive=False, high=SYNC_DELAY.high),
              default.sync_delay),
            f(found, path, "max_bytes", in_range(*SESSION_BYTES.whole), default.max_bytes),
            f(found, path, "replication", _one_of(REPLICATIONS), default.replication),
            self.quota(found.get("quota", {}), f"{path}.quota"))

    def quota(self, data: Any, path: str) -> LightQuota:
        found = self._object(data, path, frozenset({"sessions", "bytes", "writes_per_second",
                                                    "hold_refused", "writes_burst"}))
        if found is None:
            return LightQuota()
        f = self._field
        quota = LightQuota(
            f(found, path, "sessions", _optional(in_range(1, 1_000_000_000)), None),
            f(found, path, "bytes", _optional(in_range(1, 1 << 50)), None),
            f(found, path, "writes_per_second", _optional(_rate), None),
            f(found, path, "hold_refused", _boolean, True),
            f(found, path, "writes_burst", _optional(in_range(1, 1_000_000)), None))
        if quota.writes_burst is not None and "writes_per_second" not in found:
            self.problems.append(Problem(
                path, "writes_burst is the size of the writes_per_second bucket: set "
                "writes_per_second too"))
        return quota

    def failover(self, data: Any, path: str) -> LightFailover:
        found = self._object(data, path, frozenset({"all_withdrawn", "failback",
                                                    "failback_delay"}))
        if found is None:
            return LightFailover()
        f, default = self._field, LightFailover()
        return LightFailover(
            f(found, path, "all_withdrawn", _one_of(ALL_WITHDRAWN), default.all_withdrawn),
            f(found, path, "failback", _one_of(FAILBACKS), default.failback),
            f(found, path, "failback_delay", _duration(positive=False),
              default.failback_delay))


def _local_sites(path: str, cluster: LightCluster, stickiness: Any) -> Iterator[Problem]:
    """``site_affinity: local`` needs two sites, and a pin where sessions are hashed
    (the model's own rule, on the parts read here: whether there is a stickiness with
    a pin)."""
    if cluster.site_affinity != "local":
        return
    if len(cluster.sites) < 2:
        yield Problem(path, "site_affinity: local needs at least two sites under `sites`")
    elif (isinstance(stickiness, dict) and stickiness.get("pin") is None
          and cluster.protocol != "tcp"):
        yield Problem(path, "site_affinity: local needs stickiness.pin: each site's Envoy "
                      "hashes over its own members first, so only a pin keeps a session on "
                      "one member when it enters at both sites (docs/sites.md)")
