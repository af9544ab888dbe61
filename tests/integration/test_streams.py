"""Resumable streams through the real Envoy (docs/streams.md): the demo's tally streams
(WebSocket ``/streams/ws``, Server-Sent Events ``/streams/sse``: :mod:`meshxl.demo.tally`)
on a high-availability cluster of three members, each with its statesync sidecar, and
meshxl's stream clients.

A kill -9 of the member serving the streams: no client sees an error, every message is
answered exactly once and in order (the tallies, the handler's committed state, say
that no message was applied twice or lost), the answers after the kill come from the
new owner. Resuming is refused, with its close code, for a stream of another session
and an unknown one; a malformed frame closes its own stream and no other. One
deployment for the module.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from meshxl import headers as hdr
from meshxl.local.deployment import DemoDeployment
from meshxl.local.wait import wait_until
from meshxl.streams import (
    SUBPROTOCOL,
    ClientStream,
    StreamRefused,
    connect_sse,
    connect_websocket,
)
from meshxl.streams.protocol import FORBIDDEN, MALFORMED, UNKNOWN, new_token
from tests.harness.clock import scaled
from tests.harness.protocols import deployment, member_down, restart

# Not ``heavy``: every scenario waits for its streams' messages, none judges a duration;
# one worker runs them all, on the module's deployment.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("streams"),
              pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def streams_deployment(tmp_path_factory: pytest.TempPathFactory,
                             ) -> AsyncIterator[DemoDeployment]:
    async with deployment(tmp_path_factory.mktemp("streams"), "websocket",
                          drain_window=DRAIN_WINDOW,
                          fields={"route": f"{{timeout: {ROUTE_TIMEOUT:g}s}}"}) as d:
        yield d


ROUTE_TIMEOUT = 2.0
"""Short: a stream outlives the cluster's route timeout (Envoy's limit on a response)."""


DRAIN_WINDOW = 60.0
"""Long: a planned move hands streams on long before Envoy would close them."""


@dataclass
class Tally:
    """One stream's conversation: what was sent, what came back."""

    session: str
    stream: ClientStream
    sent: list[int] = field(default_factory=list)
    answers: list[dict[str, Any]] = field(default_factory=list)

    async def talk(self, count: int, pause: float, rng: random.Random) -> None:
        reader = asyncio.create_task(self._read(count))
        try:
            for _ in range(count):
                n = rng.randint(1, 9)
                self.sent.append(n)
                await self.stream.send({"n": n})
                await asyncio.sleep(pause)
            async with asyncio.timeout(30):
                await reader
        finally:
            reader.cancel()

    async def _read(self, count: int) -> None:
        while len(self.answers) < count:
            self.answers.append(await self.stream.receive())

    def check(self) -> None:
        """Every message answered once, in order, applied once: the tally after each is
        the sum of what was sent up to it."""
        assert [a["seq"] for a in self.answers] == list(range(1, len(self.sent) + 1)), \
            (self.session, [a["seq"] for a in self.answers])
        running = 0
        for n, answer in zip(self.sent, self.answers, strict=True):
            running += n
            assert (answer["n"], answer["total"]) == (n, running), (self.session, answer)


def _url(d: DemoDeployment) -> str:
    return d.url.replace("http://", "ws://") + "/streams/ws"


async def _open(d: DemoDeployment, session: str, kind: str = "websocket") -> ClientStream:
    """``sse``: the client's frames in one upload per connection; ``sse-posts``: one
    POST per message (what the browser client does)."""
    if kind in ("sse", "sse-posts"):
        stream = connect_sse(f"{d.url}/streams/sse", headers={hdr.SESSION: session},
                             resume_timeout=20, upload=kind == "sse")
    else:
        stream = connect_websocket(_url(d), headers={hdr.SESSION: session},
                                   resume_timeout=20)
    async with asyncio.timeout(15):
        return await stream.start()


