"""docs/statesync.md's "Following one PUT" names the modules a PUT runs in, and its spine.

A real PUT goes through a sidecar in this process (its HTTP server on a real socket, a
real etcd) while ``sys.setprofile`` follows it: on the way down and back, in the
connection's callbacks and in the tasks the request makes, not in the sidecar's
background loops (the tasks that were running before it: watches, keepalives,
housekeeping). Three things are held:

* every meshxl module whose code runs for the PUT: equal to the doc's full list;
* the *spine*, the modules that carry the PUT to etcd: those with a frame on the PUT's
  stack when its etcd transaction goes out (a call from a meshxl frame into gRPC),
  where the stack of a task the PUT made is continued by the stack that made the task
  (the connection's callback that took the request up, down to the batch's task): at
  most :data:`MAX_SPINE`, and equal to the doc's spine list (the transaction goes out in
  a call into gRPC or into ``meshxl.etcd.h2c``'s ``Channel.call``, a plain client's
  HTTP/2 path, neither of them part of the spine). Every other module the PUT
  runs in is a *leaf*: its functions are called and return while no transaction of
  the PUT is under way from them;
* with session shards (one shard, its own etcd), the same spine: the shard is chosen
  on the way, in no module of its own;
* the returns to a module already left: following each of the PUT's tasks call by
  call (a coroutine's suspensions and resumptions are not calls), its *stays* are the
  runs of consecutive frames in one module, and each stay in a module the task was in
  before is a return to it. At most :data:`MAX_RETURNS` in all, and at most
  :data:`MAX_SPINE_RETURNS` along the spine alone (leaves' stays left out).
"""

from __future__ import annotations

import asyncio
import dis
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

import meshxl
from meshxl.statesync.shards import ShardedSessions
from tests.harness import EtcdServer, inproc
from tests.harness.cli import meshxl_json
from tests.harness.etcd import start_etcd
from tests.harness.inproc import RawHttp

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = str(Path(meshxl.__file__).resolve().parent)
GRPC = "/grpc/"
H2C = "meshxl/etcd/h2c.py"
"""A plain etcd client's transactions go out through ``Channel.call`` there rather than
through gRPC (``meshxl.etcd.h2c``): the call that sends, not a module that carries."""
TRANSPORT = frozenset({H2C, "meshxl/etcd/h2conn.py", "meshxl/etcd/h2calls.py",
                       "meshxl/h2wire.py"})
"""That HTTP/2 path's modules: named in the walk like any module a PUT runs in, but left
out of the returns counted, as grpcio's code (outside meshxl) is on a secure client's
path: its frames, calls and connection calling each other are the transport's own
work, not the PUT's path going back and forth."""

MAX_SPINE = 5
"""Modules that carry a PUT to etcd, at most (issue 39)."""
MAX_RETURNS = 95
"""Returns to a module already left in one PUT, leaves included, at most (95 measured
with the head's admission in a module of its own, 94 before; 91 with the write path in
five modules, 87 before: the calls into leaves, each a return, stayed as many; the
batch's bookkeeping moved to a leaf of its own, ``batches``)."""
MAX_SPINE_RETURNS = 10
"""Returns to a spine module already left, leaves' stays left out, at most (10 measured
with the write path in five modules; 14 before, when the store and the batcher called
each other on the way down and back)."""

_YIELD = dis.opmap["YIELD_VALUE"]
_SUSPENDS = 0x80 | 0x100 | 0x200 | 0x20  # coroutine, iterable coroutine, async gen, gen


def _walk_section() -> str:
    text = (ROOT / "docs" / "statesync.md").read_text()
    return text.split("## Following one PUT", 1)[1].split("\n## ", 1)[0]


def _listed(after: str) -> set[str]:
    """The modules named in the walk's paragraph that starts with ``after``."""
    listing = _walk_section().split(after, 1)[1].split("\n\n", 1)[0]
    return set(re.findall(r"`(meshxl/[\w/]+\.py)`", listing))


def _module(frame: FrameType) -> str | None:
    path = frame.f_code.co_filename
    if not path.startswith(PACKAGE):
        return None
    return "meshxl" + path[len(PACKAGE):]


def _modules_on(frame: FrameType | None) -> list[str]:
    modules = []
    while frame is not None:
        module = _module(frame)
        if module is not None:
            modules.append(module)
        frame = frame.f_back
    return modules


def _suspends(frame: FrameType) -> bool:
    """A coroutine or generator frame stopping at a yield (it does not return)."""
    code = frame.f_code
    return bool(code.co_flags & _SUSPENDS) and frame.f_lasti >= 0 \
        and code.co_code[frame.f_lasti] == _YIELD


