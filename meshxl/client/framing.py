"""HTTP/1.1 on one connection, without I/O: the requests' bytes and the answers parsed
from whatever pieces they arrive in. Both clients' transports use it (the async
pool's connections, :mod:`.connection`; the blocking client's sockets, :mod:`.sync`),
so they frame answers alike; ``tests/unit/test_client_framing.py`` checks it against
h11 (the reference implementation of RFC 9112 framing) with generated inputs.

:class:`AnswerReader` parses the answers to the requests sent on a connection as
their bytes arrive (httptools, llhttp), and hands each complete one over, in order:

* bodies framed by ``Content-Length`` or chunked; an answer framed by neither (its
  body would end at the close, where a cut could not be told from its end) is refused,
  as are bytes nobody asked for and a close in the middle of an answer;
* interim answers (1xx) skipped, at most :data:`MAX_INTERIM` before an answer;
* at most :data:`MAX_HEAD` bytes of head and :data:`MAX_ANSWER` of body per answer,
  counted per answer whatever the reads: one read may hold the end of one answer, a
  dozen more and the start of the next.

A reader that raised :class:`Broken` is done: its connection is dropped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping

import httptools

from meshxl import errors
from meshxl.headers import LOWERED, lower_name

from .errors import BadRequest, describe
from .plans import Answer

__all__ = ["HEAD_SLICE", "MAX_ANSWER", "MAX_HEAD", "MAX_INTERIM", "AnswerReader", "Broken",
           "RequestWriter"]

MAX_ANSWER = 64 * 1024 * 1024
"""Bytes of an answer's body at most: a broken peer cannot exhaust the memory."""
MAX_HEAD = 64 * 1024
"""Bytes of an answer's status line and headers (and of a chunked body's trailers) at
most."""
MAX_INTERIM = 16
"""Interim (1xx) answers before an answer at most: a peer cannot keep a request busy
with them (the deadline bounds the time, this the work)."""

HEAD_SLICE = 16 * 1024
"""Bytes given to the parser at once while it may be in an answer's head: the head of
an answer that starts within such a slice is counted from the slice's start, so a head
within MAX_HEAD is always taken and the parser never holds MAX_HEAD + HEAD_SLICE bytes
of one."""
_NO_BODY_STATUSES = (204, 304)
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
"""Methods sent without ``Content-Length`` when they carry no body (RFC 9110 8.6)."""
FRAMING = frozenset({"host", "content-length", "transfer-encoding", "connection"})
"""Headers the transport writes itself: a caller's would break the framing."""


class Broken(errors.Unavailable):
    """The answers on a connection cannot be read (any more); the text says why. The
    clients never raise it: it becomes an unanswered request (then ``Unreachable``)."""


