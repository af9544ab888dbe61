"""Sick members: who is DEGRADED, judged from the requests the Envoys saw (pure, but
for the judge's memory of the probes under way; the clock is passed in).

A member is sick *relative to its peers*: in every window of the cluster's
``degradation.detect`` span its p90 latency is at least ``latency_factor`` times its
peers' (their median) and ``latency_margin`` above it, or its share of failed requests
is ``error_margin`` above theirs. Two things keep noise out. The whole span must be
worse, window by window (a GC pause, a burst or one slow request spoils one window,
not three in a row), with at least ``min_requests`` of the member's and its peers'
requests in it. And a member is judged against *its own normal* beside its peers (the
ratio over the last :data:`BASELINE` seconds before the span): a member that always
served the heaviest sessions at twice its peers' latency must become
``latency_factor`` times worse than that. When every member is equally slow (a shared
dependency) none is worse than its peers, so nothing moves.

What a degraded member gets, with ``action: move``:

* load sharing: its EDS weight is halved every ``step`` from the judgement on, down to
  ``min_share`` of its weight (:func:`share`), so each step moves at most half of the
  sessions it still had (their state follows as in a takeover). At most a minority of a
  tier is degraded at once (like outlier detection's ``max_ejection_percent``). After
  ``recover`` seconds with no worse window it is judged well again, and the warm-up
  ramp (:mod:`meshxl.xds.warmup`) gives its share back.
* high availability: only the active serves, so it has no peers to compare with. It
  is judged against the cluster's normal at its load first (the p90 of the windows of
  the last :data:`BASELINE` seconds that carried about as many requests:
  :data:`LOAD_BAND`; latency grows with load, so a busier minute is no sickness);
  when it is worse for ``detect``, the standby is *probed*: it joins the
  active's tier with ``probe_share`` of the weight (those sessions take over on the
  standby, whose copy of their state is current), and after ``probe_time`` the
  two are compared like peers (counted from when its move went ahead: delayed sync
  waits for the sidecars first, :mod:`meshxl.model.moves`; with pinned sessions the
  active's pins are let go meanwhile, and a probe that moves nothing hands the standby's back:
  :mod:`meshxl.xds.stepdown`). A standby that serves better takes the active role
  (predictive failover: the active goes behind it, DEGRADED), as long as the active is
  also worse than the cluster was at the active's load (the standby carries only the
  probe's share: its advantage alone may be load's); one that serves no better ends
  the probe, and the cluster is not probed again for ``recover`` seconds (a slow
  dependency that both share), nor after a predictive failover (hold-down). A
  degraded active stays behind for ``recover`` seconds, then failback
  (``failover.failback``: ``automatic`` after ``failback_delay`` more; ``manual``
  keeps it behind) returns it, once a probe shows it no worse than the active and
  than the other members were at its load.

Judgements are records in etcd (``clusters/C/health/M``, :class:`~meshxl.model.runtime.Health`),
written under the judging replica's lease, so every replica, sidecar and
``meshxl status`` sees the same states, and :func:`meshxl.model.cluster_view` applies
them (the member's state, its place in high availability). Each replica judges from the
requests of the Envoys connected to it and removes only its own records; what holds
across members (a minority degraded, one replica's probe at a time: :class:`Bound`) is
checked against every replica's records in etcd when one is written.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from meshxl.model import ClusterSpec, ModelSpec, RuntimeState, cluster_view
from meshxl.model.moves import health_token
from meshxl.model.records import DEGRADED_KIND, HANDBACK_KIND, HELD_KIND, PROBE_KIND, Health
from meshxl.model.runtime import SERVING, ClusterView, MemberState, MemberView, Role
from meshxl.stats import quantile

from .stepdown import HALVINGS, released, share, shares

__all__ = ["BASELINE", "HALVINGS", "LOAD_BAND", "WINDOW", "Bound", "Judge",
           "Judgement",
           "Samples", "member_samples", "released", "share", "shares", "worse"]

WINDOW = 0.5
"""The signals' window (seconds): :mod:`meshxl.xds.upstream` keeps per-host samples in
windows of this length on the Unix clock."""
BASELINE = 60.0
"""How far back a member's normal is read (its ratio to its peers, or in high
availability its own p90)."""
_JUDGED = frozenset({MemberState.DEGRADED, MemberState.READY, MemberState.RETURNING})
"""States in which a judged high-availability member keeps its record: degraded, probed
(ready) or held (returning)."""
_MIN_BASELINE_WINDOWS = 6
"""Windows with requests a high-availability active needs in its baseline to be judged."""


T = TypeVar("T")


class Sample(Protocol):
    """One host's requests over a window or a span (``meshxl.xds.upstream.HostSample``)."""

    @property
    def requests(self) -> int: ...
    @property
    def errors(self) -> int: ...
    @property
    def p90(self) -> float | None: ...


