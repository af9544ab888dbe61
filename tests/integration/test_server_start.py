"""Every ``meshxl serve`` server starts right or not at all: a busy port or a bad listen
address is one line and a non-zero exit (never a second process sharing the port), the
control plane's health endpoint answers while it waits for etcd and says why it is not
ready, and the statesync sidecar binds its port before it registers its member."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path
from typing import Any

import aetcd
import aiohttp
import pytest

from meshxl.etcd.keys import Keys
from meshxl.local.ports import free_port, free_ports
from meshxl.local.procs import Process
from meshxl.local.wait import wait_until
from tests.harness.certs import CA
from tests.harness.cli import meshxl
from tests.harness.clock import scaled, window
from tests.harness.controlplane import ControlPlaneProcess
from tests.harness.etcd import EtcdServer
from tests.harness.sidecar import SidecarProcess

pytestmark = pytest.mark.integration

MODEL = """\
clusters:
- name: c
  members:
  - {name: a, address: 127.0.0.1, port: 8080}
"""


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


def listening(port: int) -> socket.socket:
    """Something else holding a loopback port."""
    sock = socket.create_server(("127.0.0.1", port))
    return sock


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model.yaml"
    path.write_text(MODEL)
    return path


async def test_a_second_control_plane_on_a_busy_port_is_refused(
    harness: Any, model: Path,
) -> None:
    first = await ControlPlaneProcess(harness, config_path=model).start()
    code, _, err = await meshxl("serve", "xds", "--config", str(model),
                                "--listen", first.address, timeout=30)
    assert code == 1
    line = one_line_error(err)
    assert line == f"meshxl: --listen: cannot listen on {first.address}: Address already in use"

    code, _, err = await meshxl("serve", "xds", "--config", str(model), "--listen",
                                "127.0.0.1:0", "--admin", f"127.0.0.1:{first.admin_port}",
                                timeout=30)
    assert code == 1
    assert "--admin: cannot listen on" in one_line_error(err)
    assert (await first.get("/readyz"))[0] == 200  # the first one still serves


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--listen", "127.0.0.1:65536", "port must be an integer in 0..65535, got 65536"),
    ("--listen", "127.0.0.1:99999", "port must be an integer in 0..65535, got 99999"),
    ("--listen", "127.0.0.1", "expected HOST:PORT"),
    ("--listen", "::1:18000", "write IPv6 addresses in brackets"),
    ("--listen", "no such host:1", "not a valid host name"),
    ("--listen", "nosuch.invalid:0", "cannot resolve 'nosuch.invalid'"),
    ("--listen", "192.0.2.1:0", "Cannot assign requested address"),
    ("--admin", "127.0.0.1:70000", "port must be an integer in 0..65535, got 70000"),
    ("--admin", "nosuch.invalid:0", "cannot resolve 'nosuch.invalid'"),
])
async def test_control_plane_refuses_bad_listen_addresses(
    model: Path, option: str, value: str, message: str,
) -> None:
    args = ["--listen", "127.0.0.1:0", option, value]
    code, _, err = await meshxl("serve", "xds", "--config", str(model), *args, timeout=30)
    assert code == 1
    line = one_line_error(err)
    assert line.startswith(f"meshxl: {option}: ") and message in line, line


async def test_control_plane_health_says_why_it_waits_for_etcd(harness: Any) -> None:
    dead_etcd = f"http://127.0.0.1:{free_port()}"
    plane = ControlPlaneProcess(harness, etcd=dead_etcd)
    plane.process.start()

    async def not_ready() -> Any:
        code, body = await plane.get("/readyz")
        return code == 503 and "etcd unreachable" in " ".join(body["reasons"]) and body

    body = await wait_until(not_ready, timeout=20, what="/readyz answering 503 with the etcd error")
    assert body["ready"] is False
    [reason] = body["reasons"]
    assert reason.startswith("etcd unreachable: ") and dead_etcd.split("//")[1] in reason
    assert (await plane.get("/healthz"))[0] == 200
    status = await plane.status()
    assert status["ready"] is False and status["reasons"][0].startswith("etcd unreachable")
    assert status["versions"] == {}  # nothing served before the first full read


async def test_control_plane_without_a_model_says_so(harness: Any, etcd: Any) -> None:
    plane = ControlPlaneProcess(harness, etcd=etcd.url)
    plane.process.start()

    async def reasons() -> Any:
        code, body = await plane.get("/readyz")
        return code == 503 and "no model" in " ".join(body["reasons"]) and body["reasons"]

    [reason] = await wait_until(reasons, timeout=20, what="/readyz naming the missing model")
    assert reason == f"no model stored in etcd at {Keys().model}"


def statesync_argv(listen: str, etcd: str, member: str = "a") -> list[str]:
    return ["serve", "statesync", "--cluster", "c", "--member", member,
            "--app", "127.0.0.1:8080", "--listen", listen, "--etcd", etcd]


async def test_statesync_refuses_a_busy_port_before_registering(
    etcd: Any, etcd_client: aetcd.Client,
) -> None:
    port = free_port()
    with listening(port):
        code, _, err = await meshxl(*statesync_argv(f"127.0.0.1:{port}", etcd.url),
                                    timeout=30)
    assert code == 1
    assert one_line_error(err) == (f"meshxl: --listen: cannot listen on 127.0.0.1:{port}: "
                                   "Address already in use")
    assert await etcd_client.get(Keys().member("c", "a").encode()) is None
    for bad, message in (("127.0.0.1:65536", "0..65535"), ("127.0.0.1:x", "not a number")):
        code, _, err = await meshxl(*statesync_argv(bad, etcd.url), timeout=30)
        assert code == 1 and message in one_line_error(err), err


async def test_statesync_refuses_numbers_that_are_not_finite_at_once() -> None:
    """The sidecar as pods run it: a NaN or infinite duration (a careless flag or
    variable) is refused before anything starts, naming the option, never a sidecar
    that answers 500 to every write, never becomes ready or never replicates. Nothing
    listens at its etcd address: a sidecar that started would wait, and time out."""
    nowhere = f"http://127.0.0.1:{free_port()}"
    argv = statesync_argv("127.0.0.1:0", nowhere)
    cases: list[tuple[list[str], dict[str, str | None], str]] = [
        (["--session-ttl", "nan"], {}, "--session-ttl"),
        (["--session-ttl=inf"], {}, "--session-ttl"),
        (["--lease-ttl", "inf"], {}, "--lease-ttl"),
        (["--lease-ttl", "-nan"], {}, "--lease-ttl"),
        (["--sync-delay", "inf"], {}, "--sync-delay"),
        (["--sync-delay", "nan"], {}, "--sync-delay"),
        ([], {"MESHXL_STATESYNC_MAX_CONNECTIONS": "1e400"}, "--max-connections"),
    ]
    started = asyncio.get_running_loop().time()
    results = await asyncio.gather(*(meshxl(*argv, *extra, env=env, timeout=30)
                                     for extra, env, _ in cases))
    for (extra, env, option), (code, out, err) in zip(cases, results, strict=True):
        assert code == 2, (extra, env, out, err)
        assert "Traceback" not in err
        [line] = [line for line in err.splitlines() if line.startswith("Error:")]
        assert f"Invalid value for '{option}'" in line and "expected a" in line, line
    assert asyncio.get_running_loop().time() - started < scaled(30)  # sanity: none waited


async def test_statesync_registers_the_port_it_bound(
    harness: Any, etcd: Any, etcd_client: aetcd.Client,
) -> None:
    argv = [sys.executable, "-m", "meshxl.cli",
            *statesync_argv("127.0.0.1:0", etcd.url, member="zero")]
    process = Process("statesync-zero", argv, harness.root / "statesync-zero.log")
    harness.own(process)
    process.start()
    key = Keys().member("c", "zero").encode()

    async def registered() -> Any:
        got = await etcd_client.get(key)
        return got is not None and json.loads(got.value)

    registration = await wait_until(registered, timeout=20, what="the member registered",
                                    process=process)
    host, _, port = registration["sidecar"].rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0
    async with (aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{port}/healthz") as resp):
        assert resp.status == 200


async def test_otlp_receiver_refuses_a_busy_port_and_bad_addresses(tmp_path: Path) -> None:
    port = free_port()
    out = str(tmp_path / "spans.jsonl")
    with listening(port):
        code, _, err = await meshxl("serve", "otlp-receiver", "--file", out,
                                    "--listen", f"127.0.0.1:{port}", timeout=30)
    assert code == 1
    assert "Address already in use" in one_line_error(err)
    code, _, err = await meshxl("serve", "otlp-receiver", "--file", out,
                                "--listen", "127.0.0.1:65536", timeout=30)
    assert code == 1 and "0..65535" in one_line_error(err)


async def test_webhook_refuses_a_busy_port_and_bad_addresses(tmp_path: Path) -> None:
    leaf = CA(tmp_path / "ca").issue("webhook")
    tls = ["--tls-cert", str(leaf.cert), "--tls-key", str(leaf.key)]
    port = free_port()
    with listening(port):
        code, _, err = await meshxl("serve", "webhook", *tls,
                                    "--listen", f"127.0.0.1:{port}", timeout=30)
    assert code == 1
    assert "Address already in use" in one_line_error(err).replace("address already in use",
                                                                   "Address already in use")
    for bad in ("127.0.0.1:65536", "nosuch.invalid:1"):
        code, _, err = await meshxl("serve", "webhook", *tls, "--listen", bad, timeout=30)
        assert code == 1, err
        one_line_error(err)


async def test_sidecar_publishes_statistics_periodically_and_warns_of_its_model(
    start_sidecar: Any, etcd: Any, etcd_client: aetcd.Client,
) -> None:
    from meshxl.operator.actions import apply_model

    keys = Keys()
    await apply_model(etcd_client, keys, MODEL.replace("name: c", "name: other"), "test")
    sidecar = await start_sidecar(cluster="c", member="m", etcd=etcd.url, app_port=8080,
                                  site="dc1")

    async def warned() -> Any:
        return [w for w in (await sidecar.status())["warnings"] if "not in the model" in w]

    [warning] = await wait_until(warned, timeout=20, what="the sidecar's model warning")
    assert warning.startswith("cluster 'c' is not in the model (clusters: other)")
    await wait_until(lambda: warning in sidecar.logs(), timeout=10, what="the warning in the log")

    # Nothing changes on the sidecar, and its statistics are still published again.
    async def published() -> Any:
        got = await etcd_client.get(keys.sync_stats("c", "m").encode())
        return got is not None and json.loads(got.value)

    first = await wait_until(published, timeout=20, what="statistics published")
    assert first["publish_interval"] == 2.0
    later = await wait_until(lambda: _newer(published, first["published"]), timeout=20,
                           what="statistics published again")
    assert later["published"] > first["published"]
    code, out, err = await meshxl("sync", "--etcd", etcd.url, "--output", "json")
    [row] = json.loads(out)["sidecars"]
    assert row["stale"] is False and row["age_seconds"] < scaled(6), row

    # A model change is noticed: the cluster appears but not the sidecar's site.
    await apply_model(etcd_client, keys, MODEL.replace(
        "members:", "sites: [{name: dc2}]\n  members:"), "test")

    async def site_warning() -> Any:
        return [w for w in (await sidecar.status())["warnings"] if "dc1" in w]

    [warning] = await wait_until(site_warning, timeout=20, what="the site warning")
    assert warning == ("site 'dc1' is not a site of cluster c in the model (sites: dc2)")
    await apply_model(etcd_client, keys, MODEL.replace(
        "members:", "sites: [{name: dc2}, {name: dc1}]\n  members:"), "test")

    async def clear() -> bool:
        return not (await sidecar.status())["warnings"]

    await wait_until(clear, timeout=20, what="the warning cleared")


async def _newer(read: Any, than: float) -> Any:
    got = await read()
    return got and got["published"] > than and got


async def test_statesync_waits_for_etcd_and_serves_once_it_answers(harness: Any) -> None:
    """Started before its etcd (a cold start in any order), the sidecar neither exits
    nor serves sessions: /healthz 200, /readyz 503 saying why, every API call 503 with
    a JSON body; once etcd answers it registers and serves, on the same port."""
    client_port, peer_port = free_ports(2)
    url = f"http://127.0.0.1:{client_port}"
    sidecar = SidecarProcess(harness, cluster="shop", member="a", etcd=url,
                             app_port=free_port())
    sidecar.process.start()
    await sidecar.wait_listening(timeout=20)
    ready = await sidecar.request("GET", "/readyz")
    assert ready.status == 503
    [reason] = ready.json()["reasons"]
    assert reason.startswith(("starting: connecting to etcd at ", "etcd unreachable: ")), reason

    async def unreachable() -> Any:
        ready = await sidecar.request("GET", "/readyz")
        [reason] = ready.json()["reasons"]
        return ready.status == 503 and reason.startswith("etcd unreachable: ") and reason

    reason = await wait_until(unreachable, timeout=10, what="the first attempt's failure")
    assert url in reason, reason
    put = await sidecar.put("s1", {"n": 1})
    assert put.status == 503 and "starting" in put.json()["error"], put
    metrics = (await sidecar.request("GET", "/metrics")).body.decode()
    assert "meshxl_statesync_ready 0.0" in metrics
    assert "meshxl_statesync_start_attempts_total" in metrics
    await window(2.0, "a few attempts, to see them logged once")
    assert sidecar.running
    assert sidecar.logs().count("did not answer") == 1, sidecar.logs()[-2000:]

    name = harness.unique_name("etcd-late")
    late = EtcdServer(harness, name=name, client_port=client_port, peer_port=peer_port,
                      initial_cluster=f"{name}=http://127.0.0.1:{peer_port}",
                      token="meshxl-test-late", data_dir=harness.path(name) / "data")
    await late.start()
    await sidecar.wait_ready(timeout=20)
    assert (await sidecar.put("s1", {"n": 1})).status == 201
    assert (await sidecar.get("s1")).json() == {"n": 1}
    assert "answered after" in sidecar.logs()


REGISTERED = """\
clusters:
- name: c
  membership: registered
