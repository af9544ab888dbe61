"""Members addressed by host name, end to end: `meshxl apply` from standard input, the
control plane resolving the names, Envoy ACKing, `member down --wait` converging, and an
empty model refused before it reaches etcd."""

from __future__ import annotations

import sys
from typing import Any

import aetcd
import pytest

from meshxl.etcd.keys import Keys
from meshxl.local.ports import free_ports
from meshxl.local.procs import run
from tests.harness import EnvoyFixture, drive, failures
from tests.harness.cli import REPO, meshxl_json

pytestmark = pytest.mark.integration

KEYS = Keys()


async def apply_stdin(text: str, etcd_url: str) -> tuple[int, str, str]:
    return await run([sys.executable, "-m", "meshxl.cli", "apply", "-", "--etcd", etcd_url],
                     cwd=REPO, stdin=text.encode(), timeout=30)


async def test_hostname_members_serve_and_member_down_wait_converges(
    start_control_plane: Any, start_envoy: Any, start_backends: Any, etcd: Any,
    etcd_client: aetcd.Client,
) -> None:
    a, b = await start_backends(2)
    (lport,) = free_ports(1)
    model = f"""\
clusters:
- name: web
  stickiness: {{header: x-session-id}}
  sites: [{{name: dc1}}, {{name: dc2}}]
  members:
  - {{name: {a.name}, address: localhost, port: {a.endpoint[1]}, site: dc1}}
  - {{name: {b.name}, address: localhost, port: {b.endpoint[1]}, site: dc2}}
  listener: {{address: 127.0.0.1, port: {lport}}}
"""
    code, out, err = await apply_stdin(model, etcd.url)
    assert code == 0, err
    stored = await etcd_client.get(KEYS.model.encode())
    assert stored is not None and stored.value.decode() == model  # the bytes validated

    plane = await start_control_plane(etcd=etcd.url, dns_interval=0.5)
    envoy: EnvoyFixture = await start_envoy("n1", plane.port)
    await envoy.wait_ready()
    # One endpoint per address "localhost" resolves to; the backends listen on 127.0.0.1.
    await envoy.wait_hosts("web", lambda hs: any(h.port == a.endpoint[1] and h.healthy
                                                 for h in hs), what="a healthy")
    outcomes = await drive(f"http://127.0.0.1:{lport}/", 5, 2, max_seconds=10)
    assert not failures(outcomes)
    assert {o.member for o in outcomes} == {a.name}
    assert plane.status()["dns"]["localhost"]["addresses"]

    etcd_args = ["--etcd", etcd.url]
    done = await meshxl_json("member", "down", "web", a.name, "--wait", "15", *etcd_args)
    assert done["converged"] is True, done
    hosts = await envoy.hosts("web")
    assert {h.eds_health_status for h in hosts if h.port == a.endpoint[1]} == {"DRAINING"}
    outcomes = await drive(f"http://127.0.0.1:{lport}/", 5, 2, max_seconds=10)
    assert not failures(outcomes)
    assert {o.member for o in outcomes} == {b.name}
    done = await meshxl_json("member", "up", "web", a.name, "--wait", "15", *etcd_args)
    assert done["converged"] is True, done

    # An empty model from standard input is refused before it reaches etcd.
    code, _, err = await apply_stdin("", etcd.url)
    assert code == 1 and "the model is empty" in err
    assert (await etcd_client.get(KEYS.model.encode())).value.decode() == model
    verify = await meshxl_json("verify", *etcd_args)
    assert verify["ok"] is True, verify
