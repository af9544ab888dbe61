"""Shared fixtures: real etcd, Envoy and backend processes, owned by a per-test owner
(``meshxl.local.procs.Owner``, the same one the demo and the benchmarks use).

Every process a test starts through these fixtures is killed at teardown (pass or
fail), its temporary directory removed, and, when the test fails, the tail of every
process log is attached to the failure report.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# grpc-core prints connection-level INFO lines (GOAWAY on a killed etcd member) otherwise.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from contextlib import AsyncExitStack
from typing import Any

import aetcd
import pytest
from hypothesis import HealthCheck, settings

from meshxl.local import ports as _ports
from meshxl.local.procs import Owner
from meshxl.xds.app import ControlPlane
from tests.harness import ads as _ads
from tests.harness import backends as _backends
from tests.harness import clock as _clock
from tests.harness import controlplane as _controlplane
from tests.harness import envoy as _envoy
from tests.harness import etcd as _etcd

HARNESS_KEY = pytest.StashKey[Owner]()

# Hypothesis judges time too: a 200 ms deadline per example and a "too slow" health
# check fail a generated test on a busy machine though nothing is wrong. The suite's
# tests bound their waits themselves (tests/harness/clock.py); speed is bench/'s.
settings.register_profile("meshxl", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("meshxl")


def _group_node_ids(items: list[pytest.Item]) -> None:
    """``--dist loadgroup`` sends the tests whose node id ends in ``@GROUP`` to one worker;
    pytest-xdist 3.8 writes that suffix to ``item._nodeid``, which pytest 9 no longer
    reads (a node id is ``item._id`` now), so without this every test went anywhere."""
    from _pytest.nodeid import NodeId

    for item in items:
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                         for m in item.iter_markers("xdist_group")})
        if groups and "@" not in item.nodeid:
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(groups)}")


def _own_port_slice() -> None:
    """A parallel worker (pytest-xdist) draws ports from its own slice of the range, so
    no other worker can take a port it holds or is restarting a server on. Network
    namespaces, cgroups and temporary directories are named by process id already."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or os.environ.get(_ports.ENV):
        return
    index, count = int(worker[2:]), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    whole = _ports.port_range() or range(_ports.LOWEST, 32768)
    size = len(whole) // max(count, index + 1)
    low = whole.start + index * size
    os.environ[_ports.ENV] = f"{low}-{low + size - 1}"


_own_port_slice()


HEAVY_LANE_B = frozenset({
    "test_cold_start", "test_delta_xds", "test_dualsite", "test_etcd_partitions",
    "test_failback", "test_failover", "test_faults", "test_ha_load", "test_load_shares",
    "test_ops", "test_pinned_sessions", "test_protocols", "test_shards",
})
"""The modules whose heavy tests run in the second heavy lane: about half of the heavy
tests' time (400 of 810 s, ``--durations`` of ``make test`` on two cores). Every other
heavy module is in the first lane."""


def heavy_lane(item: pytest.Item) -> str:
    """The xdist group of a heavy test: ``heavy`` or ``heavy-b``, by its module, so no
    more than two installations under load judge their timing at once on two cores (one
    lane was the suite's critical path: 810 s of a run of 850). On a machine that needs
    a time scale (slower or busier), one lane: two heavy tests side by side beside two
    busy loops starved each other's judges and streams."""
    if _clock.SCALE > 1.0:
        return "heavy"
    return "heavy-b" if item.path.stem in HEAVY_LANE_B else "heavy"


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Heavy tests (``@pytest.mark.heavy``: a whole installation under load, its timing
    judged) run one at a time in each lane of :func:`heavy_lane` (one xdist worker per
    lane). pytest-timeout's limit of a test (pyproject.toml) follows the suite's clock."""
    for item in items:
        if item.get_closest_marker("heavy") is not None:
            item.add_marker(pytest.mark.xdist_group(heavy_lane(item)))
    if getattr(config.option, "loadgroup", False):
        _group_node_ids(items)
    if _clock.SCALE == 1.0:
        return
    limit = _clock.scaled(float(config.getini("timeout") or 300))
    for item in items:
        marker = item.get_closest_marker("timeout")
        item.add_marker(pytest.mark.timeout(
            _clock.scaled(float(marker.args[0])) if marker and marker.args else limit))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the logs of the test's processes to a failed setup/call/teardown report."""
    report = yield
    harness = item.stash.get(HARNESS_KEY, None)
    if harness is not None and report.failed:
        for title, text in harness.log_sections():
            report.sections.append((title, text))
    return report


