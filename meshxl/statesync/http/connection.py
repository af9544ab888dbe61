"""One client connection of the sidecar's server: parse (llhttp through ``httptools``),
admit from the head (:mod:`.admission`), queue pipelined requests and take each up as
soon as none before it conflicts (:func:`.routing.must_wait`), answer in order, the
answers ready in one turn of the event loop in one write; a refusal that may wait is
held while nothing follows it (:class:`.admission.Hold`). What the connections of one
server share is its :class:`~.site.Site`."""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import httptools

from meshxl.headers import LOWERED, lower_name
from meshxl.httpbase import MAX_FIELD_SIZE, MAX_HEADERS

from .admission import Hold, admit
from .messages import JSON, Response, encode_head, error
from .routing import IGNORED_BODY, WRITE, Request, failure, framing_refusal, handled, must_wait
from .site import BODY, DONE, HEAD, IDLE, Site

log = logging.getLogger("meshxl.statesync.http")

__all__ = ["DISCARD_LIMIT", "LINGER", "MAX_PIPELINED", "MAX_QUEUED", "Connection"]

MAX_QUEUED = 8
"""Pipelined requests waiting (not taken up) on one connection before it stops reading."""
MAX_PIPELINED = 64
"""Pipelined requests taken up and not sent on one connection at most: past it, none is
taken up and the connection stops reading."""
DISCARD_LIMIT = 16 * 1024 * 1024
"""Bytes of a refused body read and dropped before the connection is closed instead."""
LINGER = 2.0
"""Seconds a connection closed under a request body still reads (and drops) it, so the
client gets the answer rather than a reset."""

class _Stop(Exception):
    """Raised in a parser callback, which stops httptools: answer ``response``, close."""

    def __init__(self, response: Response):
        super().__init__(response.status)
        self.response = response


class Slot:
    """A request taken up, in arrival order: its answer, once there is one (a request
    refused from its head has its answer at once, unless it is held; ``request`` None:
    the answer to bytes that could not be parsed, the connection's last)."""

    __slots__ = ("request", "response")

    def __init__(self, request: Request | None, response: Response | None):
        self.request = request
        self.response = response