@dataclass
class Talking:
    """Tally streams talking through a test, all served by one member."""

    tallies: list[Tally]
    talks: list[asyncio.Task[None]]
    served: str
    """The member that answered them all so far."""

    async def done(self) -> None:
        """Every message sent and answered; each stream's checks."""
        try:
            async with asyncio.timeout(60):
                await asyncio.gather(*self.talks)
        except TimeoutError:
            raise AssertionError("streams not answered in time: " + "; ".join(
                f"{t.session}: {len(t.answers)} of {len(t.sent)} answered (last by "
                f"{t.answers[-1]['member'] if t.answers else None}), "
                f"{t.stream.connections} connections, resumes {t.stream.resumes}"
                for t in self.tallies)) from None
        for t in self.tallies:
            t.check()

    async def answered_elsewhere(self, timeout: float) -> None:
        await wait_until(lambda: all(t.answers and t.answers[-1]["member"] != self.served
                                     for t in self.tallies), timeout=timeout,
                         what="every stream answered by another member")

    async def aclose(self) -> None:
        for task in self.talks:
            task.cancel()
        for t in self.tallies:
            await t.stream.aclose()


async def _talking(d: DemoDeployment, prefix: str, kind: str, streams: int, messages: int,
                   pause: float, seed: int) -> Talking:
    """``streams`` tally streams of ``kind``, each sending ``messages``, until each has
    five answers, all from one member (the active: it serves every session)."""
    rng = random.Random(seed)
    tallies = [Tally(f"{prefix}-{kind}-{i}", await _open(d, f"{prefix}-{kind}-{i}", kind))
               for i in range(streams)]
    talks = [asyncio.create_task(t.talk(messages, pause, rng)) for t in tallies]
    talking = Talking(tallies, talks, "")

    def serving() -> set[str]:
        return {t.answers[-1]["member"] for t in tallies if t.answers}

    # The tests before may have left the active role moving back to a member they
    # restarted: a stream opened meanwhile moves with it (a planned move), so wait for
    # one member to answer every stream.
    try:
        await wait_until(lambda: all(len(t.answers) >= 5 for t in tallies)
                         and len(serving()) == 1, timeout=scaled(30),
                         what="5 answers on every stream, all from one member",
                         explain=lambda: f"answered by {sorted(serving())}")
    except BaseException:
        await talking.aclose()
        raise
    talking.served = serving().pop()
    return talking


@pytest.mark.parametrize("kind", ["websocket", "sse", "sse-posts"])
async def test_streams_survive_a_kill_9_of_their_member_exactly_once(
        streams_deployment: DemoDeployment, kind: str) -> None:
    d = streams_deployment
    talking = await _talking(d, "kill", kind, 12, 40, 0.03, 7)
    try:
        await d.kill_member(talking.served)
        await talking.done()
        for t in talking.tallies:
            assert t.answers[-1]["member"] != talking.served
            assert t.stream.connections >= 2 and len(t.stream.resumes) >= 1
    finally:
        await talking.aclose()
        await restart(d, talking.served)


@pytest.mark.parametrize("kind", ["websocket", "sse"])
async def test_a_drained_members_streams_resume_on_the_new_owner_at_once(
        streams_deployment: DemoDeployment, kind: str) -> None:
    """``meshxl member down``: the member's app sees the planned move in its sidecar's
    ``/readyz`` and hands its streams on (close code 4000, "moved"), without waiting for
    the drain window (60 s here) after which Envoy would close them; every message once,
    in order, the later ones answered by the new owner."""
    d = streams_deployment
    talking = await _talking(d, "drain", kind, 6, 60, 0.03, 3)
    try:
        await member_down(d, talking.served)
        await talking.answered_elsewhere(DRAIN_WINDOW / 3)
        await talking.done()
        assert all(t.stream.connections >= 2 for t in talking.tallies)
    finally:
        await talking.aclose()
        await member_down(d, talking.served, down=False)


