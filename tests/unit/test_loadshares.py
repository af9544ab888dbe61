"""Load-based shares (meshxl.xds.loadshares) against a simulated cluster whose members'
latency follows their load (an M/M/1 queue each): the shares settle where every member
answers in about the same time, a member with half the capacity at about half the share;
jitter and equal members move nothing."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from meshxl.model import RuntimeState, parse_model
from meshxl.xds.loadshares import MAX_CHANGE, LoadShares

NOW = 1_000_000.0
MODEL = parse_model("""
clusters:
- name: web
  mode: load-sharing
  shares: load
  members:
  - {name: a, address: 127.0.0.1, port: 8001}
  - {name: b, address: 127.0.0.1, port: 8002}
  - {name: c, address: 127.0.0.1, port: 8003}
""")
PORTS = {"a": 8001, "b": 8002, "c": 8003}


@dataclass(frozen=True)
class S:
    requests: int
    errors: int
    p90: float | None


class Queues:
    """Each member an M/M/1 queue: p90 = ln(10) / (capacity - arrivals) seconds."""

    def __init__(self, capacity: dict[str, float], rate: float, jitter: float = 0.0,
                 seed: int = 1) -> None:
        self.capacity, self.rate, self.jitter = capacity, rate, jitter
        self.shares = dict.fromkeys(capacity, 1.0)
        self.random = random.Random(seed)

    def summary(self, cluster: str, since: float, until: float) -> dict[str, S]:
        total = sum(self.shares.values())
        out = {}
        for m, cap in self.capacity.items():
            arrivals = self.rate * self.shares[m] / total
            p90 = 2.303 / max(cap - arrivals, cap * 0.01)
            p90 *= 1 + self.random.uniform(-self.jitter, self.jitter)
            out[f"127.0.0.1:{PORTS[m]}"] = S(int(arrivals * (until - since)), 0, p90)
        return out

    def windows(self, cluster: str, since: float, until: float) -> dict[str, list[S]]:
        return {}


def run(queues: Queues, steps: int = 60) -> list[dict[str, float]]:
    shares = LoadShares()
    seen = []
    for i in range(steps):
        found = shares.update(MODEL, RuntimeState(), queues, NOW + i)
        queues.shares = {m: found.get("web", {}).get(m, 1.0) for m in PORTS}
        seen.append(dict(queues.shares))
    return seen


@pytest.mark.parametrize("rate", [900.0, 1200.0, 1800.0])
def test_a_member_with_half_the_capacity_ends_with_about_half_the_share(rate: float) -> None:
    queues = Queues({"a": 1000.0, "b": 1000.0, "c": 500.0}, rate=rate)
    seen = run(queues)
    final = seen[-1]
    assert final["a"] == final["b"] == 1.0
    assert 0.45 <= final["c"] <= 0.6, final
    # bounded movement: no step changes a share by more than MAX_CHANGE
    for before, after in zip(seen, seen[1:], strict=False):
        for m in PORTS:
            assert after[m] <= before[m] * MAX_CHANGE + 1e-9
            assert after[m] >= before[m] / MAX_CHANGE - 1e-9


def test_shares_follow_capacity_when_most_members_are_small() -> None:
    final = run(Queues({"a": 1000.0, "b": 500.0, "c": 500.0}, rate=1200.0))[-1]
    assert final["a"] == 1.0 and all(0.45 <= final[m] <= 0.6 for m in "bc"), final


def test_equal_members_with_jitter_keep_their_shares() -> None:
    queues = Queues({"a": 1000.0, "b": 1000.0, "c": 1000.0}, rate=1800.0, jitter=0.1)
    assert all(s == {"a": 1.0, "b": 1.0, "c": 1.0} for s in run(queues))


def test_static_shares_and_high_availability_are_left_alone() -> None:
    for text in ("shares: static\n  mode: load-sharing", "shares: load\n  mode: high-availability"):
        model = parse_model(f"""
clusters:
- name: web
  {text}
  members:
  - {{name: a, address: 127.0.0.1, port: 8001}}
  - {{name: c, address: 127.0.0.1, port: 8003}}
""")
        queues = Queues({"a": 1000.0, "c": 300.0}, rate=900.0)
        assert LoadShares().update(model, RuntimeState(), queues, NOW) == {}
