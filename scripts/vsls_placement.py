#!/usr/bin/env python3
"""Measure the virtual-system placement's worst cases over generated pools (pure, no
processes): the numbers docs/vsls.md quotes.

    .venv/bin/python scripts/vsls_placement.py [--pools 2000] [--seed 1]

Per case, over ``--pools`` random pools (2-8 members, capacities 50-200, one to three
sites, 1-120 virtual systems of weight 1, then of weights 1-4; every fourth pool is 60
VSs on 4 members): the busiest member's active weight as a multiple of its fair share
(60 on 4, and any pool of at least 40 VSs); standbys on the active's site while another
site has a member; after a member is lost, how
many active roles moved beyond the ones it held; after a member joins (appended to the
pool), the active roles moved, and their weight, as a multiple of its ideal share; the
roles moved as a multiple of its ideal share (its fair share of active roles
plus its fair share of standbys where the actives are; the standbys the site rule sends
across when their VS's active moves to the joiner's site counted apart), and the
standbys moved the same way against its fair share of standbys (a role moved: a VS's
active or standby on another member than before, as ``bench/vsls.py`` counts); the busiest
standby holder against its fair share (where the actives are) and against its share of
the pool's capacity.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshxl.model.placement import (  # noqa: E402
    PoolMember,
    VirtualRoles,
    base_placement,
    eligible,
    live_placement,
    standby_shares,
)


def busiest(placement: dict[str, VirtualRoles], members: list[PoolMember],
            weight: dict[str, int]) -> float:
    total = sum(weight.values())
    capacity = sum(m.capacity for m in members)
    return max(sum(weight[v] for v, r in placement.items() if r.active == m.name)
               / (total * m.capacity / capacity) for m in members)


def measure(pools: int, seed: int, weighted: bool) -> dict[str, float]:
    rnd = random.Random(seed)
    out = {"busiest_60_on_4": 0.0, "busiest_40_plus": 0.0, "lost_extra_moves": 0.0,
           "lost_not_to_standby": 0.0, "standby_same_site": 0.0,
           "join_actives_x_ideal": 0.0, "join_active_weight_x_ideal": 0.0,
           "join_standbys_x_share": 0.0,
           "join_standbys_to_new_x_share": 0.0,
           "join_roles_x_ideal": 0.0, "join_roles_x_ideal_one_site": 0.0,
           "join_site_forced_x_ideal": 0.0,
           "standby_busiest_x_share_40_plus": 0.0,
           "standby_busiest_x_capacity_60_on_4_one_site": 0.0,
           "standby_busiest_x_share_60_on_4_one_site": 0.0}
    for trial in range(pools):
        if trial % 4 == 0:
            count, systems = 4, 60
        else:
            count, systems = rnd.randint(2, 8), rnd.randint(1, 120)
        sites = rnd.randint(1, 3)
        members = [PoolMember(f"m{i}", f"s{rnd.randrange(sites)}",
                              rnd.choice([50, 100, 100, 150, 200])) for i in range(count)]
        vss = [(f"p{trial}-v{i}", rnd.randint(1, 4) if weighted else 1, 0)
               for i in range(systems)]
        weight = {name: w for name, w, _ in vss}
        base = base_placement(f"pool{trial}", members, vss)
        ratio = busiest(base, members, weight)
        if systems >= 40:  # fewer: one whole VS is already a large part of a share
            out["busiest_40_plus"] = max(out["busiest_40_plus"], ratio)
            shares = standby_shares(base, members, weight)
            out["standby_busiest_x_share_40_plus"] = max(
                out["standby_busiest_x_share_40_plus"],
                max(held / fair for held, fair in shares.values() if fair))
        if count == 4 and systems == 60:
            out["busiest_60_on_4"] = max(out["busiest_60_on_4"], ratio)
        site = {m.name: m.site for m in members}
        for roles in base.values():
            if len({site[m] for m in roles.order}) > 1 and site[roles.active] == site[
                    roles.standby]:
                out["standby_same_site"] += 1
        lost = rnd.choice(members).name
        after = live_placement(base, members, [lost])
        extra = sum(1 for v, r in base.items()
                    if r.active != lost and after[v].active != r.active)
        wrong = sum(1 for v, r in base.items()
                    if r.active == lost and after[v].active != r.standby)
        out["lost_extra_moves"] = max(out["lost_extra_moves"], extra)
        out["lost_not_to_standby"] = max(out["lost_not_to_standby"], wrong)
        new = PoolMember("joined", f"s{rnd.randrange(sites)}", rnd.choice([50, 100, 200]))
        grown_members = [*members, new]
        grown = base_placement(f"pool{trial}", grown_members, vss)
        ideal = systems * new.capacity / (sum(m.capacity for m in members) + new.capacity)
        # Its fair share of standbys (in roles) where the actives now are.
        share = standby_shares(grown, grown_members, dict.fromkeys(weight, 1))["joined"][1]
        if ideal >= 5:  # below, one whole VS is already 20 % of the ideal
            actives = [v for v in base if grown[v].active != base[v].active]
            # The site rule sends a standby across when its VS's active moved to the
            # joiner's site: counted apart.
            allowed = set(eligible("joined", grown_members))
            forced = {v for v in actives if base[v].standby not in allowed}
            standbys = [v for v in base if grown[v].standby != base[v].standby]
            to_new = sum(1 for v in standbys if grown[v].standby == "joined")
            roles = (len(actives) + len(standbys) - len(forced)) / (ideal + share)
            out["join_actives_x_ideal"] = max(out["join_actives_x_ideal"],
                                              len(actives) / ideal)
            # The load a join moves: the weight of those VSs over its fair share of it.
            fair = sum(weight.values()) * new.capacity / sum(m.capacity for m in grown_members)
            out["join_active_weight_x_ideal"] = max(out["join_active_weight_x_ideal"],
                                                    sum(weight[v] for v in actives) / fair)
            if share >= 5:
                out["join_standbys_x_share"] = max(
                    out["join_standbys_x_share"], (len(standbys) - len(forced)) / share)
                out["join_standbys_to_new_x_share"] = max(
                    out["join_standbys_to_new_x_share"], to_new / share)
            out["join_roles_x_ideal"] = max(out["join_roles_x_ideal"], roles)
            out["join_site_forced_x_ideal"] = max(out["join_site_forced_x_ideal"],
                                                  len(forced) / ideal)
            if sites == 1:
                out["join_roles_x_ideal_one_site"] = max(
                    out["join_roles_x_ideal_one_site"], roles)
        if sites == 1 and count == 4 and systems == 60:
            total = sum(weight.values())
            capacity = sum(m.capacity for m in members)
            standby = max(sum(weight[v] for v, r in base.items() if r.standby == m.name)
                          / (total * m.capacity / capacity) for m in members)
            key = "standby_busiest_x_capacity_60_on_4_one_site"
            out[key] = max(out[key], standby)
            shares = standby_shares(base, members, weight)
            key = "standby_busiest_x_share_60_on_4_one_site"
            out[key] = max(out[key], max(h / f for h, f in shares.values() if f))
    return out


def sixty_on_four() -> dict[str, float]:
    """Every capacity mix (50, 100, 150, 200) and site layout of 4 members, 60 VSs: the
    busiest standby holder against its fair share, by how far capacities spread."""
    out = {"equal_capacities": 0.0, "capacities_within_1.5x": 0.0,
           "capacities_within_2x": 0.0, "any_capacities": 0.0}
    vss = [(f"t{i:02d}", 1, 0) for i in range(60)]
    weight = dict.fromkeys((v for v, _, _ in vss), 1)
    for caps in itertools.product([50, 100, 150, 200], repeat=4):
        for layout in ("aaaa", "abab", "aabb", "aaab"):
            members = [PoolMember(f"m{i}", layout[i], c) for i, c in enumerate(caps)]
            shares = standby_shares(base_placement("web", members, vss), members, weight)
            ratio = max(h / f for h, f in shares.values() if f)
            spread = max(caps) / min(caps)
            for key, limit in (("equal_capacities", 1), ("capacities_within_1.5x", 1.5),
                               ("capacities_within_2x", 2), ("any_capacities", 4)):
                if spread <= limit:
                    out[key] = max(out[key], ratio)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    for weighted in (False, True):
        found = measure(args.pools, args.seed, weighted)
        label = "VS weights 1-4" if weighted else "VS weight 1"
        print(f"{label} ({args.pools} pools, seed {args.seed}):")
        for key, value in found.items():
            print(f"  {key:45} {value:.3f}")
    print("busiest standby holder / its fair share, 60 VSs on 4 members, every capacity "
          "mix and site layout:")
    for key, value in sixty_on_four().items():
        print(f"  {key:45} {value:.3f}")


if __name__ == "__main__":
    main()
