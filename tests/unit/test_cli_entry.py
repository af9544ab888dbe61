"""``meshxl serve statesync`` read without click (``meshxl.cli.entry``) reads what the
click command reads: the same options, environment variables, defaults and ranges, the
same values passed on; and every command line it is not sure of goes to click."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from meshxl.cli import entry, serving
from meshxl.cli.options import BoundedFloat, BoundedInt
from meshxl.cli.root import main
from meshxl.cli.serve import serve_statesync

NAMES = ("clusters", "pool", "member", "app_address", "site", "weight", "listens",
         "socket_mode", "token_file", "etcd_urls", "etcd_credentials_dir", "etcd_root",
         "session_ttl", "sync_delay", "max_session_bytes", "lease_ttl", "batch_max_ops",
         "max_inflight", "max_connections", "trace_file", "log_level")
SECURITY = {"--etcd-ca": "ca", "--etcd-cert": "cert", "--etcd-key": "key",
            "--etcd-user": "user", "--etcd-password-file": "password_file"}


def test_every_option_of_the_click_command_is_read_alike() -> None:
    table = entry._options()
    seen = set()
    for param in serve_statesync.params:
        assert isinstance(param, click.Option)
        flag = param.opts[0]
        seen.add(flag)
        opt = table[flag]
        assert opt.dest == SECURITY.get(flag, param.name), flag
        assert opt.security == (flag in SECURITY), flag
        assert opt.envvar == param.envvar, flag
        assert opt.multiple == param.multiple, flag
        if not param.multiple:  # no default: click's sentinel, None to the command
            unset = type(param.default).__name__ == "Sentinel"
            assert opt.default == (None if unset else param.default), flag
        kind = param.type
        if isinstance(kind, click.IntRange | click.FloatRange):
            # One bound read by both (meshxl.model.limits), finite at both ends.
            assert isinstance(kind, BoundedInt | BoundedFloat), flag
            assert opt.bound is kind.bound, flag
            assert (kind.min, kind.max) == (kind.bound.low, kind.bound.high), flag
            assert not kind.min_open and not kind.max_open and not kind.clamp
            assert opt.kind == (entry._INT if isinstance(kind, click.IntRange)
                                else entry._FLOAT), flag
        elif isinstance(kind, click.Choice):
            assert opt.kind == entry._CHOICE and opt.choices == tuple(kind.choices), flag
        elif isinstance(kind, click.Path):
            assert opt.kind == (entry._PATH if kind.dir_okay else entry._FILE), flag
            assert kind.file_okay and not kind.exists and kind.readable
            assert not kind.writable and not kind.resolve_path and not kind.allow_dash
        else:
            assert kind == click.STRING and opt.kind == entry._STR, flag
    assert seen == set(table)


def through_click(args: list[str], env: dict[str, str],
                  monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What the click command passes on for ``meshxl serve statesync ARGS``."""
    got: dict[str, Any] = {}

    def record(*values: Any, etcd_security: Any, **istio: Any) -> None:
        got.update(zip(NAMES, values, strict=True))
        got.update(istio)  # the Istio options, by name
        got["security"] = etcd_security()

    monkeypatch.setattr(serving, "serve_statesync", record)
    result = CliRunner().invoke(main, ["serve", "statesync", *args], env=env)
    assert result.exit_code == 0, result.output
    return got


