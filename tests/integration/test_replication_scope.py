"""``sessions.replication: narrow`` with real sidecars and real etcd: each member holds
only the sessions it uses, the high-availability standby holds everything, roles move
with registrations, and fencing and takeovers work as with full replication. Each test
runs with sessions in the main cluster and sharded over two more etcd clusters (every
shard scoped alike; the standby watches every shard)."""

from __future__ import annotations

from typing import Any

import pytest

from meshxl.etcd.keys import Keys
from meshxl.local.ports import free_port
from meshxl.local.wait import wait_until
from meshxl.operator.actions import apply_model
from tests.harness.cli import meshxl_json
from tests.harness.etcd import start_etcd

pytestmark = pytest.mark.integration

KEYS = Keys()
CLUSTER = "scoped"


def model(mode: str, replication: str = "narrow") -> str:
    return f"""\
clusters:
- name: {CLUSTER}
  mode: {mode}
  membership: registered
  sessions: {{replication: {replication}}}
  members:
  - {{name: a, address: 127.0.0.1, port: 1}}
  - {{name: b, address: 127.0.0.1, port: 2}}
  - {{name: c, address: 127.0.0.1, port: 3}}
"""


@pytest.fixture(params=["one cluster", "two shards"])
async def shards(request: pytest.FixtureRequest, harness: Any, etcd: Any) -> int:
    """Sessions in the main cluster (0), or over two shards set before any sidecar."""
    if request.param == "one cluster":
        return 0
    one, two = await start_etcd(harness, "shard-1"), await start_etcd(harness, "shard-2")
    await meshxl_json("shards", "set", "--shard", f"s1={one.url}", "--shard",
                      f"s2={two.url}", "--etcd", etcd.url)
    return 2


async def sidecars(etcd: Any, start_sidecar: Any, names: str = "abc") -> list[Any]:
    return [await start_sidecar(cluster=CLUSTER, member=n, etcd=etcd.url,
                                app_port=free_port()) for n in names]


def cached(status: dict[str, Any]) -> int:
    """Sessions the sidecar's caches hold, over every shard."""
    sharded = status.get("shards")
    if sharded:
        return sum(int(s["cached_sessions"]) for s in sharded["shards"])
    return int(status["cached_sessions"])


async def status_is(sidecar: Any, **expected: Any) -> bool:
    status = await sidecar.status()
    return all((cached(status) if k == "cached_sessions" else status.get(k)) == v
               for k, v in expected.items())


async def test_load_sharing_members_hold_only_what_they_use(
        etcd: Any, etcd_client: Any, start_sidecar: Any, shards: int) -> None:
    await apply_model(etcd_client, KEYS, model("load-sharing"), "test")
    a, b, c = await sidecars(etcd, start_sidecar)
    for s in (a, b, c):
        status = await s.status()
        assert status["settings"]["replication"] == "narrow"
        assert status["holds_all_sessions"] is False and status["ready"] is True
        assert len((status["shards"] or {}).get("shards", [])) == shards
    for i in range(10):
        assert (await a.put(f"a{i}", {"n": i})).status == 201
        assert (await b.put(f"b{i}", {"n": i})).status == 201
    assert cached(await a.status()) == 10
    assert cached(await b.status()) == 10
    assert cached(await c.status()) == 0

    # Another member's session is read from etcd on first use, then held.
    got = await c.get("a3")
    assert got.status == 200 and got.json() == {"n": 3} and got.source == "etcd"
    again = await c.get("a3")
    assert again.source == "cache" and again.etag == got.etag
    assert cached(await c.status()) == 1

    # Takeover and fencing: c takes a3 over; a, which last saw it before, is fenced.
    took = await c.put("a3", {"n": 30}, if_match=got.etag)
    assert took.status == 200 and took.owner == "c"
    fenced = await a.put("a3", {"n": 31})
    assert fenced.status == 409, fenced
    assert (await a.get("a3")).json() == {"n": 30}  # a's copy is proven stale, re-read


async def test_the_standby_holds_everything_and_roles_move_with_registrations(
        etcd: Any, etcd_client: Any, start_sidecar: Any, shards: int) -> None:
    await apply_model(etcd_client, KEYS, model("high-availability"), "test")
    a, b, c = await sidecars(etcd, start_sidecar)
    # Each sidecar follows the registrations on its own watch: wait for each.
    await wait_until(lambda: status_is(b, role="standby", holds_all_sessions=True),
                     timeout=10, what="b standby, holding every session")
    await wait_until(lambda: status_is(a, role="active", holds_all_sessions=False),
                     timeout=10, what="a active")
    await wait_until(lambda: status_is(c, role="backup", holds_all_sessions=False),
                     timeout=10, what="c backup")

    for i in range(40):
        assert (await a.put(f"s{i}", {"n": i})).status == 201
    await wait_until(lambda: status_is(b, cached_sessions=40), timeout=10,
                     what="the standby holding the active's 40 sessions")
    assert cached(await c.status()) == 0
    if shards:  # every shard watched: each holds its own share of the 40
        per_shard = [s["cached_sessions"] for s in (await b.status())["shards"]["shards"]]
        assert len(per_shard) == shards and all(n > 0 for n in per_shard), per_shard

    # The active goes: b is active and keeps what it holds; c becomes the standby and
    # reads every session.
    await a.stop()
    await wait_until(lambda: status_is(c, role="standby", holds_all_sessions=True,
                                       cached_sessions=40),
                     timeout=15, what="c standby, holding all 40 sessions")
    await wait_until(lambda: status_is(b, role="active", holds_all_sessions=False),
                     timeout=10, what="b active")
    assert cached(await b.status()) == 40
    first = await b.get("s7")
    assert first.status == 200 and first.source == "cache", first
    assert (await b.put("s7", {"n": 70}, if_match=first.etag)).status == 200
    await wait_until(lambda: c_sees(c, "s7", {"n": 70}), timeout=10,
                     what="the new standby following the new active's writes")


async def c_sees(sidecar: Any, session: str, state: Any) -> bool:
    got = await sidecar.get(session)
    return bool(got.status == 200 and got.source == "cache" and got.json() == state)


async def test_full_replication_is_unchanged(
        etcd: Any, etcd_client: Any, start_sidecar: Any, shards: int) -> None:
    await apply_model(etcd_client, KEYS, model("load-sharing", "all"), "test")
    a, b = await sidecars(etcd, start_sidecar, "ab")
    for i in range(10):
        assert (await a.put(f"s{i}", {"n": i})).status == 201
    await wait_until(lambda: status_is(b, cached_sessions=10, holds_all_sessions=True),
                     timeout=10, what="b holding every session")