class Connection(asyncio.Protocol):
    """One client connection: parse, queue, answer in order."""

    def __init__(self, site: Site):
        self.site = site
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Request | Response] = deque()
        """Complete requests not taken up yet, in arrival order; last, the answer to one
        that could not be parsed (then the connection closes)."""
        self.slots: deque[Slot] = deque()
        """Requests taken up and not answered yet, in arrival order."""
        self.holding: Hold | None = None
        """The refusal held in the last slot, if any (:mod:`.admission`)."""
        self.active: list[Request] = []
        """Requests whose handlers run."""
        self.others = 0
        """Of them, those that are not writes (a write never waits for a write)."""
        self.held = 0
        """Bytes of the answers ready and not written yet (their bodies, as they are)."""
        self.flush_soon = False
        self.paused_reading = False
        self.paused_writing = False
        self.closing = False
        """Close after the answers queued so far (an error, a shutdown, Connection: close)."""
        self.lingering = False
        self.ended = False
        """The connection's last request came (``Connection: close``, HTTP/1.0): what
        follows it is dropped, never parsed."""
        self.deadline = 0.0
        """When the idle connection, the head or the body under way has had its time."""
        self.write_deadline = 0.0
        """When a client that does not read its answers has had its time."""
        self.state = IDLE
        self.started = 0.0
        """When the request being read began (its first byte)."""
        # The message being parsed.
        self._url: list[bytes] = []
        self._url_size = 0
        self._headers: dict[str, str] = {}
        self._header_count = 0
        self._head_bytes = 0
        self._request: Request | None = None
        self._body: list[bytes] = []
        self._body_size = 0
        self._limit = 0

    # -- transport events -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's: not a subclass
        site = self.site
        if len(site.connections) >= site.max_connections and not site.make_room():
            self.ended = True  # nothing it sends is read
            refusal = error(503, "too many connections: every one has requests under way")
            assert self.transport is not None
            self.transport.write(self._encode(refusal, keep_alive=False))
            self.transport.close()
            return
        site.connections[self] = None
        self.deadline = self.loop.time() + site.header_timeout
        if site.closing:
            self.shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        self.site.connections.pop(self, None)
        if self.site.closing and not self.site.connections:
            self.site.drained.set()
        self.transport = None
        self.queue.clear()
        if self.holding is not None:
            self.holding.timer.cancel()
            self.holding = None

    def pause_writing(self) -> None:
        self.paused_writing = True
        self.write_deadline = self.loop.time() + self.site.write_timeout

    def resume_writing(self) -> None:
        self.paused_writing = False
        self.write_deadline = 0.0
        self._next()

    def data_received(self, data: bytes) -> None:
        if self.lingering or self.ended or self.closing and not self.slots and not self.queue:
            return  # closing: what still arrives is dropped
        if self.state == HEAD:  # a head arriving in pieces (its first piece is bounded
            self._head_bytes += len(data)  # by the transport's read size)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Upgrade and CONNECT are not served: answer what completed, then close.
            if self.state != IDLE:
                self._fail(error(400, "protocol upgrades and CONNECT are not supported"))
            else:
                self.closing = True
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Stop):
                self._fail(cause.response)
            else:
                log.error("HTTP parser callback failed", exc_info=cause or exc)
                self._fail(error(500, "internal error parsing the request"))
        except httptools.HttpParserError as exc:
            if not self.ended:  # else: bytes after the last request, dropped
                self._fail(error(400, f"bad HTTP request: {exc}"))
        else:
            if self.state == HEAD and self._head_bytes > MAX_HEADERS * MAX_FIELD_SIZE:
                self.site.hit("head_size")
                self._fail(error(431, "request head too large"))
        self._next()

    def eof_received(self) -> bool | None:
        if self.slots or self.queue:
            self.closing = True  # answer what came (half-closed clients read it)
            if self.holding is not None:
                self._unhold()
                self.loop.call_soon(self._flush_then_next)
            return True
        return None

    # -- parser callbacks (httptools) -------------------------------------------------------

    def on_message_begin(self) -> None:
        self.state = HEAD
        self._unhold()  # another request follows: the held answer goes before its own
        # A head has header_timeout from its first byte, whatever came before it on the
        # connection (a request under way, an answer not yet sent).
        self.started = self.loop.time()
        self.deadline = self.started + self.site.header_timeout
        self._url = []
        self._url_size = 0
        self._headers = {}
        self._header_count = 0
        self._body = []
        self._body_size = 0
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url_size += len(url)
        if self._url_size > MAX_FIELD_SIZE:
            self.site.hit("head_size")
            raise _Stop(error(414, f"request target longer than {MAX_FIELD_SIZE} bytes"))
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > MAX_HEADERS or len(name) + len(value) > MAX_FIELD_SIZE:
            self._too_large(name)
        key = LOWERED.get(name) or lower_name(name)  # (the call only for a name not seen)
        headers = self._headers
        text = value.decode("latin-1")
        if key in headers:
            text = f"{headers[key]}, {text}"
        headers[key] = text

    def _too_large(self, name: bytes) -> None:
        self.site.hit("head_size")
        if self._header_count > MAX_HEADERS:
            raise _Stop(error(431, f"more than {MAX_HEADERS} header fields"))
        raise _Stop(error(431, f"header field {name[:60].decode('latin-1')!r} longer "
                               f"than {MAX_FIELD_SIZE} bytes"))

    def on_headers_complete(self) -> None:
        self.state = BODY
        self.deadline = self.loop.time() + self.site.body_timeout
        parser = self.parser
        url = self._url[0] if len(self._url) == 1 else b"".join(self._url)
        path, _, query = url.decode("latin-1").partition("?")
        path = path.partition("#")[0]
        request = Request(parser.get_method().decode("latin-1"), path, query,
                          parser.get_http_version(), self._headers,
                          parser.should_keep_alive())
        self._request = request
        headers = self._headers
        if request.version != "1.1" or "host" not in headers \
                or "transfer-encoding" in headers or ", " in headers["host"]:
            refusal = framing_refusal(request)
            if refusal is not None:
                raise _Stop(refusal)
        expects = headers.get("expect", "").lower() == "100-continue"
        request.refusal = admit(self.site, request)
        self._limit = request.route.max_body if request.route is not None else 0
        if request.refusal is not None:
            if expects:  # the client waits before sending the body: answer now
                raise _Stop(request.refusal)
        elif expects and not self.slots and not self.queue and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        request = self._request
        assert request is not None
        if request.refusal is not None or self._limit == IGNORED_BODY:
            if self._body_size > DISCARD_LIMIT:  # too much to read and drop: hang up
                self.site.hit("body_size")
                raise _Stop(request.refusal or error(413, "request body too large"))
            return
        if self._body_size > self._limit:
            assert request.route is not None
            self.site.hit("body_size")
            self._body = []
            request.refusal = error(413, f"{request.route.what} is more than {self._limit} "
                                         f"bytes; the limit is {self._limit}",
                                    limit=self._limit)
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.state = DONE
        self.deadline = 0.0
        request = self._request
        assert request is not None
        if self._body and request.refusal is None:
            request.body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self.queue.append(request)
        if not request.keep_alive:  # its answer is the last: nothing after it is read
            self.closing = self.ended = True
            if self.transport is not None and not self.paused_reading:
                self.paused_reading = True
                self.transport.pause_reading()
        self._request = None
        self._body = []
        self.state = IDLE
        if (len(self.queue) >= MAX_QUEUED or len(self.slots) >= MAX_PIPELINED) \
                and not self.paused_reading and self.transport:
            self.paused_reading = True
            self.transport.pause_reading()

    # -- answering ----------------------------------------------------------------------------

    def _next(self) -> None:
        """Take up queued requests in order, each as soon as none of those still running
        conflicts with it (the module docstring, :attr:`Route.access`), while fewer than
        :data:`MAX_PIPELINED` are under way and less than the answer budget is unsent;
        send the answers ready, and read on or not."""
        queue, slots = self.queue, self.slots
        budget = self.site.answer_budget
        while True:
            self._take_up(budget)
            if not slots or slots[0].response is None or self.flush_soon:
                break
            self._flush()  # what it sent makes room: take up more, if any waits
            if not queue or self.paused_writing or len(slots) >= MAX_PIPELINED \
                    or self._unsent() >= budget:
                break
        transport = self.transport
        if transport is None:
            return
        unsent = self._unsent()
        if not self.paused_reading:
            if unsent >= budget:  # back-pressure: read on once answers drain
                self.paused_reading = True
                transport.pause_reading()
        elif not self.closing and len(queue) < MAX_QUEUED // 2 \
                and len(slots) < MAX_PIPELINED // 2 and unsent < budget // 2:
            self.paused_reading = False
            transport.resume_reading()
        if not slots and not queue:
            if self.closing:
                self._close()
            elif self.state == IDLE and not self.deadline:
                self.deadline = self.loop.time() + self.site.header_timeout
                self._head_bytes = 0

    def _take_up(self, budget: int) -> None:
        """Take up what may start now (:meth:`_next`'s bounds); the rest waits queued."""
        queue, slots = self.queue, self.slots
        if not queue or self.paused_writing or self._unsent() >= budget:
            return  # (nothing below writes: neither changes in the loop)
        while queue and len(slots) < MAX_PIPELINED:
            item = queue[0]
            if isinstance(item, Response):  # bytes that could not be parsed: the end
                queue.popleft()
                slots.append(Slot(None, item))
                self.held += len(item.body)
                continue
            if item.refusal is not None:
                queue.popleft()
                if item.hold and not queue and self._may_hold():
                    slot = Slot(item, None)
                    self.holding = Hold(self.loop, slot, item.hold, self._hold_expired)
                else:
                    slot = Slot(item, item.refusal)
                    self.held += len(item.refusal.body)
                slots.append(slot)
                continue
            assert item.route is not None
            write = item.route.access == WRITE
            if self.active and (self.others or not write) and any(
                    must_wait(item, other) for other in self.active):
                break
            queue.popleft()
            slot = Slot(item, None)
            slots.append(slot)
            self.active.append(item)
            if not write:
                self.others += 1
            if item.route.group is not None and queue and self.site.wrap is None:
                requests, group = self._group(item, slot)
                if len(group) > 1:
                    self.loop.create_task(self._handle_group(requests, group))
                    continue
            self.loop.create_task(self._handle(slot))

    def _group(self, first: Request, slot: Slot) -> tuple[list[Request], list[Slot]]:
        """``first`` (taken up in ``slot``) and the requests queued right behind it that
        its route's group handler takes with it: the same route, each another session,
        none refused from its head or waiting for a request under way (taken up here)."""
        queue, slots, active = self.queue, self.slots, self.active
        requests, group = [first], [slot]
        sessions = {first.session_id}
        while queue and len(slots) < MAX_PIPELINED:
            item = queue[0]
            if not isinstance(item, Request) or item.refusal is not None \
                    or item.route is not first.route or item.session_id in sessions:
                break
            if self.others and any(must_wait(item, other) for other in active):
                break  # a read of its session under way: it waits, and what follows it
            queue.popleft()
            sessions.add(item.session_id)
            taken = Slot(item, None)
            slots.append(taken)
            active.append(item)
            requests.append(item)
            group.append(taken)
        return requests, group

    async def _handle(self, slot: Slot) -> None:
        request = slot.request
        assert request is not None and request.route is not None
        if self.site.wrap is not None:
            response = await self.site.wrap(request, handled)
        else:  # the route's handler at once: handled's work, a coroutine fewer per request
            try:
                response = await request.route.handler(request)
            except Exception as exc:
                response = failure(request, exc)
        slot.response = response
        self.held += len(response.body)
        self._answered(request)

    async def _handle_group(self, requests: list[Request], group: list[Slot]) -> None:
        """Requests taken up together (:attr:`Route.group`), ``group`` their slots,
        each answered when its own answer comes: a slow one holds back only the
        answers after it."""
        route = requests[0].route
        assert route is not None and route.group is not None

        def answer(index: int, outcome: Response | Exception) -> None:
            slot = group[index]
            if slot.response is not None:
                return  # answered already
            request = requests[index]
            slot.response = outcome if isinstance(outcome, Response) \
                else failure(request, outcome)
            self.held += len(slot.response.body)
            self._answered(request)

        try:
            await route.group(requests, answer)
            missing: Exception = RuntimeError("the group handler left a request unanswered")
        except Exception as exc:
            missing = exc
        for index, slot in enumerate(group):
            if slot.response is None:
                answer(index, missing)

    def _answered(self, request: Request) -> None:
        """A request's answer is in its slot: send what is ready in order, and take up
        what waited for it."""
        self.active.remove(request)
        assert request.route is not None
        if request.route.access != WRITE:
            self.others -= 1
        if self.transport is None:
            return
        if len(self.slots) == 1:  # nothing else under way: answer now
            self._next()
        elif not self.flush_soon:
            # Others finish in this turn too (a batch of writes answered by one etcd
            # transaction): their answers leave together, in one write.
            self.flush_soon = True
            self.loop.call_soon(self._flush_then_next)

    def _flush_then_next(self) -> None:
        self.flush_soon = False
        if self.transport is not None:
            self._next()

    def _may_hold(self) -> bool:
        """Whether a refusal taken up now, with nothing queued behind it, may be held:
        no part of another request has come, and the connection goes on."""
        return self.state == IDLE and not self.closing and self.transport is not None \
            and not self.site.closing

    def _unhold(self) -> None:
        """The held refusal, if any, answered now (sent with what is ready)."""
        if self.holding is not None:
            self.held += len(self.holding.answer().body)
            self.holding = None

    def _hold_expired(self) -> None:
        self._unhold()
        if self.transport is not None:
            self._next()

    def _unsent(self) -> int:
        """Bytes of answers not sent yet: ready here, or in the transport's buffer."""
        transport = self.transport
        return self.held + (transport.get_write_buffer_size() if transport else 0)

    def _flush(self) -> None:
        """Write the answers ready at the head of the line, in one write each time, while
        the transport holds less than the answer budget: the rest wait, as they are,
        until it drains (``resume_writing``)."""
        slots, budget = self.slots, self.site.answer_budget
        while (transport := self.transport) is not None and slots \
                and slots[0].response is not None:
            buffered = transport.get_write_buffer_size()
            out = []
            while slots and slots[0].response is not None and buffered < budget:
                slot = slots.popleft()
                request, response = slot.request, slot.response
                assert response is not None
                last = self.closing and not slots and not self.queue
                self.held -= len(response.body)
                if request is None:
                    out.append(self._encode(response, keep_alive=False))
                else:
                    out.append(self._encode(response, keep_alive=not last,
                                            head_only=request.method == "HEAD",
                                            http10=request.version == "1.0"))
                buffered += len(out[-1])
            if not out:
                return  # the transport is full: it calls resume_writing once it drains
            transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _encode(self, response: Response, *, keep_alive: bool, head_only: bool = False,
                http10: bool = False) -> bytes:
        status = response.status
        body = response.body
        try:
            head = encode_head(response, self.site.date, keep_alive, http10)
        except ValueError as exc:  # a header that cannot be sent: never a broken answer
            log.error("answer %d not sent as it was: %s", status, exc)
            status, body = 500, b'{"error":"internal error: invalid response header",' \
                                b'"status":500}'
            head = encode_head(Response(500, body, [("Content-Type", JSON)]), self.site.date,
                         keep_alive, http10)
        if not keep_alive:
            self.closing = True
        return head + body if body and not head_only else head

    def _fail(self, response: Response) -> None:
        """A request that cannot be parsed or read on: answer it after those before it,
        then close; nothing more is parsed."""
        self.closing = True
        self.queue.append(response)
        if self.transport is not None and not self.paused_reading:
            self.paused_reading = True
            self.transport.pause_reading()

    def _close(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.state in (HEAD, BODY) and transport.can_write_eof():
            # The client is still sending: half-close, and read (dropping it) a while,
            # so it reads the answer instead of a reset.
            self.lingering = True
            self.deadline = self.loop.time() + LINGER
            if self.paused_reading:
                self.paused_reading = False
                transport.resume_reading()
            transport.write_eof()
            return
        transport.close()

    # -- the server's sweeper and shutdown ----------------------------------------------------

    def expire(self, now: float) -> None:
        """Past a deadline: a client that has not read its answers in time is cut off
        (what it did not read is dropped); an idle connection or a slow head closes; a
        slow body is answered 408 (then closed)."""
        transport = self.transport
        if transport is None:
            return
        if self.write_deadline and now >= self.write_deadline:
            self.site.hit("write_timeout")
            transport.abort()
            return
        if not self.deadline or now < self.deadline:
            return
        self.deadline = 0.0
        if self.lingering or self.state != BODY or self.slots or self.queue:
            if not self.lingering:
                self.site.hit("header_timeout" if self.state == HEAD else
                              "idle_timeout" if self.state == IDLE else "body_timeout")
            transport.close()
            return
        self.site.hit("body_timeout")
        self.closing = True
        self.state = IDLE
        transport.write(self._encode(error(408, f"request body did not arrive within "
                                                f"{self.site.body_timeout:g} s"),
                                     keep_alive=False))
        transport.close()

    def shutdown(self) -> None:
        self.closing = True
        if self.holding is not None:  # a held answer goes now: no drain waits for it
            self._unhold()
            self._next()
        elif not self.slots and not self.queue:
            self._close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
