"""The pure parts of ``bench/vsls.py``: what counts as a lost write, who serves a VS,
the busiest member's share as served, and the model the bed applies."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import vsls  # noqa: E402
import vsls_bed as bed  # noqa: E402

from meshxl.model import parse_model  # noqa: E402


def rec(vs: str, sent: float, seq: int | None, status: int = 200, member: str = "w1",
        session: str = "s0") -> bed.Rec:
    return bed.Rec(vs, session, sent, sent + 0.01, status, member, seq, True)


def test_a_counter_going_back_or_a_final_read_below_it_is_a_lost_write() -> None:
    records = [rec("v01", 1, 1), rec("v01", 2, 2), rec("v01", 3, None, status=0),
               rec("v01", 4, 4), rec("v02", 1, 1), rec("v02", 2, 2)]
    assert bed.lost_writes(records, {("v01", "s0"): 4, ("v02", "s0"): 2}) == 0
    # v02 answered 1 after 2: one write undone; the final read one short of the last
    records.append(rec("v02", 3, 1))
    assert bed.lost_writes(records, {("v01", "s0"): 3, ("v02", "s0"): 2}) == 2 + 1
    assert bed.lost_writes(records[:4], {}) == 4  # never read back: all of it


def test_each_vs_is_held_by_the_member_answering_it_most() -> None:
    records = [rec("v01", 1, 1, member="w1"), rec("v01", 2, 2, member="w1"),
               rec("v01", 3, 3, member="w2"), rec("v02", 1, 1, member="w2"),
               rec("v03", 1, 1, member="w2"), rec("v04", 1, 1, status=503, member="w3")]
    served = bed.served_by(records, 0, 10)
    assert served == {"v01": {"w1": 2, "w2": 1}, "v02": {"w2": 1}, "v03": {"w2": 1}}
    share = vsls.share_of_served(served, ["w1", "w2", "w3"], {})
    assert share == {"held": {"w1": 1, "w2": 2, "w3": 0}, "ratio": 2.0}


def test_the_bed_model_is_a_pool_of_sites_a_and_b_with_every_vs() -> None:
    members = [bed.Member(f"w{i}", "ab"[i % 2], 18000 + i, 19000 + i) for i in range(4)]
    model = parse_model(bed.model_text(members, 10000, bed.vs_names(60)))
    (pool,) = model.pools
    assert [m.name for m in pool.members] == ["w0", "w1", "w2", "w3"]
    assert len([c for c in model.clusters if c.name.startswith("v")]) == 60
    assert model.cluster("v07") is not None


def test_the_join_counts_moves_as_the_placement_script_does() -> None:
    """60 VSs on four members, sites a and b in turn, then a fifth on a: 12 actives and
    8 standbys to it (its share where the actives are), and the 6 standbys the site rule
    sends from a to b (a's actives grew from 30 to 36) counted apart."""
    import vsls_parts

    from meshxl.model.placement import PoolMember, base_placement

    systems = [(vs, 1, 0) for vs in bed.vs_names(60)]

    def report(count: int) -> dict[str, object]:
        members = [PoolMember(f"w{i + 1}", "ab"[i % 2], 100) for i in range(count)]
        roles = base_placement(bed.POOL, members, systems)
        return {"pools": [{"members": [
                    {"name": m.name, "site": m.site, "capacity": m.capacity,
                     "fair_share": 60 / count} for m in members]}],
                "virtual_systems": [{"name": vs, "active": r.active, "standby": r.standby}
                                    for vs, r in roles.items()]}

    moves = vsls_parts.join_moves(report(4), report(5), "w5")
    assert (moves["ideal"], moves["standby_ideal"]) == (12, 8)
    assert moves["active_moved"] == moves["active_to_new"] == 12
    assert (moves["standby_moved"], moves["standby_site_forced"],
            moves["standby_to_new"]) == (14, 6, 8)
    assert moves["standby_ratio"] == moves["roles_ratio"] == 1.0