@pytest.fixture
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Owner]:
    """Owner of this test's processes and temp dir (killed and removed at teardown)."""
    owner = Owner(label=request.node.name)
    request.node.stash[HARNESS_KEY] = owner
    try:
        yield owner
    finally:
        await owner.aclose()


def _require_etcd() -> None:
    """Fail (not skip) when etcd is missing: a skipped suite would look like a passing one."""
    try:
        _etcd.find_etcd()
    except _etcd.EtcdNotInstalled as exc:
        message = str(exc)
    else:
        return
    pytest.fail(message, pytrace=False)


@pytest.fixture
async def etcd(harness: Owner) -> _etcd.EtcdServer:
    """A fresh single-member etcd (about 0.5 s to start), empty, for this test only."""
    _require_etcd()
    return await _etcd.start_etcd(harness)


@pytest.fixture
async def etcd_client(etcd: _etcd.EtcdServer) -> AsyncIterator[aetcd.Client]:
    """A connected aetcd client to the ``etcd`` fixture."""
    async with etcd.client() as client:
        yield client


@pytest.fixture
async def etcd_cluster(harness: Owner) -> _etcd.EtcdCluster:
    """A fresh 3-member etcd cluster; ``etcd_cluster[i]`` is member i (kill/start it)."""
    _require_etcd()
    return await _etcd.start_etcd_cluster(harness, 3)


@pytest.fixture
def start_envoy(harness: Owner) -> _envoy.StartEnvoy:
    """``await start_envoy(node_id, xds_port_or_ports, **options) -> EnvoyFixture``."""

    async def start(node_id: str, xds: Any, **options: Any) -> _envoy.EnvoyFixture:
        return await _envoy.start_envoy(harness, node_id, xds, **options)

    return start


@pytest.fixture
def start_backends(harness: Owner) -> _backends.StartBackends:
    """``await start_backends(3)`` -> echo members m0..m2 on free loopback ports."""

    async def start(members: int | Sequence[str], **options: Any) -> list[_backends.Backend]:
        return await _backends.start_backends(harness, members, **options)

    return start


@pytest.fixture
def start_control_plane(harness: Owner) -> Any:
    """``await start_control_plane(config_path=..., etcd=url, **config)`` -> ControlPlane
    running in this process on a free port (``plane.port``), stopped at teardown."""

    async def start(**options: Any) -> ControlPlane:
        return await _controlplane.start_control_plane(harness, **options)

    return start


@pytest.fixture
def control_plane_process(harness: Owner) -> Any:
    """``ControlPlaneProcess(...)`` factory: ``meshxl serve xds`` as a killable process."""

    def make(**options: Any) -> _controlplane.ControlPlaneProcess:
        return _controlplane.ControlPlaneProcess(harness, **options)

    return make


@pytest.fixture
def start_sidecar(harness: Owner) -> Any:
    """``await start_sidecar(cluster=..., member=..., etcd=url, app_port=..., **cli_options)``
    -> a started (ready, unless ``wait_ready=False``) ``meshxl serve statesync`` process."""
    from tests.harness.sidecar import SidecarProcess

    async def start(*, cluster: str, member: str, etcd: str, app_port: int,
                    wait_ready: bool = True, **cli_options: Any) -> SidecarProcess:
        sidecar = SidecarProcess(harness, cluster=cluster, member=member, etcd=etcd,
                                 app_port=app_port, **cli_options)
        return await sidecar.start(wait_ready=wait_ready)

    return start


@pytest.fixture
async def xds() -> AsyncIterator[_ads.AdsHarness]:
    """An ADS server in this process on a free port; ``xds.envoy()`` is a SotW client."""
    async with _ads.ads_server("sotw") as served:
        yield served


@pytest.fixture
async def delta_xds() -> AsyncIterator[_ads.AdsHarness]:
    """As ``xds``, with ``envoy()`` a delta client."""
    async with _ads.ads_server("delta") as served:
        yield served


@pytest.fixture
async def ads_server() -> AsyncIterator[Callable[..., Awaitable[_ads.AdsHarness]]]:
    """``await ads_server(protocol="sotw", **AdsServer_options)``: more ADS servers, or
    one with options (auth, bounds, callbacks); all closed at teardown."""
    async with AsyncExitStack() as stack:
        async def start(protocol: str = "sotw", **options: Any) -> _ads.AdsHarness:
            return await stack.enter_async_context(_ads.ads_server(protocol, **options))

        yield start


@pytest.fixture
def nothing_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No envoy beside the interpreter, an empty PATH, no MESHXL_ETCD_BINARY."""
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("MESHXL_ETCD_BINARY", raising=False)
    return tmp_path
