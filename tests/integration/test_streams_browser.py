"""The browser's stream client (``meshxl/streams/static/meshxl-streams.js``,
docs/streams.md, "Browser (JavaScript)").

Its logic under Node's test runner (tests/js: frames, the event-stream reader, resume,
resend, duplicates, order, acknowledgements, refusals, limits), fed what the Python
protocol says and writes, and read back by it, so the two ends cannot drift apart.

Then in a real browser: headless Chromium (Debian's package) loads the demo's stream
page (``/streams/``, :mod:`meshxl.demo.tally_page`) through the real Envoy of a
load-sharing cluster that hashes sessions on the page's cookie (a browser sends no
custom WebSocket header); the page keeps a WebSocket stream and a Server-Sent Events
stream of the tally; the member serving them is killed with kill -9; every message is
answered exactly once and in order (the tallies, the handlers' committed state, say no
message was applied twice or lost), the answers after the kill come from another
member, and the page loaded nothing from anywhere else.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from meshxl import headers as hdr
from meshxl.local.deployment import DemoDeployment
from meshxl.local.procs import Owner
from meshxl.streams import ClientStream
from meshxl.streams.protocol import (
    ACK,
    END,
    ERROR,
    FAILED,
    MESSAGE,
    OPEN,
    READY,
    REFUSALS,
    RESUME,
    SUBPROTOCOL,
    TOO_FAR_BEHIND,
    Frame,
    Limits,
    ProtocolError,
    decode_binary,
    decode_frame,
    encode_binary,
    encode_frame,
    encoded_size,
    new_token,
)
from meshxl.streams.sse import _Conduit, _ready
from tests.harness.browser import BrowserNotInstalled, find_chromium, open_page, wait_for_js
from tests.harness.clock import SCALE
from tests.harness.protocols import deployment

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
JS_TESTS = ROOT / "tests" / "js" / "meshxl-streams.test.mjs"
KINDS = ("ws", "sse")
COUNT = 80
"""Messages each stream of the page sends."""
INTERVAL_MS = 40


# -- the client's logic, under Node ----------------------------------------------------------


class _Written:
    """What a server's event stream writes (an aiohttp response, as the conduit uses it)."""

    def __init__(self) -> None:
        self.data = b""

    async def write(self, data: bytes) -> None:
        self.data += data


async def _fixture() -> dict[str, Any]:
    """What the Python side says and writes, for the JavaScript side to check."""
    token = new_token()
    frames = [Frame(OPEN), Frame(RESUME, token=token, recv=3),
              Frame(READY, token=token, consumed=2, last=(1 << 53) - 1),
              Frame(MESSAGE, seq=1,
                    payload={"text": "h\u00e9 \u4e16 \U0001f600", "n": [1, 2.5, None]}),
              Frame(MESSAGE, seq=2, payload="a string"), Frame(MESSAGE, seq=3, payload=None),
              Frame(MESSAGE, seq=4, payload={"k": 1}, ack=3),
              Frame(ACK, seq=0), Frame(END, seq=9),
              Frame(ERROR, refusal=TOO_FAR_BEHIND, message="behind by 300 KiB")]
    malformed = ['{"t":"m","s":0,"d":1}', '{"t":"m","s":true,"d":1}', '{"t":"ack","s":1}',
                 '{"t":"ready","id":"short","in":0,"out":0}', '{"t":"error","code":"nope"}',
                 '{"t":"a","s":9007199254740992}', '{"t":"m","s":1,"a":-1,"d":1}',
                 '{"t":"m","s":1,"a":"2","d":1}', "[1]", "not json"]
    for text in malformed:
        with pytest.raises(ProtocolError):
            decode_frame(text)
    written = _Written()
    conduit = _Conduit(written, token)  # type: ignore[arg-type]
    await written.write(_ready(token, 0, 0, 3))
    await conduit.send_messages([(1, {"a": "b\nc"}), (2, b"\x00\x01\xff"), (3, [1, "\u00e9"])])
    await conduit.send_ack(4)
    await written.write(b": ping\n\n")
    await conduit.send_end(3, FAILED)
    defaults = inspect.signature(ClientStream.__init__).parameters
    return {
        "subprotocol": SUBPROTOCOL,
        "refusals": [dataclasses.asdict(r) for r in REFUSALS],
        "limits": dataclasses.asdict(Limits()),
        "client": {"resume_timeout": defaults["resume_timeout"].default,
                   "backoff": list(defaults["backoff"].default)},
        "frames": [{"text": encode_frame(f), "frame": {
            "type": f.type, "seq": f.seq, "payload": f.payload, "ack": f.ack, "token": f.token,
            "recv": f.recv, "consumed": f.consumed, "last": f.last,
            "refusal": f.refusal.name if f.refusal else None, "message": f.message}}
            for f in frames],
        "binary": [[seq, encode_binary(seq, data).hex(), data.hex()]
                   for seq, data in ((1, b"\x00\xff"), ((1 << 53) - 1, b""), (1 << 40, b"x"))],
        "malformed": malformed,
        "sse": {"text": written.data.decode(), "token": token, "epoch": 3,
                "frames": [{"type": READY, "seq": None}, {"type": MESSAGE, "seq": 1},
                           {"type": MESSAGE, "seq": 2}, {"type": MESSAGE, "seq": 3},
                           {"type": ACK, "seq": 4}, {"type": ERROR, "seq": None},
                           {"type": END, "seq": 3}],
                "payloads": [{"a": "b\nc"}, "0001ff", [1, "\u00e9"]]},
    }


@pytest.fixture
def node() -> str:
    """Fail (never skip) without Node: setup installs it."""
    path = shutil.which("node")
    if path is None:
        pytest.fail("the browser client's tests need Node.js (node on PATH): apt-get install "
                    "nodejs (scripts/setup.sh installs it)", pytrace=False)
    return path