class Samples(Protocol):
    """What the judge reads of the signals (``meshxl.xds.upstream.UpstreamSignals``)."""

    def windows(self, cluster: str, since: float, until: float) -> Mapping[str, Sequence[Sample]]:
        ...

    def summary(self, cluster: str, since: float, until: float) -> Mapping[str, Sample]: ...


@dataclass(frozen=True)
class Margins:
    """A cluster's ``degradation`` margins, with a member's normal ratio folded in."""

    factor: float
    margin: float
    errors: float


def _answered(s: Sample) -> bool:
    """The member answered in this window: some request, not all of them failures
    without a byte back (no latency was measured then: reset or closed by the member;
    one that timed out waiting has its wait as its latency, meshxl.xds.accesslog)."""
    return s.requests > 0 and not (s.p90 is None and s.errors >= s.requests)


def _error_rate(s: Sample) -> float:
    return s.errors / s.requests if s.requests else 0.0


def worse(member: Sample, peers: Sequence[Sample], margins: Margins,
          normal: float = 1.0, normal_errors: float = 0.0) -> str | None:
    """Why ``member`` is worse than ``peers`` by the margins (None: it is not, or there is
    nothing to compare). ``normal``: the member's usual latency ratio to its peers
    (at least 1); ``normal_errors``: its usual error excess over theirs (at least 0)."""
    live = [p for p in peers if p.requests > 0]
    if member.requests == 0 or not live:
        return None
    if member.p90 is not None:
        latencies = [p.p90 for p in live if p.p90 is not None]
        if latencies:
            theirs = statistics.median(latencies)
            if (member.p90 >= margins.factor * max(1.0, normal) * theirs
                    and member.p90 - theirs >= margins.margin):
                return (f"p90 {member.p90 * 1000:.0f} ms against its peers' "
                        f"{theirs * 1000:.0f} ms")
    excess = _error_rate(member) - statistics.median(_error_rate(p) for p in live)
    if excess - max(0.0, normal_errors) >= margins.errors:
        return (f"{_error_rate(member):.0%} of requests failed, "
                f"{excess:.0%} more than its peers")
    return None


@dataclass
class _Probe:
    active: str
    standby: str
    """The member probed: the standby, or (``recovery``) a degraded member held behind."""
    since: float
    why: str
    recovery: bool = False


@dataclass(frozen=True)
class Bound:
    """What a cluster's judgements must respect over *every* replica's records, checked
    in etcd when a record is written (:mod:`meshxl.xds.judging`): in load sharing at
    most ``degraded`` members of ``tier`` degraded at once; in high availability
    (``exclusive``) one replica's judgements at a time (a probe, a failover)."""

    tier: frozenset[str] = frozenset()
    degraded: int = 0
    exclusive: bool = False


@dataclass(frozen=True)
class Judgement:
    """What one replica judges at one instant."""

    records: dict[tuple[str, str], Health] = field(default_factory=dict)
    """Every record this replica wants in etcd (the others of its own are removed)."""
    suspects: dict[str, str] = field(default_factory=dict)
    """cluster -> why its active is under suspicion (high availability, not moved)."""
    bounds: dict[str, Bound] = field(default_factory=dict)
    """cluster -> what its records must respect across replicas."""


