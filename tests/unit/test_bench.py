"""The benchmarks' pure parts: verdicts, the failover computations, the summary picture.

The benchmarks themselves run with ``make bench`` (not part of the test suite); this
keeps what they compute and draw honest without starting a process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import benchlib  # noqa: E402
import summary  # noqa: E402
from failover import disruption_ms, regressions  # noqa: E402

from meshxl.local.traffic import Record  # noqa: E402


def test_verdict_directions() -> None:
    assert benchlib.Verdict("x", 99.0, 100.0, "ms").met is True
    assert benchlib.Verdict("x", 101.0, 100.0, "ms").met is False
    assert benchlib.Verdict("x", 0.9, 1.0, "x", at_most=False).met is False
    assert benchlib.Verdict("x", 1.0, 1.0, "x", at_most=False).met is True
    assert benchlib.Verdict("x", None, 1.0, "x").met is None
    assert "MISSED" in benchlib.Verdict("lost writes", 2, 0, "writes").line()


def test_summary_ms_and_quantile() -> None:
    s = benchlib.summary_ms([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["n"] == 5 and s["p50"] == 3.0 and s["max"] == 100.0
    assert s["p99"] == 100.0  # nearest rank: ceil(0.99 * 5) = 5th of 5, the slowest
    assert benchlib.summary_ms([]) == {"n": 0}


def _r(session: str, sent: float, ended: float, status: int = 200, member: str | None = "a",
       seq: int | None = None) -> Record:
    return Record(sent, ended, session, status, member if status == 200 else None, seq)


def test_disruption_counts_from_the_next_need_not_idle_time() -> None:
    kill = 10.0
    records = [
        # s1: served by a before the kill; in flight at the kill; retried to b at 10.040
        _r("s1", 9.5, 9.51, seq=1), _r("s1", 9.99, 10.040, member="b", seq=2),
        # s2: idle at the kill; next request 0.3 s later succeeds in 5 ms
        _r("s2", 9.6, 9.61, seq=1), _r("s2", 10.3, 10.305, member="b", seq=2),
        # s3: served by b: not a session of the killed member
        _r("s3", 9.7, 9.71, member="b", seq=1), _r("s3", 10.1, 10.2, member="b", seq=2),
        # s4: fails after the kill, then recovers at 10.100
        _r("s4", 9.8, 9.81, seq=1), _r("s4", 10.01, 10.05, status=503),
        _r("s4", 10.06, 10.100, member="b", seq=2),
        # s5: never recovers
        _r("s5", 9.9, 9.91, seq=1), _r("s5", 10.02, 10.5, status=0),
    ]
    rto, unrecovered = disruption_ms(records, kill, "a")
    assert sorted(round(x, 3) for x in rto) == [5.0, 40.0, 90.0]
    assert unrecovered == ["s5"]


def test_regressions_find_undone_writes() -> None:
    fine = [_r("s", t, t + 0.01, seq=i) for i, t in enumerate((1.0, 2.0, 3.0), start=1)]
    assert regressions(fine) == {}
    # seq 3 acknowledged, then the counter went back to 2: writes 2 and 3 were lost
    lost = [_r("s", 1.0, 1.01, seq=1), _r("s", 2.0, 2.01, seq=2), _r("s", 3.0, 3.01, seq=3),
            _r("s", 4.0, 4.01, seq=2), _r("s", 5.0, 5.01, seq=3)]
    assert regressions(lost) == {"s": 2}
    # a retried write that both members applied only skips a number: nothing lost
    assert regressions([_r("s", 1.0, 1.01, seq=1), _r("s", 2.0, 2.01, seq=3)]) == {}


def test_summary_reads_verdicts_and_draws(tmp_path: Path) -> None:
    verdicts = [benchlib.Verdict("fast enough", 50.0, 100.0, "ms"),
                benchlib.Verdict("throughput", 0.5, 1.0, "x", at_most=False),
                benchlib.Verdict("lost writes", 0, 0, "writes")]
    (tmp_path / "one.json").write_text(json.dumps({
        "benchmark": "one", "quick": True, "env": {"loadavg_at_start": [1.0, 1.0, 1.0]},
        "verdicts": [v.as_dict() for v in verdicts]}))
    (tmp_path / "junk.json").write_text("not json")
    rows = summary.load(tmp_path)
    assert [r["met"] for r in rows] == [True, False, True]
    assert [summary._score(r) for r in rows] == [0.5, 2.0, 0.1]
    out = summary.draw(rows, tmp_path / "summary.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