@pytest.mark.parametrize("kind", ["websocket", "sse"])
async def test_streams_of_a_member_cut_off_resume_and_it_is_fenced_when_it_returns(
        streams_deployment: DemoDeployment, kind: str) -> None:
    """The serving member freezes (SIGSTOP on its app and sidecar: a paused VM, or a
    member nobody can reach): no connection breaks, nothing answers. The clients'
    heartbeat finds the silence, they resume through Envoy on the member that takes the
    session over; when the frozen one comes back, its next commit is refused and it
    stops, so nothing it had is ever delivered: every message once, in order."""
    import signal

    d = streams_deployment
    talking = await _talking(d, "freeze", kind, 4, 50, 0.05, 5)
    member = d.member(talking.served)
    processes = [p for p in (member.app, member.sidecar) if p is not None]
    try:
        for proc in processes:
            proc.signal(signal.SIGSTOP)
        await talking.answered_elsewhere(40)
        for proc in processes:
            proc.signal(signal.SIGCONT)
        await talking.done()
    finally:
        for proc in processes:
            proc.signal(signal.SIGCONT)
        await talking.aclose()
        await restart(d, talking.served)


@pytest.mark.parametrize("kind", ["websocket", "sse"])
async def test_a_stream_outlives_the_routes_timeout_on_one_connection(
        streams_deployment: DemoDeployment, kind: str) -> None:
    """The cluster's route timeout (2 s here) bounds a response; an event stream and a
    WebSocket are not cut by it (meshxl's routes for them have none): one connection
    carries the stream well past it."""
    d = streams_deployment
    stream = await _open(d, f"long-{kind}", kind)
    try:
        started = asyncio.get_running_loop().time()
        sent = 0
        while asyncio.get_running_loop().time() - started < ROUTE_TIMEOUT * 2:
            sent += 1
            await stream.send({"n": 1})
            async with asyncio.timeout(10):
                assert (await stream.receive())["total"] == sent
            await asyncio.sleep(0.1)
        assert stream.connections == 1 and not stream.resumes
    finally:
        await stream.aclose()


async def test_an_upload_carries_more_than_envoys_buffer_on_one_connection(
        streams_deployment: DemoDeployment) -> None:
    """An event stream's client frames travel in one POST per connection. It is
    answered at once, so Envoy keeps none of it to send again (a retry's buffer, 1 MiB
    per request): 1.6 MB of messages go through one upload, on one connection, every
    one answered once, and Envoy abandoned no retry buffer for it."""
    from meshxl.proxy.admin import EnvoyAdmin

    d = streams_deployment
    async with EnvoyAdmin(d.admin_url, timeout=2.0) as admin:
        abandoned = sum((await admin.stats("retry_or_shadow_abandoned")).values())
    stream = await _open(d, "big-upload", "sse")
    pad = "x" * 40_000
    try:
        for i in range(1, 41):
            await stream.send({"n": 1, "pad": pad})
            async with asyncio.timeout(scaled(10)):
                assert (await stream.receive())["total"] == i
        assert stream.connections == 1 and not stream.resumes
    finally:
        await stream.aclose()
    async with EnvoyAdmin(d.admin_url, timeout=2.0) as admin:
        assert sum((await admin.stats("retry_or_shadow_abandoned")).values()) == abandoned


async def test_a_malformed_upload_closes_only_its_own_stream(
        streams_deployment: DemoDeployment) -> None:
    """An upload is refused as a POST is for another session's stream (403); a frame in
    it that breaks the protocol (an acknowledgement of a message never sent) ends the
    upload with a ``malformed`` line and closes that stream, and no other."""
    d = streams_deployment
    url = f"{d.url}/streams/sse"
    bystander = await _open(d, "upload-bystander", "sse")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
                total=None, sock_read=scaled(20))) as http:
            source = PlainEventSource(http, url, "upload-bad")
            assert await source.connect() == 200
            events = source.events()
            kind, data, _ = await anext(events)
            assert kind == "ready", (kind, data)
            ready = json.loads(data)
            headers = {"X-Meshxl-Stream": ready["id"], "X-Meshxl-Epoch": str(ready["epoch"]),
                       "Content-Type": "application/x-ndjson"}
            async with http.post(url, data=b'{"t":"m","s":1,"d":{"n":1}}\n', headers={
                    **headers, hdr.SESSION: "upload-thief"}) as answer:
                assert answer.status == FORBIDDEN.http_status, await answer.text()
            async with http.post(url, data=b'{"t":"a","s":99}\n', headers={
                    **headers, hdr.SESSION: "upload-bad"}) as answer:  # 99 never sent
                assert answer.status == 200
                lines = (await answer.text()).splitlines()
                assert [json.loads(line)["code"] for line in lines] == [MALFORMED.name]
            last_words = [json.loads(data).get("code") async for kind, data, _ in events
                          if kind == "error"]
            assert last_words == [MALFORMED.name]
            assert source.response is not None
            source.response.close()
        await bystander.send({"n": 4})
        async with asyncio.timeout(scaled(10)):
            assert (await bystander.receive())["total"] == 4
    finally:
        await bystander.aclose()


