"""Dapr's JavaScript SDK (npm ``@dapr/dapr``, ``DaprClient`` over HTTP, run by Node)
against a real sidecar on real etcd: the state-store conformance behaviours
(components-contrib, tests/conformance/state) as the SDK sees them, from
tests/integration/dapr_js/conformance.mjs. The SDK is installed by ``make setup``
(scripts/setup.sh: ``npm ci`` in tests/integration/dapr_js)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from meshxl.local import procs
from meshxl.local.ports import free_port
from tests.harness import EtcdServer

pytestmark = pytest.mark.integration

JS = Path(__file__).parent / "dapr_js"
STORE = "statestore"


def node_sdk() -> str:
    """The ``node`` binary, with the SDK installed beside the scripts (else the test
    fails saying what to run: a missing SDK must not pass as a skip)."""
    node = shutil.which("node")
    if node is None or not (JS / "node_modules" / "@dapr" / "dapr").is_dir():
        pytest.fail("Dapr's JavaScript SDK is not installed: run `make setup` (Node 20 and "
                    "npm, then `npm ci` in tests/integration/dapr_js)")
    return node


async def run_script(script: str, http_port: int, timeout: float = 90.0,
                     **env: str) -> dict[str, Any]:
    node = node_sdk()
    code, stdout, stderr = await procs.run(
        [node, str(JS / script)], timeout=timeout, cwd=JS,
        env={**os.environ, "DAPR_HOST": "127.0.0.1", "DAPR_HTTP_PORT": str(http_port), **env})
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert code == 0 and lines, (code, stdout[-3000:], stderr[-3000:])
    answer: dict[str, Any] = json.loads(lines[-1][len("RESULT "):])
    return answer


async def test_the_js_sdk_sees_a_dapr_state_store(etcd: EtcdServer,
                                                  start_sidecar: Any) -> None:
    http_port = free_port()
    await start_sidecar(cluster="orders", member="a", etcd=etcd.url, app_port=free_port(),
                        dapr="on", dapr_http_port=http_port, dapr_grpc_port=free_port())
    out = await run_script("conformance.mjs", http_port)

    assert out["metadata"]["id"] == "orders"
    assert {c["name"] for c in out["metadata"]["components"]} == {STORE, "orders"}
    assert out["values"] == {"string": "hello world", "number": 42, "float": 3.14,
                             "boolean": True, "nothing": None,
                             "object": {"a": [1, 2, {"b": None}], "c": "\u00e9"},
                             "array": [1, "two", 3.5], "unicode": "\u2603 snow"}
    assert out["missing"] == ""  # 204, no body: the SDK's empty answer
    assert [i["key"] for i in out["bulk"]] == ["v-string", "v-number", "never-written"]
    assert [i.get("data") for i in out["bulk"]] == ["hello world", 42, None]
    assert all(i["etag"] for i in out["bulk"][:2]) and "etag" not in out["bulk"][2]

    # ETags: a value that is no ETag is 400, a stale one 409 (Dapr's ETag mismatch),
    # for saves and deletes alike; nothing changes then.
    assert out["etagSaveWrong"]["status"] == 400
    assert json.loads(out["etagSaveWrong"]["error_msg"])["errorCode"] == "ERR_STATE_SAVE"
    assert out["etagSaveRight"] is None and out["etagChanged"] is True
    assert out["etagSaveStale"]["status"] == 409
    assert json.loads(out["etagSaveStale"]["error_msg"])["errorCode"] == "ERR_STATE_SAVE"
    assert out["etagDeleteStale"]["status"] == 409
    assert json.loads(out["etagDeleteStale"]["error_msg"])["errorCode"] == "ERR_STATE_DELETE"
    assert out["afterStale"] == "two"
    assert out["etagDeleteRight"] is None and out["afterDelete"] == ""

    assert out["firstWriteOne"] is None and out["firstWriteTwo"]["status"] == 409
    assert out["firstWriteValue"] == "one"

    expires = out["ttlHour"]["metadata"]["ttlExpireTime"]
    from datetime import datetime
    at = datetime.fromisoformat(expires.replace("Z", "+00:00")).timestamp()
    assert abs(at - (out["ttlHourAsked"] / 1000 + 3600)) < 10
    assert out["ttlAtOnce"] == "soon gone"
    assert out["ttlGoneAfterMs"] is not None and out["ttlGoneAfterMs"] <= 3000 + 1000

    assert [i.get("data") for i in out["tx"]] == [{"a": 1}, "b", None]
    assert out["txOrder"] == "value3"
    assert out["txFailed"]["status"] == 500  # daprd answers a failed transaction 500
    assert json.loads(out["txFailed"]["error_msg"])["errorCode"] == "ERR_STATE_TRANSACTION"
    assert [i.get("data") for i in out["txNotApplied"]] == [None, {"a": 1}]

    assert out["unknownStore"]["status"] == 400
    assert json.loads(out["unknownStore"]["error_msg"])["errorCode"] == \
        "ERR_STATE_STORE_NOT_FOUND"
    assert out["publish"]["status"] == 400
    assert json.loads(out["publish"]["error_msg"])["errorCode"] == "ERR_PUBSUB_NOT_CONFIGURED"
    assert out["secret"]["status"] == 500
    assert json.loads(out["secret"]["error_msg"])["errorCode"] == \
        "ERR_SECRET_STORES_NOT_CONFIGURED"
