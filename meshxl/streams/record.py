"""A stream's record: what a member needs to take a stream over, as the sidecar stores
it (a session's state: JSON text, of the media type :data:`RECORD_TYPE`). Pure code.

One record per stream, at the session id ``~stream.<token>`` (:func:`record_id`), written
only with ``If-Match`` (the revision its writer last saw) and ``X-Meshxl-Sync: now``
(committed in etcd before it is acknowledged, whatever the cluster's delayed sync): a
writer whose record another wrote since (a member that took the stream over) is refused
(412) and stops. It lives as long as a session does: the cluster's session TTL after
its last write.

Its fields: the session it belongs to, the transport kind, its *epoch* (raised by every
member or process that takes the stream over), the client messages the handler has
consumed (``in``), the last server message (``out``), the highest the client
acknowledged (``acked``), whether the handler finished (``done``, with the refusal it
ended with, if any), the handler's state (a JSON value), and the journal: the server
messages ``acked + 1 .. out``, in order, each a JSON value or bytes (base64).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .protocol import Payload, compact_json, json_text, refusal_named

__all__ = ["KINDS", "RECORD_PREFIX", "RECORD_TYPE", "StateText", "StreamRecord",
           "record_id"]

RECORD_TYPE = "application/vnd.meshxl.stream-record"
"""The records' media type: their JSON text, which the sidecar stores as the bytes it is.
Under a JSON type it would parse and check every record it commits, about a third of
its work per stream message (``bench/streams.py``, docs/streams.md); a record is only
ever read back by :meth:`StreamRecord.decode`, which checks it whole."""
RECORD_PREFIX = "~stream."
"""Session ids of stream records: ``~stream.`` and the stream's token."""
KINDS = ("websocket", "sse", "grpc")
_VERSION = 1
_MAX_SEQ = (1 << 53) - 1


def record_id(token: str) -> str:
    return RECORD_PREFIX + token


