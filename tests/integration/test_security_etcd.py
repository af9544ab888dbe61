"""meshxl against a real etcd with client TLS (``--client-cert-auth``) and with
authentication enabled: operator commands, a sidecar and a control plane, and one-line
errors for missing or wrong credentials.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import aetcd
import pytest

from meshxl import etcd
from meshxl.etcd.keys import Keys
from meshxl.local.ports import free_port
from meshxl.local.procs import Owner
from meshxl.local.wait import wait_until
from tests.harness.certs import CA
from tests.harness.cli import meshxl
from tests.harness.clock import window
from tests.harness.controlplane import ControlPlaneProcess
from tests.harness.secure_etcd import (
    PASSWORD,
    USER,
    SecureEtcd,
    enable_auth_on,
    forget_tokens,
    start_secure_etcd,
)
from tests.harness.sidecar import SidecarProcess

pytestmark = pytest.mark.integration

PLAIN_ENV: dict[str, str | None] = {"GRPC_VERBOSITY": None}

MODEL = """\
clusters:
- name: orders
  membership: registered
"""


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model.yaml"
    path.write_text(MODEL)
    return path


# -- TLS ----------------------------------------------------------------------------------


@pytest.fixture
async def tls_etcd(harness: Owner) -> SecureEtcd:
    return await start_secure_etcd(harness, CA(harness.path("pki")))


def _tls_args(server: SecureEtcd) -> list[str]:
    return ["--etcd", server.url, "--etcd-ca", str(server.ca.cert),
            "--etcd-cert", str(server.client_leaf.cert),
            "--etcd-key", str(server.client_leaf.key)]


def _tls_options(server: SecureEtcd) -> dict[str, Any]:
    return {"etcd_ca": server.ca.cert, "etcd_cert": server.client_leaf.cert,
            "etcd_key": server.client_leaf.key}


async def test_commands_sidecar_and_control_plane_over_tls(
        harness: Owner, tls_etcd: SecureEtcd, model: Path, tmp_path: Path) -> None:
    args = _tls_args(tls_etcd)
    code, out, err = await meshxl("apply", str(model), *args)
    assert code == 0, err
    assert "model stored: 1 clusters" in out

    sidecar = SidecarProcess(harness, cluster="orders", member="a", etcd=tls_etcd.url,
                             app_port=free_port(), **_tls_options(tls_etcd))
    await sidecar.start()
    assert (await sidecar.put("cart-1", {"items": 1})).status == 201

    plane = ControlPlaneProcess(harness, etcd=tls_etcd.url, extra_args=tuple(args[2:]))
    await plane.start()

    code, out, err = await meshxl("status", "-o", "json", *args)
    assert code == 0, err
    (cluster,) = json.loads(out)["clusters"]
    assert cluster["name"] == "orders"
    assert [m["name"] for m in cluster["members"]] == ["a"]

    # Every other command that reads etcd takes the same options.
    async def synced() -> bool:  # the sidecar publishes its statistics every 2 s
        code, out, err = await meshxl("sync", "-o", "json", *args)
        assert code == 0, err
        return [s["member"] for s in json.loads(out)["sidecars"]] == ["a"]

    await wait_until(synced, timeout=10.0, what="the sidecar in meshxl sync")
    code, out, err = await meshxl("verify", "-o", "json", "--settle", "0", *args)
    assert "etcd request failed" not in err, err
    assert json.loads(out)["expected"]["CDS"], out  # compiled from the model read over TLS
    code, out, err = await meshxl("drill", "--site", "default", "--duration", "0",
                                  "--output-dir", str(tmp_path / "drill"), *args)
    assert "etcd request failed" not in err, err
    assert (tmp_path / "drill" / "drill.json").exists(), (out, err)

    # The control plane follows etcd through its TLS watch.
    code, out, err = await meshxl("member", "down", "orders", "a", *args)
    assert code == 0, err
    revision = int(out.rsplit("revision ", 1)[1].rstrip(")\n"))

    async def caught_up() -> bool:
        return int((await plane.status())["etcd"]["revision"] or 0) >= revision

    await wait_until(caught_up, timeout=10.0, what="the control plane to see member down")


async def test_tls_mistakes_are_one_line_errors(tls_etcd: SecureEtcd, tmp_path: Path) -> None:
    ca, leaf = str(tls_etcd.ca.cert), tls_etcd.client_leaf
    url = tls_etcd.url
    cases: list[tuple[list[str], str]] = [
        # etcd requires a client certificate.
        (["--etcd", url, "--etcd-ca", ca], "refused this client's certificate"),
        # A client that does not trust etcd's CA.
        (["--etcd", url, "--etcd-ca", str(CA(tmp_path / "other").cert),
          "--etcd-cert", str(leaf.cert), "--etcd-key", str(leaf.key)],
         "not signed by --etcd-ca"),
        # Plaintext to a TLS port.
        (["--etcd", url.replace("https://", "http://")], "use https://"),
        (["--etcd", url, "--etcd-ca", str(tmp_path / "missing.crt")],
         "cannot read --etcd-ca"),
        (["--etcd", url, "--etcd-cert", str(leaf.cert)], "--etcd-cert and --etcd-key go together"),
        (["--etcd", url, "--etcd-cert", str(leaf.cert), "--etcd-key", str(tls_etcd.ca.cert)],
         "not load as a matching pair"),
        (["--etcd", url.replace("https://", "http://"), "--etcd-ca", ca],
         "need https:// etcd endpoints"),
    ]
    # As an operator runs it: without the test suite's GRPC_VERBOSITY (conftest.py).
    results = await asyncio.gather(*(meshxl("status", "-o", "json", *args, timeout=30,
                                            env=PLAIN_ENV) for args, _ in cases))
    for (args, expected), (code, _, err) in zip(cases, results, strict=True):
        assert code == 1, (args, err)
        assert expected in one_line(err), (args, err)


async def test_tls_with_several_endpoints_fails_over(tls_etcd: SecureEtcd) -> None:
    """One dead member first in the list: the channel moves on, certificates still
    checked (against the first endpoint's name, which the test certificate holds)."""
    dead = free_port()
    urls = f"https://localhost:{dead},https://localhost:{tls_etcd.client_port}"
    security = etcd.EtcdSecurity(ca=tls_etcd.ca.cert, cert=tls_etcd.client_leaf.cert,
                                 key=tls_etcd.client_leaf.key)
    async with etcd.client(urls, security=security, timeout=5) as client:
        await client.put(b"/k", b"v")
        got = await client.get(b"/k")
        assert got is not None and got.value == b"v"


# -- authentication -------------------------------------------------------------------------


@pytest.fixture
async def auth_etcd(harness: Owner) -> Any:
    """A plaintext etcd with authentication on; simple tokens live 1 s when idle, so
    every test below also runs with tokens expiring under it."""
    from tests.harness.etcd import EtcdServer, start_etcd

    server: EtcdServer = await start_etcd(harness, "etcd-auth")
    server.process.argv += ["--auth-token-ttl", "1"]
    await server.stop()
    await server.start()
    await enable_auth_on(server.url)
    return server


async def test_commands_sidecar_and_control_plane_with_a_password(
        harness: Owner, auth_etcd: Any, model: Path, tmp_path: Path) -> None:
    password_file = tmp_path / "etcd-password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    creds = ["--etcd", auth_etcd.url, "--etcd-user", USER,
             "--etcd-password-file", str(password_file)]

    code, out, err = await meshxl("apply", str(model), *creds)
    assert code == 0, err
    # The password may come from the environment instead of a file.
    code, out, err = await meshxl("status", "-o", "json", "--etcd", auth_etcd.url,
                                  "--etcd-user", USER, env={"MESHXL_ETCD_PASSWORD": PASSWORD})
    assert code == 0, err
    assert json.loads(out)["clusters"][0]["name"] == "orders"

    sidecar = SidecarProcess(harness, cluster="orders", member="a", etcd=auth_etcd.url,
                             app_port=free_port(), etcd_user=USER,
                             etcd_password_file=password_file)
    await sidecar.start()
    plane = ControlPlaneProcess(harness, etcd=auth_etcd.url, extra_args=tuple(creds[2:]))
    await plane.start()
    await window(1.5, "idle past the token TTL: tokens are renewed on demand")
    assert (await sidecar.put("cart-1", {"items": 1})).status == 201

    # etcd restarts and forgets every token: the sidecar and the control plane go on.
    await auth_etcd.stop()
    await auth_etcd.start()

    written: list[int] = []

    async def writes() -> bool:
        reply = await sidecar.put("cart-2", {"items": 2})
        if reply.status in (200, 201) and reply.etag:
            written.append(int(reply.etag.strip('"')))
        return bool(written)

    await wait_until(writes, timeout=15.0, what="a write after etcd's restart")
    code, out, err = await meshxl("member", "down", "orders", "a", *creds)
    assert code == 0, err
    revision = int(out.rsplit("revision ", 1)[1].rstrip(")\n"))

    async def plane_caught_up() -> bool:
        return int((await plane.status())["etcd"]["revision"] or 0) >= revision

    await wait_until(plane_caught_up, timeout=15.0,
                     what="the control plane's watch after the restart")

    async def sidecar_caught_up() -> bool:  # its session watch resumed too: it saw cart-2
        # (the last session write: the member's own records, written after the restart,
        # may come between it and the member-down revision, outside the session watch)
        return int((await sidecar.status())["revision"] or 0) >= written[-1]

    await wait_until(sidecar_caught_up, timeout=15.0,
                     what="the sidecar's session watch after the restart")

    # The stored model is readable by an authenticated client only.
    security = etcd.EtcdSecurity(user=USER, password=PASSWORD)
    async with etcd.client(auth_etcd.url, security=security) as client:
        assert (await client.get(Keys().model.encode())) is not None


