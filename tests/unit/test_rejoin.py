"""The failback hold a sidecar keeps for its member (statesync/failback.py): when a
member that comes back is held, behind whom, and when the hold ends."""

from __future__ import annotations

import asyncio

from meshxl.model import Failover
from meshxl.model.decode import decode
from meshxl.statesync.failback import Rejoin


def rejoin(serving: tuple[str, ...] = ("b",), **failover: object) -> tuple[Rejoin, list[int]]:
    ended: list[int] = []
    r = Rejoin(lambda: ended.append(1))
    r.serving = lambda: serving
    r.configure(decode(failover, Failover))
    return r, ended


async def test_a_new_member_joins_at_once_and_one_that_comes_back_is_held() -> None:
    r, _ = rejoin(failback_delay=60)
    assert not r.well(True, "first ready")  # never served: no hold
    assert r.returning is None and r.served
    assert not r.well(False, "")
    assert r.well(True, "problem db cleared")
    assert r.returning is not None
    assert r.returning["behind"] == ["b"] and r.returning["why"] == "problem db cleared"
    r.cancel()


async def test_nothing_to_stand_behind_and_no_policy_mean_no_hold() -> None:
    r, _ = rejoin(serving=(), failback_delay=60)
    r.served = True
    assert not r.well(True, "back") and r.returning is None
    r, _ = rejoin()
    r.configure(None)  # no model: nothing read, nothing held
    r.served = True
    assert not r.well(True, "back") and r.returning is None


async def test_automatic_failback_ends_the_hold_after_the_delay_of_staying_well() -> None:
    r, ended = rejoin(failback_delay=0.05)
    r.served = True
    assert r.well(True, "back")
    # A flap restarts the wait; mesh changes that leave the policy as it is do not.
    r.well(False, "")
    r.well(True, "back")
    for _ in range(10):  # 0.2 s of mesh changes, every 20 ms: the delay runs all the same
        r.configure(decode({"failback_delay": 0.05}, Failover))
        await asyncio.sleep(0.02)
    assert r.returning is None and ended == [1]


async def test_manual_failback_holds_until_the_members_it_stood_behind_are_gone() -> None:
    r, ended = rejoin(failback="manual")
    r.served = True
    assert r.well(True, "back")
    await asyncio.sleep(0.05)
    assert r.returning is not None and ended == []
    r.unheld()
    assert r.returning is None and ended == [1]
    # A policy that holds nobody ends a running hold.
    r.well(False, "")
    assert r.well(True, "back again")
    r.configure(decode({"failback_delay": 0}, Failover))
    assert r.returning is None and ended == [1, 1]
