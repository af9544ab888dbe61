"""A high-availability probe judges the members for the load each carries
(meshxl.xds.health): two identical members whose latency grows with their load never
swap the active role, and a member really slower at the same load still does."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from meshxl.model import RuntimeState, cluster_view, parse_model
from meshxl.model.runtime import Health, Role
from meshxl.xds.health import WINDOW, Judge

NOW = 1_000_000.0
HOSTS = {"a": "127.0.0.1:8001", "b": "127.0.0.1:8002"}
MODEL = parse_model("""
clusters:
- name: web
  mode: high-availability
  degradation: {action: move, recover: 4s}
  failover: {failback: automatic, failback_delay: 2s}
  members:
  - {name: a, address: 127.0.0.1, port: 8001}
  - {name: b, address: 127.0.0.1, port: 8002}
""")


@dataclass(frozen=True)
class S:
    requests: int
    errors: int
    p90: float | None


@dataclass
class Bed:
    """Windows as the members served them: each window's load split by the roles the
    judgements gave (the active's tier; a probed standby its ``probe_share``)."""

    load: Callable[[float], int]
    """Requests in the window starting at ``t``."""
    latency: Callable[[str, int, float], float]
    """p90 of member ``m`` serving ``n`` requests in the window starting at ``t``."""
    got: dict[tuple[str, float], S] = field(default_factory=dict)
    health: dict[tuple[str, str], Health] = field(default_factory=dict)

    def state(self) -> RuntimeState:
        return RuntimeState(health=dict(self.health))

    def serve(self, t: float) -> None:
        spec = MODEL.clusters[0]
        view = cluster_view(spec, self.state())
        tier = [m for m in view.members if m.priority == 0]
        probe = next((m for m in tier if m.role is not Role.ACTIVE), None)
        total = self.load(t)
        for m in tier:
            if probe is None:
                n = total
            elif m is probe:
                n = round(total * spec.degradation.probe_share)
            else:
                n = total - round(total * spec.degradation.probe_share)
            if n:
                self.got[(HOSTS[m.name], t)] = S(n, 0, self.latency(m.name, n, t))

    def windows(self, cluster: str, since: float, until: float) -> dict[str, list[S]]:
        count = round((until - since) / WINDOW)
        return {h: [self.got.get((h, since + i * WINDOW), S(0, 0, None)) for i in range(count)]
                for h in HOSTS.values()}

    def summary(self, cluster: str, since: float, until: float) -> dict[str, S]:
        out = {}
        for host, ws in self.windows(cluster, since, until).items():
            live = [w for w in ws if w.requests]
            if live:
                out[host] = S(sum(w.requests for w in live), 0,
                              statistics.median(w.p90 for w in live if w.p90 is not None))
        return out

    def run(self, start: float, seconds: float) -> list[tuple[float, str]]:
        """Serve and judge every window; the active after each judgement."""
        judge = Judge("r1")
        actives: list[tuple[float, str]] = []
        t = start
        while t < start + seconds:
            self.serve(t)
            t += WINDOW
            found = judge.judge(MODEL, self.state(), self, t)  # type: ignore[arg-type]
            self.health = dict(found.records)
            view = cluster_view(MODEL.clusters[0], self.state())
            actives.append((t - start, next(m.name for m in view.members
                                            if m.role is Role.ACTIVE)))
        return actives


def ramp(t: float) -> int:
    """20 requests a window for a minute, then five times as many within 3 s."""
    if t < NOW:
        return 20
    return min(100, 20 + round((t - NOW) / 3.0 * 80))


def by_load(member: str, n: int, t: float) -> float:
    """Identical members: 5 ms, and 0.4 ms more per request of their window."""
    return 0.005 + 0.0004 * n


def test_identical_members_slowed_by_their_load_never_swap_roles() -> None:
    bed = Bed(ramp, by_load)
    actives = bed.run(NOW - 60, 90)
    moved = [(t, m) for t, m in actives if m != "a"]
    assert moved == [], f"the active role left a at {moved[0][0]:.1f}s"
    assert not any(h.kind == "degraded" for h in bed.health.values())


def test_a_member_slower_at_the_same_load_still_hands_its_role_over() -> None:
    """The same ramp, but a answers 200 ms slower for its own reasons from NOW + 10
    (a slow dependency of its own): judged against what the cluster answered at that
    load, it is sick, and it stays behind b while it is."""
    def sick_a(member: str, n: int, t: float) -> float:
        return by_load(member, n, t) + (0.2 if member == "a" and t >= NOW + 10 else 0.0)
    actives = Bed(ramp, sick_a).run(NOW - 60, 90)
    first_b = next(t for t, m in actives if m == "b")
    assert 70 <= first_b <= 76, actives
    assert all(m == "b" for t, m in actives if t >= first_b), "it moved back"