def test_the_browser_client_logic_under_node(node: str, tmp_path: Path) -> None:
    fixture, out = tmp_path / "fixture.json", tmp_path / "out.json"
    fixture.write_text(json.dumps(asyncio.run(_fixture())))
    run = subprocess.run([node, "--test", "--test-reporter=tap", str(JS_TESTS)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "MESHXL_STREAMS_FIXTURE": str(fixture),
                              "MESHXL_STREAMS_OUT": str(out),
                              "MESHXL_STREAMS_TIME_SCALE": str(SCALE)})
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    counts = dict(line[2:].split(" ", 1) for line in run.stdout.splitlines()
                  if line.startswith(("# pass ", "# fail ", "# skipped ", "# todo ")))
    assert counts == {"pass": counts["pass"], "fail": "0", "skipped": "0", "todo": "0"}, report
    assert int(counts["pass"]) >= 25, report

    # What the JavaScript side wrote, as the Python side reads it.
    written = json.loads(out.read_text())
    decoded = [decode_frame(text) for text in written["frames"]]
    assert [f.type for f in decoded] == [OPEN, RESUME, RESUME, MESSAGE, MESSAGE, MESSAGE,
                                         ACK, END]
    assert decoded[2].recv == (1 << 53) - 1 and decoded[4].seq == 1 << 40
    assert decoded[5] == Frame(MESSAGE, seq=3, payload=[1], ack=2) and decoded[4].ack is None
    assert decoded[3].payload == {"text": "h\u00e9\u4e16 \U0001f600",
                                  "n": [1, 2.5, -3e-7, None, True]}
    for seq, frame, data in written["binary"]:
        assert decode_binary(bytes.fromhex(frame)) == (seq, bytes.fromhex(data))
    for value, size in written["sizes"]:
        assert encoded_size(value) == size, value


# -- in a browser, through the real Envoy ------------------------------------------------------


@pytest.fixture
def chromium() -> str:
    """Fail (never skip) without a browser: setup installs it."""
    try:
        return find_chromium()
    except BrowserNotInstalled as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
async def cookie_mesh(harness: Owner, tmp_path: Path) -> AsyncIterator[DemoDeployment]:
    """Three members sharing the traffic, sessions hashed on the page's cookie."""
    async with deployment(tmp_path / "work", "websocket", mode="load-sharing",
                          hash_cookie=hdr.SESSION) as d:
        harness.own(d.owner)  # its processes' logs in a failure report
        yield d


def _answered(at_least: int) -> str:
    return (f"{list(KINDS)}.every(k => (window.tally?.streams?.[k]?.answers?.length ?? 0)"
            f" >= {at_least})")


async def test_a_browser_keeps_its_streams_across_a_kill_9_exactly_once(
        chromium: str, cookie_mesh: DemoDeployment, tmp_path: Path) -> None:
    d = cookie_mesh
    async with open_page(tmp_path / "profile") as (page, console):
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        await page.goto(f"{d.url}/streams/?count={COUNT}&interval={INTERVAL_MS}")
        await wait_for_js(page, _answered(10), timeout=20, what="10 answers on each stream")
        before = await page.evaluate("window.tally")
        served = {before["streams"][k]["answers"][-1]["member"] for k in KINDS}
        assert len(served) == 1, served  # one session, one cookie: one member serves both
        victim = served.pop()
        await d.kill_member(victim)
        await wait_for_js(page, f"{list(KINDS)}.every(k => window.tally.streams[k].done)",
                          timeout=60, what="both streams to end")
        tally = await page.evaluate("window.tally")
        for kind in KINDS:
            record = tally["streams"][kind]
            assert record["error"] is None, (kind, record["error"], record["events"])
            answers, sent = record["answers"], record["sent"]
            assert len(sent) == COUNT
            assert [a["seq"] for a in answers] == list(range(1, COUNT + 1)), (kind, answers)
            running = 0
            for n, answer in zip(sent, answers, strict=True):
                running += n
                assert (answer["n"], answer["total"]) == (n, running), (kind, answer)
            assert record["check"] == "ok" and record["state"] == "ended", record
            members = [a["member"] for a in answers]
            moved = next(i for i, m in enumerate(members) if m != victim)
            assert moved >= 10 and victim not in members[moved:], (kind, members)
            # Once for the kill; a second move is allowed (Envoy's retry after the
            # refused connect and its table without the dead member may choose two
            # members), not a stream that keeps resuming.
            assert 1 <= len(record["resumes"]) <= 3, (kind, record["events"])
            print(f"\n{kind}: {COUNT} answers, {members[:moved].count(victim)} from {victim} "
                  f"then {sorted(set(members[moved:]))}; resumed after "
                  f"{[round(s * 1000) for s in record['resumes']]} ms")
        # The page ran without an error of its own; what the browser says about the
        # connections the kill broke is not the page's.
        assert console.errors == [], console.errors
        own = [text for kind, text in console.messages if kind in ("error", "warning")
               and not _a_broken_connection(text, d.url)]
        assert own == [], own
        local = (d.url + "/", d.url.replace("http://", "ws://") + "/")
        assert all(url.startswith(local) for url in requests), requests


def _a_broken_connection(text: str, origin: str) -> bool:
    """What Chromium logs when a connection of the page fails: a WebSocket that could not
    connect or lost its server, a request answered with an error status or not at all."""
    ws = origin.replace("http://", "ws://")
    return (text.startswith((f"WebSocket connection to '{ws}/streams/ws' failed",
                             "Failed to load resource"))
            or f"{origin}/streams/sse" in text)