class Trace:
    """What one PUT runs (the module docstring)."""

    def __init__(self, background: set[asyncio.Task[Any]]):
        self.background = background
        self.seen: set[str] = set()
        self.spine: set[str] = set()
        self.sent = 0
        """Calls into gRPC made from the PUT's meshxl frames."""
        self.lineage: dict[asyncio.Task[Any] | None, tuple[str, ...]] = {}
        """A task the PUT made -> the meshxl modules on the stack that made it."""
        self.stays: dict[asyncio.Task[Any] | None, list[str]] = {}
        self._started: set[int] = set()
        """The coroutine and generator frames under way (a call to one is its going on)."""

    def factory(self, loop: asyncio.AbstractEventLoop, coro: Any,
                **kwargs: Any) -> asyncio.Task[Any]:
        """The loop's task factory: each task remembers the stack that made it."""
        parent = asyncio.current_task(loop)
        made = tuple(_modules_on(sys._getframe(1))) + self.lineage.get(parent, ())
        task: asyncio.Task[Any] = asyncio.Task(coro, loop=loop, **kwargs)
        self.lineage[task] = made
        return task

    def _stay(self, task: asyncio.Task[Any] | None, module: str) -> None:
        if module in TRANSPORT:
            return
        stays = self.stays.setdefault(task, [])
        if not stays or stays[-1] != module:
            stays.append(module)

    def profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event not in ("call", "return"):
            return
        try:
            task = asyncio.current_task()
        except RuntimeError:
            task = None
        if task is not None and task in self.background:
            return
        module = _module(frame)
        if event == "call" and (module is None and GRPC in frame.f_code.co_filename
                                or module == H2C and frame.f_code.co_name == "call"):
            caller = frame.f_back  # the transaction goes out (the store's etcd call)
            if caller is not None and _module(caller) is not None:
                self.sent += 1
                self.spine.update(_modules_on(caller))
                self.spine.update(self.lineage.get(task, ()))
        if module is None:
            return
        caller = frame.f_back
        caller_module = _module(caller) if caller is not None else None
        suspending = frame.f_code.co_flags & _SUSPENDS
        if event == "call":
            self.seen.add(module)
            if suspending:
                if id(frame) in self._started:
                    return  # going on after a yield, not called
                self._started.add(id(frame))
            if caller_module is not None:
                self._stay(task, caller_module)
            self._stay(task, module)
        else:
            if suspending:
                if _suspends(frame):
                    return  # suspended, not returned
                self._started.discard(id(frame))
            self._stay(task, module)
            if caller_module is not None:
                self._stay(task, caller_module)

    @property
    def returns(self) -> int:
        return sum(len(stays) - len(set(stays)) for stays in self.stays.values())

    def spine_returns(self, spine: set[str]) -> int:
        """The returns to a spine module already left, leaves' stays left out (a call
        into a leaf returns at once by definition: the spine's own ping-pong)."""
        total = 0
        for stays in self.stays.values():
            carried = [m for m in stays if m in spine]
            collapsed = [m for i, m in enumerate(carried) if i == 0 or carried[i - 1] != m]
            total += len(collapsed) - len(set(collapsed))
        return total


@contextmanager
def _tracing(trace: Trace) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    previous: Callable[..., Any] | None = loop.get_task_factory()
    loop.set_task_factory(trace.factory)
    sys.setprofile(trace.profile)
    try:
        yield
    finally:
        sys.setprofile(None)
        loop.set_task_factory(previous)


async def _traced_put(port: int, session: str) -> tuple[int, Trace]:
    http = await RawHttp.open(port)
    try:
        trace = Trace(asyncio.all_tasks())
        with _tracing(trace):
            status, _ = await http.call("PUT", f"/v1/sessions/{session}", b'{"n": 1}')
        return status, trace
    finally:
        http.close()


async def _walk(port: int) -> tuple[Trace, Trace]:
    # A first write of another session: what runs once per process (imports, the first
    # lease) is not what every PUT does.
    warm = await RawHttp.open(port)
    assert (await warm.call("PUT", "/v1/sessions/warm", b"{}"))[0] == 201
    warm.close()
    # One PUT, the same in two: what runs only now and then (a lease's bucket turning
    # over) would differ between them.
    first_status, first = await _traced_put(port, "walk-1")
    second_status, second = await _traced_put(port, "walk-2")
    assert (first_status, second_status) == (201, 201)
    return first, second


def _report(trace: Trace) -> str:
    return " | ".join(f"{len(s)} stays: " + " > ".join(m.rsplit("/", 1)[1][:-3] for m in s)
                      for s in trace.stays.values() if s)


async def test_the_walk_names_every_module_a_put_runs_in_and_its_spine(
        etcd: EtcdServer) -> None:
    async with inproc.sidecar(etcd.url) as (port, _side):
        first, second = await _walk(port)
    assert first.sent >= 1 and second.sent >= 1, "no etcd transaction seen"
    traced = first.seen & second.seen
    documented = _listed("Every module a PUT runs in")
    assert traced == documented, (
        f"docs/statesync.md's walk misses {sorted(traced - documented)} and names "
        f"{sorted(documented - traced)} that a PUT does not run")
    spine = first.spine | second.spine
    assert first.spine == second.spine
    assert spine == _listed("The spine"), (
        f"the spine traced is {sorted(spine)}; docs/statesync.md names "
        f"{sorted(_listed('The spine'))}")
    assert len(spine) <= MAX_SPINE, f"a PUT is carried by {len(spine)} modules: {spine}"
    returns = max(first.returns, second.returns)
    assert returns <= MAX_RETURNS, (
        f"{returns} returns to a module already left: {_report(first)}")
    spine_returns = max(first.spine_returns(spine), second.spine_returns(spine))
    assert spine_returns <= MAX_SPINE_RETURNS, (
        f"{spine_returns} returns to a spine module already left: {_report(first)}")


async def test_a_sharded_put_has_the_same_spine(harness: Any, etcd: EtcdServer) -> None:
    shard = await start_etcd(harness, "shard-1")
    done = await meshxl_json("shards", "set", "--shard", f"s1={shard.url}", "--etcd",
                             etcd.url)
    assert done["map"]["version"] == 1, done
    async with inproc.sidecar(etcd.url) as (port, side):
        assert isinstance(side.sessions, ShardedSessions)  # each session in its shard
        first, second = await _walk(port)
    spine = first.spine | second.spine
    assert first.sent >= 1 and first.spine == second.spine
    assert spine == _listed("The spine"), (
        f"a sharded PUT's spine is {sorted(spine)}; docs/statesync.md names "
        f"{sorted(_listed('The spine'))}")
    assert max(first.spine_returns(spine), second.spine_returns(spine)) <= MAX_SPINE_RETURNS
