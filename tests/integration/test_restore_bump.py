"""``meshxl restore bump`` and ``check`` against a real etcd the way operators break
them: a ``--past`` no etcd can reach, one so far ahead that a bump would run for hours,
and a bump on a cluster whose quota is small.

Before: ``--past 2^64`` and ``10^8`` were taken as they came; the bump wrote one
revision after another until etcd's quota was full (NOSPACE: after it, every ordinary
put failed too), and ``restore check --past 2^64`` advised exactly that bump.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from meshxl.local.ports import free_ports
from tests.harness import EtcdServer
from tests.harness.cli import meshxl, meshxl_json
from tests.harness.etcd import HOST

pytestmark = pytest.mark.integration

TOO_FAR = 10**8
BEYOND_ETCD = 2**64


async def revision(etcd: EtcdServer) -> int:
    return int((await etcd.status())["header"]["revision"])


@pytest.mark.parametrize("command", ["bump", "check"])
async def test_a_revision_etcd_cannot_reach_is_refused_as_it_is_read(
        etcd: EtcdServer, command: str) -> None:
    before = await revision(etcd)
    code, out, err = await meshxl("restore", command, "--past", str(BEYOND_ETCD),
                                  "--etcd", etcd.url)
    assert code == 2 and out == "", (code, out, err)
    [line] = [x for x in err.splitlines() if x.startswith("Error:")]
    assert "9223372036854775807" in line and "64-bit" in line, err
    assert await revision(etcd) == before  # nothing written


async def test_a_bump_too_far_ahead_is_refused_before_anything_is_written(
        etcd: EtcdServer) -> None:
    before = await revision(etcd)
    code, out, err = await meshxl("restore", "bump", "--past", str(TOO_FAR),
                                  "--etcd", etcd.url)
    assert code == 1 and out == "", (code, out, err)
    [line] = err.splitlines()
    assert line.startswith("meshxl: --past 100000000 is ") and "10,000,000" in line, line
    assert "one revision per write" in line and "--bump-revision" in line, line
    assert await revision(etcd) == before

    # check says it is not safe, and what to do: not the bump that would be refused.
    code, out, err = await meshxl("restore", "check", "--past", str(TOO_FAR),
                                  "--etcd", etcd.url)
    assert code == 1, (out, err)
    assert "not safe" in out and "meshxl restore bump --past" not in out, out
    assert "etcdutl snapshot restore" in out and "--bump-revision" in out, out
    assert "--max-writes" in out, out
    verdict = await meshxl_json("restore", "check", "--past", str(TOO_FAR),
                                "--etcd", etcd.url, expect=1)
    assert verdict["safe"] is False and verdict["bump"] is False, verdict
    assert verdict["writes"] == TOO_FAR + 1 - verdict["revision"], verdict

    # Within the bound the operator sets, it is what check advises.
    small = before + 50
    code, out, _ = await meshxl("restore", "check", "--past", str(small), "--etcd", etcd.url)
    assert code == 1 and f"meshxl restore bump --past {small}`" in out, out
    code, out, err = await meshxl("restore", "bump", "--past", str(small), "--max-writes",
                                  "10", "--etcd", etcd.url)
    assert code == 1 and "--max-writes 10" in err.splitlines()[0], err
    done = await meshxl_json("restore", "bump", "--past", str(small), "--max-writes", "100",
                             "--etcd", etcd.url)
    assert done["after"] > small


async def test_a_bump_never_fills_etcd_s_quota(harness: Any) -> None:
    """A bump longer than the quota holds of its own history compacts as it goes: etcd
    takes ordinary writes after it (it used to end in NOSPACE)."""
    name = harness.unique_name("etcd-quota")
    client_port, peer_port = free_ports(2)
    quota = 1 << 20  # 1 MiB: about 13,000 revisions of the bump's key
    server = EtcdServer(
        harness, name=name, client_port=client_port, peer_port=peer_port,
        initial_cluster=f"{name}=http://{HOST}:{peer_port}",
        token=f"meshxl-test-{uuid.uuid4().hex[:12]}", data_dir=harness.path(name) / "data",
        wrap=lambda argv: [*argv, "--quota-backend-bytes", str(quota)])
    await server.start()
    past = await revision(server) + 20_000
    done = await meshxl_json("restore", "bump", "--past", str(past), "--etcd", server.url,
                             timeout=120)
    assert done["after"] > past and done["writes"] >= 20_000, done
    status = await server.status()
    assert not status.get("errors"), status  # no NOSPACE alarm
    assert int(status["dbSize"]) <= quota, status
    async with server.client() as client:
        await client.put(b"/after-the-bump", b"ok")
    checked = await meshxl_json("restore", "check", "--past", str(past), "--etcd", server.url)
    assert checked["safe"], checked
