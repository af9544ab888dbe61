"""The process toolkit's pure parts: command lines, the wait loop (free ports, which bind
sockets: tests/integration/test_ports.py)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from meshxl.local import commands
from meshxl.local.procs import Owner, remove_if_empty
from meshxl.local.wait import LocalError, ProcessExited, WaitTimeout, wait_until
from tests.harness.clock import scaled


def _value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


# -- command lines --------------------------------------------------------------------


def test_etcd_command_line_single_member() -> None:
    argv = commands.etcd(name="e", data_dir=Path("/d"), client_url="http://127.0.0.1:1",
                         peer_url="http://127.0.0.1:2", binary="etcd")
    assert argv[0] == "etcd"
    assert "--pre-vote" in argv
    assert _value(argv, "--initial-cluster") == "e=http://127.0.0.1:2"
    assert _value(argv, "--initial-cluster-state") == "new"
    assert _value(argv, "--listen-client-urls") == _value(argv, "--advertise-client-urls")
    assert "--client-cert-auth" not in argv and "--initial-cluster-token" not in argv


def test_etcd_command_line_cluster_member_with_tls_joining() -> None:
    tls = commands.EtcdTls(ca=Path("/ca.crt"), cert=Path("/s.crt"), key=Path("/s.key"))
    argv = commands.etcd(name="e1", data_dir=Path("/d"), client_url="https://10.0.0.2:2379",
                         peer_url="http://10.0.0.2:2380", initial_cluster="e0=x,e1=y",
                         token="t", state="existing", tls=tls, binary="etcd",
                         extra=["--auto-compaction-mode", "revision"])
    assert "--pre-vote" in argv  # TLS and clusters keep it
    assert _value(argv, "--initial-cluster") == "e0=x,e1=y"
    assert _value(argv, "--initial-cluster-token") == "t"
    assert _value(argv, "--initial-cluster-state") == "existing"
    assert "--client-cert-auth" in argv
    assert _value(argv, "--trusted-ca-file") == "/ca.crt"
    assert (_value(argv, "--cert-file"), _value(argv, "--key-file")) == ("/s.crt", "/s.key")
    assert argv[-2:] == ["--auto-compaction-mode", "revision"]


def test_serve_xds_command_line() -> None:
    argv = commands.xds(listen="127.0.0.1:1", admin="127.0.0.1:2", etcd="http://e",
                        etcd_prefix="/p", replica="r", trace_file=Path("/t.jsonl"),
                        extra=("--debounce", "0.1"))
    assert argv[:5] == [sys.executable, "-u", "-m", "meshxl.cli", "serve"]
    assert argv[5] == "xds"
    assert _value(argv, "--etcd-prefix") == "/p" and _value(argv, "--trace-file") == "/t.jsonl"
    assert "--config" not in argv and "--log-level" not in argv  # None: left out
    assert argv[-2:] == ["--debounce", "0.1"]


def test_serve_statesync_command_line_takes_any_option_by_keyword() -> None:
    argv = commands.statesync(cluster="c", member="m", app="h:1", listen="h:2", etcd="u",
                              lease_ttl=2.0, batch_max_ops=64, site=None, fail_fast=True,
                              python=["py", "-m", "cProfile", "-o", "x.prof"])
    # Docstrings and asserts dropped (-OO), as in an injected sidecar: the flag right
    # after the interpreter, before the module it runs.
    assert argv[:8] == ["py", "-OO", "-m", "cProfile", "-o", "x.prof", "-m", "meshxl.cli"]
    assert argv[8:10] == ["serve", "statesync"]
    assert _value(argv, "--lease-ttl") == "2"
    assert _value(argv, "--batch-max-ops") == "64"
    assert "--site" not in argv and "--fail-fast" in argv


def test_envoy_command_line_hot_restart_or_not() -> None:
    hot = commands.envoy(Path("/b.yaml"), binary="envoy", base_id_path=Path("/w/base-id"))
    assert _value(hot, "-c") == "/b.yaml"
    assert _value(hot, "--base-id-path") == "/w/base-id" and "--use-dynamic-base-id" in hot
    cold = commands.envoy(Path("/b.yaml"), binary="envoy", concurrency=2)
    assert "--disable-hot-restart" in cold and "--use-dynamic-base-id" not in cold
    assert _value(cold, "--concurrency") == "2"


def test_sample_app_command_lines() -> None:
    assert commands.echo("a", "h:1")[-4:] == ["--name", "a", "--listen", "h:1"]
    app = commands.app("a", cluster=None, listen="h:1", sidecar="http://h:2")
    assert "meshxl.demo.app" in app and "--cluster" not in app


# -- waiting ---------------------------------------------------------------------------


async def test_wait_until_returns_the_truthy_value_sync_or_async() -> None:
    calls = iter([0, None, "", 7])
    assert await wait_until(lambda: next(calls), timeout=5, interval=0.001) == 7

    async def ready() -> dict[str, int]:
        return {"n": 1}

    assert await wait_until(ready, timeout=1) == {"n": 1}


async def test_wait_until_takes_its_options_by_keyword_only() -> None:
    with pytest.raises(TypeError):
        await wait_until(lambda: True, 5, "x")  # type: ignore[misc]


async def test_wait_until_timeout_names_what_the_last_error_and_the_explanation() -> None:
    def failing() -> bool:
        raise ValueError("not up yet")

    with pytest.raises(WaitTimeout) as info:
        await wait_until(failing, timeout=0.05, what="the thing", interval=0.01,
                         explain=lambda: "state: broken")
    message = str(info.value)
    assert "waiting for the thing" in message
    assert "ValueError: not up yet" in message and "state: broken" in message
    # Both a LocalError (the CLI maps it) and an AssertionError (pytest: a failure).
    assert isinstance(info.value, LocalError) and isinstance(info.value, AssertionError)


class _Dead:
    name = "server"
    returncode = 3

    def tail(self, lines: int = 40) -> str:
        return "panic: out of luck"


async def test_wait_until_stops_at_once_when_the_watched_process_exited() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ProcessExited, match=r"(?s)server exited with code 3.*panic: out of luck"):
        await wait_until(lambda: False, timeout=30, what="readiness", process=_Dead())
    assert loop.time() - started < scaled(5)  # at once, not after the 30 s timeout


# -- ports -----------------------------------------------------------------------------



async def test_a_missing_program_is_a_one_line_error_not_an_exit_code() -> None:
    owner = Owner(label="unit")
    try:
        with pytest.raises(LocalError, match="cannot start nope: /nonexistent/x is not"):
            owner.spawn("nope", ["/nonexistent/x"])
    finally:
        await owner.aclose()
    assert not owner.root.exists()


async def test_a_kept_directory_loses_its_scratch_at_close_and_keeps_the_rest(
    tmp_path: Path,
) -> None:
    owner = Owner(tmp_path / "run")
    data = owner.scratch(owner.root / "etcd.data")
    (data / "member" / "wal").mkdir(parents=True)
    (data / "member" / "wal" / "0.wal").write_bytes(b"x" * 1024)
    (owner.root / "etcd.log").write_text("started\n")
    await owner.aclose()
    assert not data.exists()
    assert (owner.root / "etcd.log").read_text() == "started\n"


def test_remove_if_empty_removes_only_a_directory_without_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "traces").mkdir(parents=True)
    remove_if_empty(empty)
    assert not empty.exists()
    kept = tmp_path / "kept"
    (kept / "logs").mkdir(parents=True)
    (kept / "logs" / "etcd.log").write_text("")
    remove_if_empty(kept)
    assert (kept / "logs" / "etcd.log").exists()
    remove_if_empty(tmp_path / "never-made")  # nothing there: nothing to do