class AnswerReader:
    """The answers to the requests sent on one connection, parsed as bytes arrive.

    :meth:`expect` is called for each request as it is sent (in order), :meth:`feed`
    with each read, :meth:`eof` when the peer closes; ``deliver`` gets each answer,
    in order. ``keep`` turns False after an answer that ends the connection (HTTP/1.0,
    ``Connection: close``, an answer to HEAD, whose end the parser cannot tell)."""

    __slots__ = ("_begun", "_body", "_closing", "_deliver", "_error", "_expected",
                 "_head", "_headers", "_headers_done", "_in_message", "_interim",
                 "_max_body", "_max_head", "_max_interim", "_parser", "_remaining",
                 "_size", "_skip", "_trailers", "keep", "started")

    def __init__(self, deliver: Callable[[Answer], None], *, max_head: int = MAX_HEAD,
                 max_body: int = MAX_ANSWER, max_interim: int = MAX_INTERIM) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._deliver = deliver
        self._max_head, self._max_body = max_head, max_body
        self._max_interim = self._interim = max_interim
        self._expected: deque[bool] = deque()  # per request awaiting its answer: HEAD?
        self.keep = True
        self.started = False
        """Bytes of the oldest awaited answer came."""
        self._closing = False  # an answer ended the connection: nothing may follow
        self._in_message = False
        self._headers_done = False
        self._begun = 0
        self._head = 0
        self._trailers = 0
        self._remaining: int | None = None  # body bytes to come, by Content-Length
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._skip = False
        self._error = ""

    @property
    def waiting(self) -> int:
        """Answers expected and not complete yet."""
        return len(self._expected)

    def expect(self, head_only: bool = False) -> None:
        """A request was sent: its answer comes after those expected before it."""
        self._expected.append(head_only)

    def feed(self, data: bytes) -> None:
        """Parse one read; :class:`Broken` when the answers cannot be read."""
        end = len(data)
        if not end:
            return
        if not self._expected:
            raise Broken("the sidecar sent bytes nobody asked for")
        view, pos = memoryview(data), 0
        parser = self._parser
        try:
            while pos < end:
                remaining = self._remaining
                if self._headers_done and remaining:
                    size = min(remaining, end - pos)  # exactly this body's rest
                elif self._in_message and not self._headers_done:
                    # In a head: never more than its allowance, so the parser never holds
                    # more than the bound of one head.
                    size = min(HEAD_SLICE, end - pos, self._max_head + HEAD_SLICE - self._head)
                else:
                    size = min(HEAD_SLICE, end - pos)
                begun = self._begun
                parser.feed_data(view[pos:pos + size])
                pos += size
                if self._in_message and not self._headers_done:
                    self._head = size if self._begun != begun else self._head + size
                    if self._head >= self._max_head + HEAD_SLICE:
                        raise Broken(f"the answer's head is larger than {self._max_head} "
                                     "bytes")
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if not self._error and self._closing:  # llhttp's own "Data after close"
                self._error = "the sidecar sent more after an answer that closed the connection"
            raise Broken(self._error or _parser_error(exc)) from None

    def eof(self) -> None:
        """The peer closed: :class:`Broken` if an answer was partly received."""
        if self._in_message:
            raise Broken("the sidecar closed the connection before its answer was complete")

    def _fail(self, reason: str) -> None:
        self._error = reason
        raise Broken(reason)

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._closing or not self._expected:
            self._fail("the sidecar sent more after an answer that closed the connection"
                       if self._closing else "the sidecar sent an answer nobody asked for")
        self.started = self._in_message = True
        self._headers_done = False
        self._begun += 1
        self._headers, self._body, self._size, self._remaining = {}, [], 0, None

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headers_done:  # a trailer field of a chunked body: not a header
            self._trailers += len(name) + len(value) + 4
            if self._trailers > self._max_head:
                self._fail(f"the answer's trailers are larger than {self._max_head} bytes")
            return
        # A name seen before found here, lower_name called only for a new one.
        self._headers[LOWERED.get(name) or lower_name(name)] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._headers_done = True
        status = self._parser.get_status_code()
        if status < 200:
            return  # interim: no body, the answer follows
        if self._expected[0]:
            # An answer to HEAD has no body whatever its Content-Length says; the parser
            # cannot be told so: it is given now, and the connection ends with it.
            self._skip, self._closing, self.keep = True, True, False
            self._give(Answer(status, self._headers, b""))
            return
        headers = self._headers
        length = headers.get("content-length")
        if "transfer-encoding" not in headers:
            if length is None and status not in _NO_BODY_STATUSES:
                self._fail("the answer says neither Content-Length nor chunked Transfer-"
                           "Encoding: its end, and so a cut, could not be told")
            if length is not None and status not in _NO_BODY_STATUSES:
                self._remaining = int(length)  # llhttp checked it is one number
                if self._remaining > self._max_body:
                    self._fail(f"the answer is larger than {self._max_body} bytes "
                               f"(Content-Length: {length})")

    def on_body(self, body: bytes) -> None:
        if self._skip:
            return
        self._size += len(body)
        if self._size > self._max_body:
            self._fail(f"the answer is larger than {self._max_body} bytes")
        if self._remaining is not None:
            self._remaining -= len(body)
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_message = self._headers_done = False
        self._head = self._trailers = 0
        status = self._parser.get_status_code()
        if status < 200:
            self._interim -= 1
            if self._interim < 0:
                self._fail(f"more than {self._max_interim} interim (1xx) answers before "
                           "the answer")
            return
        if self._skip:  # the end of a HEAD answer, already given
            self._skip = False
            return
        parser = self._parser
        if not (parser.should_keep_alive() and parser.get_http_version() == "1.1"):
            self.keep, self._closing = False, True
        self._give(Answer(status, self._headers, b"".join(self._body)))

    def _give(self, answer: Answer) -> None:
        self._expected.popleft()
        self._interim = self._max_interim
        self.started = False
        self._deliver(answer)


def _parser_error(exc: Exception) -> str:
    if isinstance(exc, httptools.HttpParserUpgrade):
        return "the sidecar switched protocols (101): not an answer of its API"
    return describe(exc)


class RequestWriter:
    """A request's bytes: the origin's headers (``Host``, checked once) and the
    request's own, refusing what would break the framing (a line break, a framing
    header a caller gave)."""

    __slots__ = ("_base", "_fixed", "_taken")

    def __init__(self, headers: Mapping[str, str]) -> None:
        self._base = dict(headers)
        self._fixed = _lines(self._base)
        self._taken = FRAMING | {name.lower() for name in self._base}

    def encode(self, method: str, target: str, headers: Mapping[str, str],
               body: bytes | None) -> bytes:
        fixed, extra, taken = self._fixed, "", self._taken
        for name, value in headers.items():
            if name.lower() in taken or ":" in name or not (
                    name.isprintable() and value.isprintable()):
                fixed, extra = self._merged(headers)
                break
            extra += f"{name}: {value}\r\n"
        if not (method.isalpha() and target.startswith("/") and target.isprintable()) \
                or " " in target:
            raise BadRequest(f"cannot send {method[:20]!r} {target[:80]!r}: a method and "
                             "a path without spaces or control characters")
        size = len(body) if body is not None else 0
        length = f"Content-Length: {size}\r\n" if size or method not in _NO_BODY_METHODS \
            else ""
        try:
            head = f"{method} {target} HTTP/1.1\r\n{fixed}{extra}{length}\r\n".encode("latin-1")
        except UnicodeEncodeError as exc:
            raise BadRequest(f"a request header is not ISO-8859-1 text: {exc}") from None
        return head + body if body else head

    def _merged(self, headers: Mapping[str, str]) -> tuple[str, str]:
        """The header lines when a request's headers are not plain: a request's own
        ``User-Agent`` or ``Authorization`` replaces the client's, framing headers are
        the transport's alone, a line break is refused."""
        own = {name.lower() for name in headers}
        if FRAMING & own:
            raise BadRequest(f"the transport writes {', '.join(sorted(FRAMING & own))} "
                             "itself")
        base = {k: v for k, v in self._base.items() if k.lower() not in own}
        return _lines(base), _lines(headers)


def _lines(headers: Mapping[str, str]) -> str:
    """Header lines, refusing what would end a line early (header injection)."""
    lines = []
    for name, value in headers.items():
        if not (name.isprintable() and value.isprintable()) or ":" in name:
            raise BadRequest(f"header {name[:40]!r}: {value[:80]!r} holds a line break or "
                             "control character", field=name[:40])
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines)