class StateText:
    """A handler's state as committed: its compact JSON text, made once at the
    checkpoint (a copy the handler cannot change afterwards, written into the record as
    it is). Equal only to another of the same text: a live stream compares the state it
    would commit with the one it committed."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StateText) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"StateText({self.text[:60]!r})"


@dataclass(slots=True)
class StreamRecord:
    session: str
    kind: str
    epoch: int = 1
    consumed: int = 0
    """``in``: client messages the handler has consumed."""
    out: int = 0
    acked: int = 0
    done: bool = False
    failure: str | None = None
    """The refusal's name a finished stream ended with (None: it ended well)."""
    state: Any = None
    """A JSON value (a record read back), or :class:`StateText` (a live stream's)."""
    created: float = 0.0
    journal: list[tuple[int, Payload]] = field(default_factory=list)
    """Server messages ``acked + 1 .. out`` in order: ``(seq, payload)``."""
    fragments: dict[int, str] = field(default_factory=dict, compare=False, repr=False)
    """Each journal entry's JSON text by its seq, made once. A stream's record is written
    again with every message until the client acknowledges them, journal and all: made
    anew each time (base64 and JSON of every unacknowledged message), the journal cost a
    gRPC stream's app about a tenth of its CPU at 1,000 streams (``bench/streams.py``),
    more as the journal grew. The records of one stream share it (a seq's message never
    changes); a missing entry is only made again."""

    texts: dict[int, str] = field(default_factory=dict, compare=False, repr=False)
    """Each JSON journal entry's message text (:func:`~.protocol.json_text`) by its seq,
    made once when it was sent (the limits counted it, the transport sends it as it is);
    shared as :attr:`fragments` is."""

    def encode(self) -> bytes:
        """The record's JSON text: its fields, the state, then the journal (last, each
        entry's text from :attr:`fragments`)."""
        made, texts = self.fragments, self.texts
        entries = []
        for seq, p in self.journal:
            entry = made.get(seq)
            if entry is None:
                # base64's alphabet needs no JSON escape; seq is an int
                if isinstance(p, bytes | bytearray | memoryview):
                    entry = f'[{seq},"b","{base64.b64encode(p).decode("ascii")}"]'
                else:
                    text = texts.get(seq)
                    if text is None:
                        text = texts[seq] = json_text(p)
                    entry = f'[{seq},"j",{text}]'
                made[seq] = entry
            entries.append(entry)
        state = self.state
        state = state.text if isinstance(state, StateText) else \
            "null" if state is None else compact_json(state)
        return (f'{{"v":{_VERSION},"session":{compact_json(self.session)},'
                f'"kind":{compact_json(self.kind)},"epoch":{self.epoch},'
                f'"in":{self.consumed},"out":{self.out},"acked":{self.acked},'
                f'"done":{"true" if self.done else "false"},'
                f'"failure":{"null" if self.failure is None else compact_json(self.failure)},'
                f'"state":{state},"created":{float(self.created)!r},'
                f'"journal":[{",".join(entries)}]}}').encode()

    @classmethod
    def decode(cls, raw: bytes | str | Any) -> StreamRecord:
        """A record from its stored form (its JSON text, or the value the session client
        read); ValueError naming what is wrong for anything else."""
        if isinstance(raw, bytes | str):
            try:
                doc = json.loads(raw)
            except (ValueError, RecursionError) as exc:
                raise ValueError(f"a stream record that is not JSON: {exc}") from None
        else:
            doc = raw
        if not isinstance(doc, dict) or doc.get("v") != _VERSION:
            raise ValueError(f"not a stream record of version {_VERSION}")
        session, kind = doc.get("session"), doc.get("kind")
        if not isinstance(session, str) or not session:
            raise ValueError("a stream record names its session")
        if kind not in KINDS:
            raise ValueError(f"a stream record's kind is one of {KINDS}, not {kind!r:.40}")
        numbers = {name: doc.get(name) for name in ("epoch", "in", "out", "acked")}
        for name, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not 0 <= value <= _MAX_SEQ:
                raise ValueError(f"a stream record's {name} is a count, not {value!r:.40}")
        created = doc.get("created")
        if isinstance(created, bool) or not isinstance(created, int | float) \
                or not math.isfinite(created):
            raise ValueError("a stream record's created is a time")
        done, failure = doc.get("done"), doc.get("failure")
        if not isinstance(done, bool) or (failure is not None
                                          and refusal_named(str(failure)) is None):
            raise ValueError("a stream record's done is a bool, its failure a refusal name")
        acked, out = numbers["acked"], numbers["out"]
        assert isinstance(acked, int) and isinstance(out, int)
        if acked > out:
            raise ValueError(f"a stream record acknowledged {acked} of {out} messages")
        journal = _journal(doc.get("journal"), acked, out)
        record = cls(session=session, kind=kind, epoch=int(numbers["epoch"] or 0),
                     consumed=int(numbers["in"] or 0), out=out, acked=acked, done=done,
                     failure=failure, state=doc.get("state"), created=float(created),
                     journal=journal)
        return record

    def acknowledge(self, seq: int) -> None:
        """The client received every message up to ``seq``: those leave the journal."""
        seq = min(seq, self.out)
        if seq > self.acked:
            self.journal = [(s, p) for s, p in self.journal if s > seq]
            for gone in range(self.acked + 1, seq + 1):
                self.fragments.pop(gone, None)
                self.texts.pop(gone, None)
            self.acked = seq

    def after(self, recv: int) -> list[tuple[int, Payload]]:
        """The messages a client that received up to ``recv`` has not."""
        return [(s, p) for s, p in self.journal if s > recv]


def _journal(entries: object, acked: int, out: int) -> list[tuple[int, Payload]]:
    if not isinstance(entries, list) or len(entries) != out - acked:
        raise ValueError(f"a stream record's journal holds messages {acked + 1} to {out}")
    journal: list[tuple[int, Payload]] = []
    for expected, entry in enumerate(entries, start=acked + 1):
        if not isinstance(entry, list) or len(entry) != 3 or entry[0] != expected \
                or entry[1] not in ("j", "b"):
            raise ValueError(f"a stream record's journal entry {expected} is "
                             "[seq, \"j\" or \"b\", payload]")
        payload = entry[2]
        if entry[1] == "b":
            if not isinstance(payload, str):
                raise ValueError(f"journal entry {expected}: bytes travel as base64")
            try:
                payload = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"journal entry {expected}: not base64") from None
        journal.append((expected, payload))
    return journal