def _span(now: float, seconds: float) -> tuple[float, float]:
    """The closed windows that cover the last ``seconds`` before ``now``."""
    end = math.floor(now / WINDOW) * WINDOW
    return end - math.ceil(seconds / WINDOW - 1e-9) * WINDOW, end


def _host(view: MemberView) -> str:
    return f"[{view.address}]:{view.port}" if ":" in view.address else \
        f"{view.address}:{view.port}"


def member_samples(members: Iterable[MemberView], per_host: Mapping[str, T],
                   hosts: Mapping[str, Iterable[str]]) -> dict[str, T]:
    """Each member's entry of ``per_host`` (keyed by ``ip:port``, as Envoy logs its
    upstream): the first of its addresses (its own, or those its host name resolved
    to) that has one."""
    found: dict[str, T] = {}
    for m in members:
        names = [_host(m)] + [f"{ip}:{m.port}" if ":" not in ip else f"[{ip}]:{m.port}"
                              for ip in hosts.get(m.address, ())]
        for h in names:
            if h in per_host:
                found[m.name] = per_host[h]
                break
    return found


class Judge:
    """One replica's judge: call :meth:`judge` every :data:`WINDOW` seconds.

    ``hosts``: the addresses a member named by host name resolves to (the DNS
    resolver's answers), so its requests (logged by address) are found. ``began``:
    when a planned move (its token, record time) went ahead, None while it waits
    (:meth:`meshxl.xds.planned.MoveGate.began`); without one, at once."""

    def __init__(self, replica: str,
                 began: Callable[[str, float], float | None] | None = None) -> None:
        self.replica = replica
        self.began = began or (lambda _token, at: at)
        self._normal: dict[tuple[str, str], tuple[float, float]] = {}
        self._probes: dict[str, _Probe] = {}
        self._quiet_until: dict[str, float] = {}

    def judge(self, model: ModelSpec, state: RuntimeState, samples: Samples, now: float,
              hosts: Mapping[str, Iterable[str]] | None = None) -> Judgement:
        out = Judgement()
        for spec in model.clusters:
            if spec.degradation.action == "off":
                self._probes.pop(spec.name, None)
                continue
            view = cluster_view(spec, state)
            if spec.high_availability:
                self._judge_ha(spec, view, state, samples, now, hosts or {}, out)
            else:
                self._judge_ls(spec, view, state, samples, now, hosts or {}, out)
        live = {c.name for c in model.clusters}
        for cluster in [c for c in self._probes if c not in live]:
            del self._probes[cluster]
        return out

    # -- signals per member ---------------------------------------------------------


    def _record(self, spec: ClusterSpec, kind: str, reason: str, since: float,
                behind: str = "") -> Health:
        return Health(kind=kind, reason=reason, since=since, by=self.replica,
                      moves=spec.degradation.action == "move", behind=behind)

    # -- load sharing ---------------------------------------------------------------

    def _judge_ls(self, spec: ClusterSpec, view: ClusterView[ClusterSpec], state: RuntimeState,
                  samples: Samples, now: float, hosts: Mapping[str, Iterable[str]],
                  out: Judgement) -> None:
        d = spec.degradation
        name = spec.name
        tier = [m for m in view.members if m.priority == 0 and m.state in SERVING]
        margins = Margins(d.latency_factor, d.latency_margin, d.error_margin)
        since, until = _span(now, d.detect)
        windows = member_samples(tier, samples.windows(name, since, until), hosts)
        merged = member_samples(tier, samples.summary(name, since, until), hosts)
        base = member_samples(tier, samples.windows(name, until - BASELINE, since), hosts)
        candidates: list[tuple[float, str, str, tuple[float, float]]] = []
        for m in tier:
            if m.state is MemberState.DEGRADED:
                record = state.health_of(name).get(m.name)
                if record is not None and record.by == self.replica:
                    kept = self._still_degraded(spec, m, tier, record, samples, now, hosts)
                    if kept:
                        out.records[(name, m.name)] = record
                    else:
                        self._normal.pop((name, m.name), None)
                continue
            if len(tier) < 2:
                continue
            found = self._worse_throughout(m, tier, windows, merged, base, margins,
                                           d.min_requests)
            if found is not None:
                own = merged.get(m.name)
                ratio = (own.p90 or 0.0) if own is not None else 0.0
                candidates.append((ratio, m.name, *found))
        degraded = sum(1 for m in tier if m.state is MemberState.DEGRADED)
        bound = max(1, (len(tier) - 1) // 2)
        out.bounds[name] = Bound(tier=frozenset(m.name for m in tier), degraded=bound)
        room = bound - degraded
        for _, member, reason, normal in sorted(candidates, reverse=True)[:max(0, room)]:
            self._normal[(name, member)] = normal  # judged by it until it recovers
            out.records[(name, member)] = self._record(
                spec, DEGRADED_KIND, f"{reason} for {d.detect:g}s", now)

    def _worse_throughout(self, m: MemberView, tier: Sequence[MemberView],
                          windows: Mapping[str, Sequence[Sample]], merged: Mapping[str, Sample],
                          base: Mapping[str, Sequence[Sample]], margins: Margins,
                          min_requests: int) -> tuple[str, tuple[float, float]] | None:
        """Why ``m`` was worse than its peers in every window of the span in which it
        answered (None: not).

        A member that answers ten times slower answers less often (a session waits for
        its answer before it asks again), so the member needs only a quarter of
        ``min_requests`` over the span (its peers all of it) and windows in which it
        answered nothing are passed over, as long as at least two had answers. A
        window of failures without a byte from the member (connections refused, reset
        before an answer: a member killed) is such a window: a member that does not
        answer at all is down, which its health check, outlier detection and lease
        handle, not sick. One that takes requests and never answers them is not: its
        requests that timed out waiting are answers as slow as the wait."""
        own_windows = list(windows.get(m.name, ()))
        peers = [p for p in tier if p.name != m.name]
        peer_windows = [list(windows.get(p.name, ())) for p in peers]
        if not own_windows or not any(peer_windows):
            return None
        own_total = merged.get(m.name)
        peer_total = sum(s.requests for p in peers if (s := merged.get(p.name)) is not None)
        if (own_total is None or own_total.requests < max(3, min_requests // 4)
                or peer_total < min_requests):
            return None
        normal, normal_errors = _normal_of(m, peers, base)
        reason: str | None = None
        judged = 0
        for i, own in enumerate(own_windows):
            if not _answered(own):
                continue
            theirs = [w[i] for w in peer_windows if len(w) > i]
            reason = worse(own, theirs, margins, normal, normal_errors)
            if reason is None:
                return None
            judged += 1
        return (reason, (normal, normal_errors)) if reason and judged >= 2 else None

    def _still_degraded(self, spec: ClusterSpec, m: MemberView, tier: Sequence[MemberView],
                        record: Health, samples: Samples, now: float,
                        hosts: Mapping[str, Iterable[str]]) -> bool:
        """A degraded load-sharing member stays so until it has been no worse than its
        peers (against the normal it had when judged) in every window of ``recover``."""
        d = spec.degradation
        if now - record.since < d.recover:
            return True
        since, until = _span(now, d.recover)
        windows = member_samples(tier, samples.windows(spec.name, since, until), hosts)
        own = list(windows.get(m.name, ()))
        peers = [list(windows.get(p.name, ())) for p in tier if p.name != m.name]
        normal, errors = self._normal.get((spec.name, m.name), (1.0, 0.0))
        margins = Margins(d.latency_factor, d.latency_margin, d.error_margin)
        for i, sample in enumerate(own):
            if worse(sample, [w[i] for w in peers if len(w) > i], margins, normal, errors):
                return True
        return False

    # -- high availability ----------------------------------------------------------

    def _judge_ha(self, spec: ClusterSpec, view: ClusterView[ClusterSpec], state: RuntimeState,
                  samples: Samples, now: float, hosts: Mapping[str, Iterable[str]],
                  out: Judgement) -> None:
        d = spec.degradation
        name = spec.name
        active = next((m for m in view.members if m.role is Role.ACTIVE
                       and m.state is MemberState.READY), None)
        probe = self._probes.get(name)
        for member, record in state.health_of(name).items():
            m = view.member(member)
            if record.by != self.replica or m is None or m.state not in _JUDGED:
                continue  # another replica's, or gone, down, not serving: the record goes
            if record.kind == DEGRADED_KIND:
                hold = d.recover + (spec.failover.failback_delay
                                    if spec.failover.failback == "automatic" else 0.0)
                if now - record.since < (hold if record.moves else d.recover):
                    out.records[(name, member)] = record
                elif record.moves and probe is None and active is not None:
                    # Held long enough: is it well again? Probed beside the active.
                    probe = self._probes[name] = _Probe(active.name, member, now,
                                                        record.reason, recovery=True)
            elif record.kind == HELD_KIND and m.state is MemberState.RETURNING:
                out.records[(name, member)] = record  # manual failback: behind the active
            elif (record.kind == HANDBACK_KIND and m.role is Role.STANDBY
                  and now - record.since < d.recover):
                out.records[(name, member)] = record  # the probe's sessions going back
        out.bounds[name] = Bound(exclusive=True)
        if any(r.by != self.replica for r in state.health_of(name).values()):
            self._probes.pop(name, None)  # another replica judges this cluster now
            return
        if probe is not None:
            self._run_probe(spec, view, probe, samples, now, hosts, out)
            return
        standby = next((m for m in view.members if m.role is Role.STANDBY
                        and m.state is MemberState.READY), None)
        if active is None or now < self._quiet_until.get(name, 0.0):
            return
        why = self._active_worse(spec, view, active, samples, now, hosts)
        if why is None:
            return
        out.suspects[name] = why
        if d.action == "report":
            out.records[(name, active.name)] = self._record(
                spec, DEGRADED_KIND, f"{why} (reported, not moved)", now)
        elif standby is not None:
            probe = self._probes[name] = _Probe(active.name, standby.name, now, why)
            self._run_probe(spec, view, probe, samples, now, hosts, out)

    def _active_worse(self, spec: ClusterSpec, view: ClusterView[ClusterSpec],
                      active: MemberView, samples: Samples, now: float,
                      hosts: Mapping[str, Iterable[str]]) -> str | None:
        """Why the active is worse than the cluster's normal *at its load* throughout
        ``detect``: the median p90 of every member's windows over the last
        :data:`BASELINE` seconds that carried a comparable load (:func:`_at_load`; a
        member that served slowly before a failover is judged by the cluster's normal,
        not by its own slow past). A load the cluster has not carried in that minute
        has no normal: the active is then judged on its errors only."""
        d = spec.degradation
        since, until = _span(now, d.detect)
        own = list(member_samples([active], samples.windows(spec.name, since, until),
                                  hosts).get(active.name, ()))
        history = self._history(spec, view.members, samples, until - BASELINE, since, hosts)
        if len(history) < _MIN_BASELINE_WINDOWS or not own:
            return None
        if sum(w.requests for w in own) < d.min_requests:
            return None
        normal = _at_load(history, _load(own))
        margins = Margins(d.latency_factor, d.latency_margin, d.error_margin)
        reason: str | None = None
        for w in own:
            reason = worse(w, [normal], margins)
            if reason is None:
                return None
        return reason.replace("its peers'", "its normal") if reason else None

    @staticmethod
    def _history(spec: ClusterSpec, members: Sequence[MemberView], samples: Samples,
                 since: float, until: float, hosts: Mapping[str, Iterable[str]]
                 ) -> list[Sample]:
        """The windows with requests of ``members`` in ``[since, until)``."""
        return [w for ws in member_samples(
            members, samples.windows(spec.name, since, until), hosts).values()
            for w in ws if w.requests > 0]

    def _run_probe(self, spec: ClusterSpec, view: ClusterView[ClusterSpec], probe: _Probe,
                   samples: Samples, now: float, hosts: Mapping[str, Iterable[str]],
                   out: Judgement) -> None:
        """A probe under way: the probed member (a standby, or a degraded member held
        behind) has ``probe_share`` of the active's sessions. After ``probe_time``
        (up to three times that while it has seen too few requests) the two are
        compared: a standby that serves better takes the active role; a degraded member
        no worse than the active is well again (failback decides its place), a worse
        one stays degraded for another ``recover``."""
        d = spec.degradation
        name = spec.name
        active, probed = view.member(probe.active), view.member(probe.standby)
        if (active is None or active.state is not MemberState.READY or probed is None
                or probed.state not in (MemberState.READY, MemberState.DEGRADED)):
            del self._probes[name]  # something else moved: the probe is moot
            return
        what = (f"probed beside {probe.active}: well again? (was {probe.why})"
                if probe.recovery else f"probed: the active's {probe.why}")
        keep = self._record(spec, PROBE_KIND, what, probe.since, behind=probe.active)
        went = self.began(health_token(PROBE_KIND, probe.standby, probe.since), probe.since)
        elapsed = 0.0 if went is None else now - went
        if went is None or elapsed < d.probe_time:
            out.records[(name, probe.standby)] = keep
            return
        # Skip the first window: the probe's EDS push and the sessions' first moves.
        since, until = _span(now, elapsed - WINDOW)
        windows = round((until - since) / WINDOW)
        merged = member_samples([active, probed], samples.summary(name, since, until), hosts)
        a, s = merged.get(active.name), merged.get(probed.name)
        enough = s is not None and s.requests >= max(3, d.min_requests // 4)
        if not enough and elapsed < 3 * d.probe_time:
            out.records[(name, probe.standby)] = keep
            return
        del self._probes[name]
        margins = Margins(d.latency_factor, d.latency_margin, d.error_margin)
        if probe.recovery:
            still = worse(s, [a], margins) if a is not None and s is not None and enough \
                else "too few requests to judge"
            if still is None and s is not None:
                # The held member carried the probe's small share, the active the rest:
                # well again only if it is also no worse than the other members were at
                # its load or a heavier one (its own sick windows are no normal).
                others = [m for m in view.members if m.name != probed.name]
                normal = _at_load(self._history(spec, others, samples,
                                                probe.since - BASELINE, probe.since, hosts),
                                  s.requests, windows)
                still = worse(s, [normal], margins)
            if still is not None:
                out.records[(name, probe.standby)] = self._record(
                    spec, DEGRADED_KIND, f"still {_against(still, 'the active')}",
                    now, behind=probe.active)
            elif spec.failover.failback == "manual":
                out.records[(name, probe.standby)] = self._record(
                    spec, HELD_KIND, f"well again, held behind {probe.active} "
                    "(failover.failback: manual)", now, behind=probe.active)
            return
        verdict = worse(a, [s], margins) if a is not None and s is not None and enough else None
        seen = f"{probe.active}: {_figures(a)}; {probed.name}: {_figures(s)}"
        if verdict is not None and a is not None:
            # The standby carried the probe's small share, the active the rest: its
            # advantage counts only while the active is also worse than the cluster
            # was at the active's own load (a load-correlated slowdown is not).
            normal = _at_load(self._history(spec, view.members, samples,
                                            probe.since - BASELINE, probe.since, hosts),
                              a.requests, windows)
            if worse(a, [normal], margins) is None:
                verdict = None
                seen += f"; the cluster at {probe.active}'s load: {_figures(normal)}"
        if verdict is None:
            self._quiet_until[name] = now + d.recover
            out.suspects.pop(name, None)
            if spec.stickiness is not None and spec.stickiness.pin is not None:
                # The sessions the probe gave it go back to the active (stepdown.py).
                out.records[(name, probe.standby)] = self._record(
                    spec, HANDBACK_KIND, f"probed beside {probe.active}, no better "
                    f"({seen}): its sessions go back", now, behind=probe.active)
            return
        out.records[(name, active.name)] = self._record(
            spec, DEGRADED_KIND, f"{_against(verdict, 'the standby')} "
            f"(predictive failover to {probed.name})", now, behind=probed.name)
        out.suspects.pop(name, None)
        # Hold-down: the member that took the role is not probed for `recover` (its
        # health check, outlier detection and lease still act), so the role cannot
        # swing on between members within that time.
        self._quiet_until[name] = now + d.recover


def _figures(s: Sample | None) -> str:
    """What a probe saw of one member, for its record's reason."""
    if s is None or s.requests == 0:
        return "no requests"
    p90 = "" if s.p90 is None else f"p90 {s.p90 * 1000:.0f} ms, "
    return f"{p90}{s.requests} requests, {_error_rate(s):.0%} failed"


def _against(reason: str, whom: str) -> str:
    """A reason of :func:`worse` against one member (``the standby``) for its peers."""
    return reason.replace("its peers'", f"{whom}'s").replace("its peers", whom)


def _normal_of(m: MemberView, peers: Sequence[MemberView],
           base: Mapping[str, Sequence[Sample]]) -> tuple[float, float]:
    """The member's usual latency ratio and error excess against its peers: the
    lower quartile of its windows over the last :data:`BASELINE` seconds (1 and 0
    with fewer than :data:`_MIN_BASELINE_WINDOWS` windows to read). The lower
    quartile, so a sickness of up to three quarters of that minute (judged or not:
    ``action: off``, a member sick before the control plane restarted) does not
    become its normal."""
    own = list(base.get(m.name, ()))
    theirs = [list(base.get(p.name, ())) for p in peers]
    ratios: list[float] = []
    excesses: list[float] = []
    for i, w in enumerate(own):
        others = [t[i] for t in theirs if len(t) > i and t[i].requests]
        if not w.requests or not others:
            continue
        latencies = [o.p90 for o in others if o.p90]
        if w.p90 and latencies:
            ratios.append(w.p90 / statistics.median(latencies))
        excesses.append(_error_rate(w) - statistics.median(_error_rate(o) for o in others))
    normal = (1.0, 0.0)
    if len(ratios) >= _MIN_BASELINE_WINDOWS:
        normal = (max(1.0, quantile(ratios, 0.25) or 1.0),
                  max(0.0, quantile(excesses, 0.25) or 0.0))
    return normal


@dataclass(frozen=True)
class _Fixed:
    requests: int
    errors: int
    p90: float | None


LOAD_BAND = 1.5
"""Windows of comparable load: their requests at least the load judged divided by this.
A member's latency grows with its load, so it is compared only with what the cluster
answered at the same or a heavier load (a member slower than that is sick; a sick one
in a closed loop answers fewer requests, so such windows exist)."""


def _load(windows: Sequence[Sample]) -> float:
    """Requests per window over a span (its windows with requests: their median)."""
    live = [w.requests for w in windows if w.requests > 0]
    return float(statistics.median(live)) if live else 0.0


def _at_load(history: Sequence[Sample], load: float, windows: int = 1) -> _Fixed:
    """The cluster's normal at ``load`` requests per window (a span of ``windows``
    windows is divided first): the median p90 of the ``history`` windows that carried
    as much or more (:data:`LOAD_BAND`; None without :data:`_MIN_BASELINE_WINDOWS` of
    them: nothing to compare latency with), and the error share of every window."""
    per_window = load / max(1, windows)
    near = [w.p90 for w in history if w.p90 is not None
            and w.requests >= per_window / LOAD_BAND]
    return _Fixed(requests=sum(w.requests for w in history),
                  errors=sum(w.errors for w in history),
                  p90=statistics.median(near) if len(near) >= _MIN_BASELINE_WINDOWS else None)