def through_entry(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    values = entry.statesync_values(args, env)
    assert values is not None, args
    values["security"] = serving.etcd_security_from(values.pop("etcd_security"))
    return values


def test_the_values_are_clicks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token, password = tmp_path / "token", tmp_path / "password"
    token.write_text("secret\n")
    password.write_text("pw\n")
    cases: list[tuple[list[str], dict[str, str]]] = [
        (["--cluster", "web", "--member", "a", "--app", "127.0.0.1:8080"], {}),
        (["--cluster=web", "--cluster", "api", "--member=a", "--app", "h:1", "--site", "east",
          "--weight", "7", "--listen", "127.0.0.1:7071", "--listen", "unix:/tmp/s.sock",
          "--socket-mode", "0660", "--token-file", str(token), "--etcd",
          "http://127.0.0.1:1,http://127.0.0.1:2", "--etcd-credentials-dir", str(tmp_path),
          "--etcd-prefix", "/other", "--session-ttl", "60.5", "--sync-delay", "0",
          "--max-session-bytes", "1048576", "--lease-ttl", "1", "--batch-max-ops", "1",
          "--max-inflight", "256", "--max-connections", "16", "--trace-file",
          str(tmp_path / "spans.jsonl"), "--log-level", "warning", "--etcd-user", "u",
          "--etcd-password-file", str(password)], {}),
        (["--pool", "p1", "--member", "a", "--app", "h:1"],
         {"MESHXL_ETCD": "https://127.0.0.1:2379", "MESHXL_ETCD_PREFIX": "/env",
          "MESHXL_STATESYNC_TOKEN_FILE": str(token), "MESHXL_ETCD_USER": "u",
          "MESHXL_ETCD_PASSWORD_FILE": str(password), "MESHXL_ETCD_CA": "",
          "MESHXL_STATESYNC_MAX_CONNECTIONS": " 100 ",
          "MESHXL_ETCD_CREDENTIALS_DIR": str(tmp_path / "absent")}),
        (["--cluster", "web", "--member", "a", "--app", "h:1", "--etcd", "http://e:1"],
         {"MESHXL_ETCD": "http://ignored:2"}),
        # The ends of each range, and numbers as int() and float() read them.
        (["--cluster", "web", "--member", "a", "--app", "h:1", "--session-ttl", "31536000",
          "--sync-delay", "86400", "--lease-ttl", "3600.0", "--weight", "1_0",
          "--max-session-bytes", " 1 ", "--batch-max-ops", "128", "--max-inflight", "+1",
          "--max-connections", "1000000"], {}),
        (["--cluster", "web", "--member", "a", "--app", "h:1", "--session-ttl", "1e3",
          "--sync-delay", "0.0", "--lease-ttl", "1"],
         {"MESHXL_STATESYNC_MAX_CONNECTIONS": "16"}),
        # Under Istio, as the injector runs it (the tls mode label may be absent).
        (["--cluster", "web", "--member", "a", "--app", "h:1"],
         {"MESHXL_ISTIO_WORKLOAD": "web;shop;web;v1", "MESHXL_ISTIO_TLS_MODE": "istio"}),
        (["--cluster", "web", "--member", "a", "--app", "h:1", "--istio-workload",
          "web;shop;web;"], {"MESHXL_ISTIO_TLS_MODE": ""}),
    ]
    for args, env in cases:
        for name in [k for k in os.environ if k.startswith("MESHXL_")]:
            monkeypatch.delenv(name)
        clicked = through_click(args, env, monkeypatch)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert through_entry(args, dict(os.environ)) == clicked, args


@pytest.mark.parametrize("args", [
    ["--help"], ["-h"], ["--member", "a"], ["--cluster", "c", "--app", "h:1"],
    ["--cluster", "c", "--member", "a", "--app", "h:1", "--weight", "0"],
    ["--cluster", "c", "--member", "a", "--app", "h:1", "--lease-ttl", "0.5"],
    ["--cluster", "c", "--member", "a", "--app", "h:1", "--batch-max-ops", "many"],
    ["--cluster", "c", "--member", "a", "--app", "h:1", "--socket-mode", "0644"],
    ["--cluster", "c", "--member", "a", "--app", "h:1", "--site", "x", "--site", "y"],
    ["--cluster", "c", "--member", "a", "--app", "h:1", "--sync-delay", "-1"],
    ["--cluster", "c", "--member", "a", "--app", "h:1", "--session-ttl", "nan"],
    ["--cluster", "c", "--member", "a", "--app", "h:1", "--session-ttl", "inf"],
    ["--cluster", "c", "--member", "a", "--app", "h:1", "--lease-ttl", "inf"],
    ["--cluster", "c", "--member", "a", "--app", "h:1", "--lease-ttl", "3601"],
    ["--cluster", "c", "--member", "a", "--app", "h:1", "--sync-delay", "inf"],
    ["--cluster", "c", "--member", "a", "--app", "h:1", "--sync-delay", "nan"],
    ["--cluster", "c", "--member", "a", "--app", "h:1", "--sync-delay", "86401"],
    ["--cluster", "c", "--member", "a", "--app", "h:1", "--unknown", "x"],
    ["--cluster", "c", "--member", "a", "--app", "h:1", "extra"],
    ["--cluster", "c", "--member", "a", "--app"],
    ["--cluster", "c", "--member", "a", "--app", "h:1", "--token-file", "/"],
])
def test_what_it_is_not_sure_of_goes_to_click(args: list[str]) -> None:
    assert entry.statesync_values(args, {}) is None


def test_bad_input_gets_clicks_own_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        entry.main(["serve", "statesync", "--member", "a", "--app", "h:1", "--weight", "0"],
                   prog_name="meshxl")
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Usage: meshxl serve statesync" in err and "'--weight'" in err