- name: d
  membership: registered
"""


async def test_a_registration_with_an_infinite_port_stops_no_other_cluster(
    harness: Any, etcd: Any, etcd_client: aetcd.Client,
) -> None:
    """A registration is written by whoever holds its cluster's etcd credential. One
    whose port is JSON's 1e400 (infinity once read) is skipped with a warning; the
    control plane goes on serving every other registration, and ``meshxl status``
    reads the rest."""
    from meshxl.operator.actions import apply_model

    keys = Keys()
    await apply_model(etcd_client, keys, REGISTERED, "test")
    plane = await ControlPlaneProcess(harness, etcd=etcd.url).start()
    before = (await plane.status())["versions"]
    await etcd_client.put(keys.member("c", "bad").encode(),
                          b'{"address": "127.0.0.1", "port": 1e400, "ready": true}')
    await etcd_client.put(keys.member("d", "good").encode(),
                          json.dumps({"address": "127.0.0.1", "port": 9000,
                                      "ready": True}).encode())

    async def served() -> Any:
        status = await plane.status()
        return status["versions"] != before and status["ready"] and status

    await wait_until(served, timeout=20, what="d/good served", process=plane.process)
    assert "ignoring" in plane.logs() and "registration port out of range" in plane.logs()
    code, out, err = await meshxl("status", "--etcd", etcd.url, "--output", "json",
                                  timeout=30)
    assert code == 0 and "Traceback" not in err, err
    assert '"good"' in out and '"bad"' not in out, out


async def test_a_sidecar_stopped_while_connections_close_ends_on_its_sigterm(
    harness: Any, etcd: Any,
) -> None:
    """SIGTERM (Kubernetes stopping the pod) while clients' connections close, as when
    the app beside the sidecar stops with it: the sidecar ends on the SIGTERM, its
    registration withdrawn. It used to raise KeyboardInterrupt wherever it was; inside an
    event-loop callback (a connection's end) uvloop logged it as a transport's fatal
    error and went on serving, until SIGKILL."""
    import signal

    from meshxl.local.procs import WaitTimeout

    sidecar = SidecarProcess(harness, cluster="c", member="a", etcd=etcd.url,
                             app_port=free_port(), log_level="info")
    for _ in range(4):
        await sidecar.start()
        streams = [await asyncio.open_connection(sidecar.host, sidecar.port)
                   for _ in range(60)]
        for _, writer in streams:  # keep-alive connections the sidecar holds open
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: s\r\n\r\n")
        await asyncio.gather(*(reader.readuntil(b"\r\n\r\n") for reader, _ in streams))
        for _, writer in streams:  # they all end as the SIGTERM comes
            writer.transport.abort()
        sidecar.process.signal(signal.SIGTERM)
        try:
            code = await sidecar.process.wait_exit(scaled(15.0))
        except WaitTimeout:
            pytest.fail("the sidecar outlived its SIGTERM:\n" + sidecar.process.tail(30))
        assert code != -signal.SIGKILL
        assert "Fatal error on transport" not in sidecar.process.logs()
