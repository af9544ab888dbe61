"""docs/statesync.md's "Following one PUT" names every module a PUT does work in.

A real PUT goes through a sidecar in this process (its HTTP server on a real socket, a
real etcd) while ``sys.setprofile`` notes each meshxl module whose code runs for it:
on the way down and back, in the connection's callbacks and in the tasks the request
makes, not in the sidecar's background loops (the tasks that were running before it:
watches, keepalives, housekeeping). That set and the doc's list must be the same.
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

import meshxl
from tests.harness import EtcdServer, inproc
from tests.harness.inproc import RawHttp

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(meshxl.__file__).resolve().parent


def _documented() -> set[str]:
    """The modules the walk's list names (its line starting "Every module a PUT")."""
    text = (ROOT / "docs" / "statesync.md").read_text()
    walk = text.split("## Following one PUT", 1)[1].split("\n## ", 1)[0]
    listing = walk.split("Every module a PUT does work in", 1)[1].split("\n\n", 1)[0]
    return set(re.findall(r"`(meshxl/[\w/]+\.py)`", listing))


async def _traced_put(port: int, session: str) -> tuple[int, set[str]]:
    http = await RawHttp.open(port)
    try:
        background = asyncio.all_tasks()
        seen: set[str] = set()

        def profile(frame: FrameType, event: str, arg: Any) -> None:
            if event != "call":
                return
            path = frame.f_code.co_filename
            if not path.startswith(str(PACKAGE)):
                return
            try:
                task = asyncio.current_task()
            except RuntimeError:
                task = None
            if task is None or task not in background:
                seen.add("meshxl/" + str(Path(path).relative_to(PACKAGE)))

        sys.setprofile(profile)
        try:
            status, _ = await http.call("PUT", f"/v1/sessions/{session}", b'{"n": 1}')
        finally:
            sys.setprofile(None)
        return status, seen
    finally:
        http.close()


async def test_the_walk_names_every_module_a_put_does_work_in(etcd: EtcdServer) -> None:
    async with inproc.sidecar(etcd.url) as (port, _side):
        # A first write of another session: what runs once per process (imports, the
        # first lease) is not what every PUT does.
        warm = await RawHttp.open(port)
        assert (await warm.call("PUT", "/v1/sessions/warm", b"{}"))[0] == 201
        warm.close()
        # The module set of one PUT, the same in two: what runs only now and then
        # (a lease's bucket turning over) would differ between them.
        first_status, first = await _traced_put(port, "walk-1")
        second_status, second = await _traced_put(port, "walk-2")
    assert (first_status, second_status) == (201, 201)
    traced = first & second
    documented = _documented()
    assert traced == documented, (
        f"docs/statesync.md's walk misses {sorted(traced - documented)} and names "
        f"{sorted(documented - traced)} that a PUT does not run")
