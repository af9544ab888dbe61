"""bench/streamcheck.py's resume time: a stream is back once it answers on the
connection that carries it from then on, not on one that breaks again."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from streamcheck import StreamLog, resume_times_ms  # noqa: E402

KILL = 100.0


def _log(name: str, answers: list[tuple[float, int, str]]) -> StreamLog:
    """Answers as (seconds after the kill, connection, member)."""
    return StreamLog(name, answers=[(k, 1, 1, member, KILL + t, conn)
                                    for k, (t, conn, member) in enumerate(answers, 1)])


def test_a_stream_that_broke_again_resumed_on_its_last_connection() -> None:
    steady = _log("steady", [(-0.2, 1, "a"), (0.3, 2, "b"), (0.5, 2, "b")])
    rebroken = _log("rebroken", [(-0.2, 1, "a"), (0.3, 2, "b"), (2.0, 3, "b"),
                                 (2.2, 3, "b")])
    times, unresumed = resume_times_ms([steady, rebroken], KILL, "a")
    assert [round(t) for t in times] == [300, 2000] and unresumed == []


def test_only_the_killed_members_streams_count_and_a_silent_one_did_not_resume() -> None:
    never = _log("never", [(-0.2, 1, "a")])
    elsewhere = _log("elsewhere", [(-0.2, 1, "b"), (0.3, 2, "c")])  # not on a at the kill
    times, unresumed = resume_times_ms([never, elsewhere], KILL, "a")
    assert times == [] and unresumed == ["never"]