async def test_resuming_another_sessions_stream_is_refused(
        streams_deployment: DemoDeployment) -> None:
    d = streams_deployment
    owner = await _open(d, "owner")
    try:
        await owner.send({"n": 1})
        assert (await owner.receive())["total"] == 1
        assert owner.token is not None
        async with aiohttp.ClientSession() as http:
            for session, token, refusal in (("thief", owner.token, FORBIDDEN),
                                            ("owner", new_token(), UNKNOWN)):
                async with http.ws_connect(_url(d), protocols=(SUBPROTOCOL,),
                                           headers={hdr.SESSION: session}) as ws:
                    await ws.send_json({"t": "resume", "id": token, "recv": 0})
                    frames = [m async for m in ws]
                    assert ws.close_code == refusal.close_code, (session, frames)
                    assert any(refusal.name in str(m.data) for m in frames), frames
        # The owner's stream goes on, untouched.
        await owner.send({"n": 2})
        assert (await owner.receive())["total"] == 3
    finally:
        await owner.aclose()


async def test_a_malformed_frame_closes_only_its_own_stream(
        streams_deployment: DemoDeployment) -> None:
    d = streams_deployment
    bystander = await _open(d, "bystander")
    try:
        async with aiohttp.ClientSession() as http, \
                http.ws_connect(_url(d), protocols=(SUBPROTOCOL,),
                                headers={hdr.SESSION: "bad"}) as ws:
            await ws.send_json({"t": "open"})
            ready = await ws.receive_json(timeout=10)
            assert ready["t"] == "ready"
            await ws.send_str('{"t": "m", "s": 5, "d": 1}')  # a gap: 5 before 1
            frames = [m async for m in ws]
            assert ws.close_code == MALFORMED.close_code, frames
        await bystander.send({"n": 4})
        assert (await bystander.receive())["total"] == 4
    finally:
        await bystander.aclose()


async def test_a_client_without_the_protocol_gets_a_plain_websocket(
        streams_deployment: DemoDeployment) -> None:
    d = streams_deployment
    async with aiohttp.ClientSession() as http, \
            http.ws_connect(_url(d), headers={hdr.SESSION: "plain"}) as ws:
        await ws.send_json({"n": 5})
        answer = await ws.receive_json(timeout=10)
        assert (answer["seq"], answer["total"]) == (1, 5)


async def test_a_stream_refused_for_good_raises_to_the_application(
        streams_deployment: DemoDeployment) -> None:
    d = streams_deployment
    owner = await _open(d, "victim")
    stolen = connect_websocket(_url(d), headers={hdr.SESSION: "intruder"}, resume_timeout=5)
    stolen.token = owner.token  # as if it had learned the token
    try:
        with pytest.raises(StreamRefused) as refused:
            async with asyncio.timeout(15):
                await stolen.start()
        assert refused.value.refusal is FORBIDDEN
    finally:
        await stolen.aclose()
        await owner.aclose()


# -- a plain EventSource ---------------------------------------------------------------