async def test_a_watch_refused_for_a_forgotten_token_authenticates_again(
        auth_etcd: Any) -> None:
    """etcd refuses a watch whose token it no longer knows by cancelling it (no gRPC
    error): the session cache's watch then forgets the token, so the next watch, even
    one moment later, authenticates again instead of being refused the same way."""
    security = etcd.EtcdSecurity(user=USER, password=PASSWORD)
    key = b"/meshxl/test/watch-token"
    async with etcd.client(auth_etcd.url, security=security) as client:
        await client.put(key, b"1")  # authenticates: the token is confirmed just now
        head = (await client.get(key)).mod_revision

        async def first_response() -> Any:
            async for response in etcd.watch_responses(client, key, key + b"\0",
                                                                head):
                return response
            return None

        await forget_tokens(auth_etcd.url)
        with pytest.raises(aetcd.exceptions.ConnectionFailedError,
                           match="etcd canceled the watch: .*invalid auth token"):
            async with asyncio.timeout(5.0):
                await first_response()
        async with asyncio.timeout(5.0):
            response = await first_response()
        assert [e.kv.mod_revision for e in response.events] == [head]


async def test_wrong_or_missing_credentials_are_one_line_errors(
        harness: Owner, auth_etcd: Any, model: Path, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not the password\n")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    url = auth_etcd.url
    cases: list[tuple[list[str], dict[str, str] | None, str]] = [
        (["--etcd-user", USER, "--etcd-password-file", str(wrong)], None,
         f"etcd refused user '{USER}': authentication failed"),
        ([], None, "etcd has authentication enabled"),
        (["--etcd-user", USER], None, "--etcd-user needs a password"),
        (["--etcd-user", USER, "--etcd-password-file", str(tmp_path / "nope")], None,
         "cannot read etcd password file"),
        (["--etcd-user", USER, "--etcd-password-file", str(empty)], None, "is empty"),
        (["--etcd-user", USER, "--etcd-password-file", str(wrong)],
         {"MESHXL_ETCD_PASSWORD": PASSWORD}, "give the etcd password once"),
    ]
    results = await asyncio.gather(*(meshxl("apply", str(model), "--etcd", url, *args,
                                            env={**PLAIN_ENV, **(env or {})})
                                     for args, env, _ in cases))
    for (args, _, expected), (code, _, err) in zip(cases, results, strict=True):
        assert code == 1, (args, err)
        assert expected in one_line(err), (args, err)

    # Servers refuse to start with a wrong password, in one line too.
    plane = ControlPlaneProcess(harness, etcd=url, extra_args=(
        "--etcd-user", USER, "--etcd-password-file", str(wrong)))
    plane.process.start()
    assert await plane.process.wait_exit(20) == 1
    assert f"meshxl: etcd refused user '{USER}'" in plane.logs()
    sidecar = SidecarProcess(harness, cluster="orders", member="a", etcd=url,
                             app_port=free_port(), etcd_user=USER, etcd_password_file=wrong)
    sidecar.process.start()
    assert await sidecar.process.wait_exit(20) == 1
    assert f"meshxl: etcd refused user '{USER}'" in sidecar.logs()


def test_security_settings_repr_hides_the_password() -> None:
    security = etcd.EtcdSecurity(user="u", password="s3cret-value")
    assert "s3cret-value" not in repr(security)
    assert "s3cret-value" not in repr(dataclasses.replace(security, ca=Path("x")))
