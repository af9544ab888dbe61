"""What a write compares, and its conditions: ETags, If-Match, If-None-Match. Pure code.

Fencing is by revision, not by locks (etcd is the judge): every write to etcd compares
the session's mod_revision in the same transaction, and the revision it compares, with
why (its *mode*), is one of:

* :data:`IF_ABSENT` 0: create only (``If-None-Match: *``), 412 if the session exists;
* :data:`IF_EXISTS` the session's current revision, read from etcd (``If-Match: *``);
* :data:`IF_MATCH` the If-Match revision, 412 on a mismatch;
* :data:`OWNER` the revision this member last observed (its last read or write of the
  session): a member that lost the session to another one gets 409, however fresh its
  cache has become since;
* :data:`BLIND` the newest revision this member knows of a session it never touched (a
  takeover, or a new session): it takes ownership;
* :data:`REPLICATE` 0: a session kept only on this member (delayed sync) replicated to
  etcd. It creates the key and never replaces a record another member wrote while the
  copy was kept here (:func:`written_since`; this one paused, or slower): that record
  stands, and the copy here is given up (409, :class:`~.errors.Superseded`). Only
  this member's own record (an earlier replication whose answer was lost) and another
  member's older than the copy (the client moved here, where the session started
  afresh) are compared again and replaced.

A session kept only on this member (delayed sync) has the ETag ``L<n>``, its n-th
version here, and its conditions are checked against that. Once it is replicated (or
given up) the ETag names nothing any more: a write that still carries it gets 412, and
its client reads the session again (:func:`if_match_revision`).
"""

from __future__ import annotations

from meshxl.errors import InputError, PreconditionFailed, TooLarge
from meshxl.etcd.shards import split_etag

from .record import SessionRecord
from .writes import DELETE, PUT, Write

__all__ = ["BLIND", "BLIND_RETRIES", "IF_ABSENT", "IF_EXISTS", "IF_MATCH", "OWNER",
           "REPLICATE", "check_if_match", "check_size", "check_write", "if_match_revision",
           "known_expectation", "local_precondition", "parse_etag", "revision",
           "written_since"]

IF_ABSENT, IF_EXISTS, IF_MATCH, OWNER, BLIND, REPLICATE = (
    "if-absent", "if-exists", "if-match", "owner", "blind", "replicate")
BLIND_RETRIES = 3
"""Attempts of a write whose compare keeps failing only because the session moves under
it (each against the key as it is then) before it is refused as contended (409)."""


def parse_etag(value: str, *, strong: bool = True) -> str:
    """``"12"`` or ``12`` -> ``12``; ``*`` stays ``*``. A weak tag (``W/"12"``) never
    matches an If-Match, which compares strongly (RFC 9110 section 13.1.1): with
    ``strong`` it is :class:`PreconditionFailed` (412), without (a syntax check only)
    its tag."""
    text = value.strip()
    if text == "*":
        return text
    if text.startswith("W/"):
        if strong:
            raise PreconditionFailed(f"If-Match {value.strip()[:80]} is a weak ETag: it "
                                     "never matches (If-Match compares strongly, RFC 9110 "
                                     "section 13.1.1)")
        text = text[2:]
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    if not text or "," in text or '"' in text:
        raise InputError(f"If-Match must be one ETag such as \"42\", got {value[:80]!r}",
                         field="If-Match")
    return text


def revision(tag: str) -> int:
    """An If-Match tag's etcd revision (InputError for anything else)."""
    try:
        number = int(tag)
    except ValueError:
        raise InputError(f"If-Match must carry an etcd revision such as \"42\", got "
                         f"{tag[:80]!r}") from None
    if number <= 0:
        raise InputError(f"If-Match revision must be positive, got {tag[:40]}")
    if number >= 1 << 63:  # etcd revisions are int64: compared, it would not encode
        raise InputError(f"If-Match revision {tag[:40]} is beyond etcd's revisions")
    return number