class PlainEventSource:
    """What a browser's ``EventSource`` does, and nothing more (no meshxl library): a
    ``GET`` accepting ``text/event-stream``, its events parsed as the HTML standard
    says, the last event id remembered and sent back as ``Last-Event-ID`` when it
    connects again. The page's own code POSTs its messages (docs/streams.md)."""

    def __init__(self, http: aiohttp.ClientSession, url: str, session: str):
        self.http, self.url, self.session = http, url, session
        self.last_event_id = ""
        self.response: aiohttp.ClientResponse | None = None

    async def connect(self) -> int:
        """One connection (its status: EventSource gives up for good on any but 200)."""
        headers = {hdr.SESSION: self.session, "Accept": "text/event-stream",
                   "Cache-Control": "no-cache"}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        self.response = await self.http.get(self.url, headers=headers)
        return self.response.status

    async def events(self) -> AsyncIterator[tuple[str, str, str]]:
        """(type, data, id) of each event dispatched, until the connection ends (or
        breaks: a member killed)."""
        assert self.response is not None
        kind, event_id = "", None
        data: list[str] = []
        lines = self.response.content
        while True:
            try:
                raw = await lines.readline()
            except aiohttp.ClientPayloadError:
                return
            if not raw:
                return
            line = raw.decode().rstrip("\r\n")
            if not line:
                if event_id is not None:
                    self.last_event_id = event_id
                if data:
                    yield kind or "message", "\n".join(data), self.last_event_id
                kind, data, event_id = "", [], None
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                kind = value
            elif name == "data":
                data.append(value)
            elif name == "id" and "\0" not in value:
                event_id = value

    async def post(self, token: str, seq: int, n: int) -> int:
        async with self.http.post(self.url, json={"n": n}, headers={
                hdr.SESSION: self.session, "X-Meshxl-Stream": token,
                "X-Meshxl-Seq": str(seq)}) as resp:
            return resp.status


@pytest.mark.parametrize("action", ["kill", "drain"])
async def test_a_plain_event_source_resumes_with_last_event_id(
        streams_deployment: DemoDeployment, action: str) -> None:
    """No meshxl library, only what a browser's ``EventSource`` does: its connection
    breaks when the member serving it is killed -9 or drained, and its one reconnect,
    sent with ``Last-Event-ID`` (the last event it dispatched), gets the stream on the
    new owner and exactly the events after that id: none missed, none twice. The
    events it had not dispatched when the connection broke (in flight) come again; the
    later messages are answered by the new owner, the tally going on from the
    committed one."""
    d = streams_deployment
    rng = random.Random(17)
    url = f"{d.url}/streams/sse"
    sent: list[int] = []
    seen: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
            total=None, sock_read=scaled(20))) as http:
        source = PlainEventSource(http, url, f"plain-{action}")
        assert await source.connect() == 200
        events = source.events()
        kind, data, _ = await anext(events)
        assert kind == "ready", (kind, data)
        token = json.loads(data)["id"]

        async def answered(count: int) -> None:
            """POST the messages up to ``count``, one at a time as a page would, and
            read their answers (ack events are the library's: not for a page)."""
            while len(sent) < count:
                sent.append(rng.randint(1, 9))
                assert await source.post(token, len(sent), sent[-1]) == 202
                while len(seen) < len(sent):
                    async with asyncio.timeout(scaled(10)):
                        kind, data, event_id = await anext(events)
                    if kind == "message":
                        seen.append({**json.loads(data), "id": event_id})

        await answered(10)
        served = seen[-1]["member"]
        # The last four were in flight when the connection broke: never dispatched.
        source.last_event_id = seen[5]["id"]
        del seen[6:]
        if action == "kill":
            await d.kill_member(served)
        else:
            await member_down(d, served)
        try:
            last_words = [(kind, json.loads(data).get("code")) async for kind, data, _
                          in events if kind == "error"]  # until the connection ends
            # A drain hands the stream on (``moved``); a kill just breaks the connection.
            assert last_words == ([] if action == "kill" else [("error", "moved")])
            assert await source.connect() == 200, source.response
            events = source.events()
            async with asyncio.timeout(scaled(10)):
                kind, data, _ = await anext(events)
            ready = json.loads(data)
            assert kind == "ready" and ready["id"] == token, (kind, data)
            assert ready["in"] == 10  # every message answered was consumed: none to resend
            await answered(16)
        finally:
            assert source.response is not None
            source.response.close()
            if action == "kill":
                await restart(d, served)
            else:
                await member_down(d, served, down=False)
    assert [a["seq"] for a in seen] == list(range(1, 17)), [a["seq"] for a in seen]
    assert [a["id"] for a in seen] == [f"{token}:{i}" for i in range(1, 17)]
    assert [a["total"] for a in seen] == [sum(sent[:i]) for i in range(1, 17)], (sent, seen)
    assert all(a["member"] == served for a in seen[:10])  # 7-10: replayed, as committed
    assert all(a["member"] != served for a in seen[10:])
