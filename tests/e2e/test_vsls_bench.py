"""``bench/vsls.py --quick`` end to end, as a user runs it (the smoke run of the
virtual-systems measurement): real etcd, control plane and Envoy on loopback, one pool
of four members serving a dozen VSs by Host under sticky load.

What must hold whatever the placement's balance figures: the run completes every part;
kill -9 of a member moves only the VSs whose active it was, each to its standby, with
no failed request on the other VSs; no acknowledged write is lost; and, once per-VS
etcd roles are built, another tenant's session is refused by etcd. The balance and
join ratios and the flood's latency ratio are reported, not asserted (a dozen VSs on a
busy machine say little about them: the full run measures them). Nothing here judges
a duration, so it is not ``heavy``: it runs beside the other workers' tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.clock import scaled

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "bench" / "vsls.py"
RUN_TIMEOUT = scaled(180.0)
"""A sanity bound on the quick run (about 25 s alone; two busy cores are slower)."""


def test_the_quick_vsls_run(tmp_path: Path) -> None:
    out = tmp_path / "vsls.json"
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--output", str(out)],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text
    res = json.loads(out.read_text())
    assert res["quick"] is True and "virtual systems: targets" in done.stdout

    placement = res["placement"]
    assert not placement["unanswered_vss"] and not placement["served_not_by_active"], placement
    kill = res["kill"]
    assert kill["own"] and kill["moved_vss"] == kill["own"], kill
    assert kill["moved_not_own"] == [] and kill["own_not_on_standby"] == [], kill
    assert kill["failed_other_vss"] == 0 and kill["requests_other_vss"] > 50, kill
    assert kill["rto_unmeasured"] == [], kill
    join = res["join"]
    assert join["active_to_new"] == join["active_moved"] > 0, join  # actives go to it only
    assert join["served_by_new_as_placed"], join
    verdicts = {v["name"]: v for v in res["verdicts"]}
    if res["stateful"]:
        assert res["lost"] == 0 and res["writes_acknowledged"] > 100, res
        assert verdicts["acknowledged writes lost (whole run)"]["met"] is True
    auth = res["auth"]
    if "skipped" not in auth:
        assert auth["not_refused"] == 0 and auth["own_session_read_and_written"], auth