def _local_tag(tag: str) -> bool:
    """``L<n>``: the ETag of a session kept on this member only."""
    return tag[:1] == "L" and tag[1:].isdigit()


def check_if_match(value: str) -> str:
    """An If-Match value's tag, checked (InputError): ``*``, an etcd revision (with its
    shard, ``s1:42``, when sessions are sharded), or ``L<n>`` (a session kept on this
    member only)."""
    tag = parse_etag(value, strong=False)
    if tag != "*" and not _local_tag(tag):
        revision(split_etag(tag)[1])
    return tag


def if_match_revision(write: Write, tag: str) -> int:
    """The etcd revision an If-Match ``tag`` (not ``*``) names. An ``L<n>`` tag named a
    copy kept on this member only, and the write found none: the session was replicated
    since (its delay over, the periodic flush, a planned move) or given up, so its ETag
    is etcd's now and the tag names nothing (412: read it again). Not a 400: the tag
    was the session's a moment ago."""
    if _local_tag(tag):
        raise PreconditionFailed(f"session {write.session_id!r} is no longer kept on this "
                                 f"member only (If-Match {tag} named that copy; it was "
                                 "replicated or given up since): read it again for its ETag")
    return revision(tag)


def check_size(data: bytes, limit: int) -> None:
    if len(data) > limit:
        raise TooLarge(f"session state is {len(data)} bytes; the limit is {limit}",
                       limit=limit)


def check_write(write: Write, max_bytes: int) -> None:
    """What a write must be before it waits for anything: a put's state within the
    limit, If-Match or If-None-Match but not both, create-only for a put only."""
    if write.op == PUT and len(write.data) > max_bytes:
        check_size(write.data, max_bytes)
    if write.ttl is not None and not write.sync_now:
        raise InputError("a write with a TTL of its own is written through (sync_now)")
    if write.create_only:
        if write.if_match is not None:
            raise InputError("send If-Match or If-None-Match, not both")
        if write.op != PUT:
            raise InputError("create-only applies to a put without If-Match")


def known_expectation(write: Write, observed: int | None,
                      cached: int) -> tuple[str, int] | None:
    """The mode and revision a write compares when it needs no etcd read (most writes),
    else None: a delete, ``If-Match: *``. ``observed``: the revision this member last
    observed of the session; ``cached``: its cache's."""
    if write.op == DELETE:
        return None
    if write.create_only:
        return IF_ABSENT, 0
    if write.if_match is not None:
        tag = parse_etag(write.if_match)
        return None if tag == "*" else (IF_MATCH, if_match_revision(write, tag))
    if observed is not None:
        return OWNER, observed
    return BLIND, cached


def local_precondition(write: Write, version: int | None) -> None:
    """If-Match and create-only against a session kept only here at ``version``
    (``L<n>``; None: not kept here, a new session)."""
    current = f"L{version}" if version is not None else None
    if write.create_only and current is not None:
        raise PreconditionFailed(f"session {write.session_id!r} exists ({current})")
    if write.if_match is not None:
        tag = parse_etag(write.if_match)
        if not (tag == "*" and current is not None) and tag != current:
            raise PreconditionFailed(f"session {write.session_id!r} is at "
                                     f"{current or 'nothing'}, not {write.if_match}")


def written_since(record: SessionRecord, kept: SessionRecord | None) -> bool:
    """Whether another member's ``record`` of a session was written while ``kept``, this
    member's copy, existed: its last write (``updated``) not before the copy was created
    (``created``), by the two writers' clocks; without a copy, always. Such a record
    is never replaced by the copy. One written before holds a state this member's
    client had left behind (the session moved here, where etcd had nothing, and started
    afresh), which the copy replaces. Clocks that disagree decide wrongly only for
    writes closer together than their difference: a clock behind keeps the record (the
    copy is given up), one ahead replaces a record written that little after the copy
    was created."""
    return kept is None or record.updated >= kept.created
