"""etcd's ``Txn`` request for the session store's hot path, in protobuf's wire format.

Every session write is one guarded put or delete (``if mod_revision(key) == mod_revision:
put (delete), else read the key``), nested in the batch's transaction. Built as upb
messages, an op cost several times more Python (the nested dicts converted field by
field) and the batch request copied every op again; written here as bytes, the batch is
their concatenation (docs/performance.md, "What was measured to help"). The varint is
:mod:`meshxl.protowire`'s. Pure code: ``tests/unit/test_statesync_wire.py`` checks every
encoding against etcd's own generated messages (same bytes, same parse).

Field numbers (etcd's ``rpc.proto``): ``RequestOp`` request_range 1, request_put 2,
request_delete_range 3, request_txn 4; ``TxnRequest`` compare 1, success 2, failure 3;
``Compare`` result 1 (EQUAL 0), target 2 (MOD 2, VALUE 3), key 3, mod_revision 6,
value 7; ``PutRequest``
key 1, value 2, lease 3; ``RangeRequest`` and ``DeleteRangeRequest`` key 1. Zero values
are left out, as proto3 does, but for a oneof member (``mod_revision``), which is
written whatever its value.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from meshxl.etcd.shards import fence_value
from meshxl.protowire import varint

__all__ = ["INT64_MAX", "fence_parts", "guarded_delete", "guarded_put", "txn_request"]

INT64_MAX = (1 << 63) - 1
"""The highest revision, lease id or count etcd's int64 fields hold."""


@functools.lru_cache(maxsize=256)
def _lease_field(lease: int) -> bytes:
    """``PutRequest.lease`` (a session lease is shared by every write of its TTL bucket:
    encoded once)."""
    return b"\x18" + varint(lease) if lease else b""


@functools.lru_cache(maxsize=1024)
def _key_parts(key: bytes) -> tuple[bytes, bytes, bytes]:
    """What a guarded put of ``key`` holds whatever it writes: the key's field
    (PutRequest/RangeRequest.key), the compare up to its revision, the failure branch
    (a session is written many times: built once while it is written). For the
    sessions written now: at 8,192 entries it held about 3.9 MiB (the keys with their
    parts) once that many sessions had been written, for no gain over 1,024 (the
    sessions a member writes at once are far fewer)."""
    key_field = b"\x0a" + varint(len(key)) + key
    # Compare: target MOD, key, mod_revision (a oneof member: written even when 0).
    compare = b"\x10\x02\x1a" + key_field[1:] + b"\x30"
    failure = (b"\x1a" + varint(len(key_field) + 2) + b"\x0a" + varint(len(key_field))
               + key_field)
    return key_field, compare, failure


def guarded_put(key: bytes, value: bytes, mod_revision: int, lease: int) -> bytes:
    """A serialized ``RequestOp``: a transaction putting ``value`` at ``key`` (with
    ``lease``; 0: none) if the key's mod_revision is ``mod_revision`` (0: absent), else
    reading the key. Lengths are computed first, so the value is copied once: this runs
    for every session written."""
    if not (0 <= mod_revision <= INT64_MAX and 0 <= lease <= INT64_MAX):
        raise ValueError(f"revision {mod_revision} or lease {lease} out of etcd's range")
    v = varint
    key_field, compare, failure = _key_parts(key)
    compare += v(mod_revision)
    value_head = b"\x12" + v(len(value)) if value else b""
    lease_field = _lease_field(lease)
    put_size = len(key_field) + len(value_head) + len(value) + len(lease_field)
    put_head = b"\x12" + v(put_size)                              # RequestOp.request_put
    success_head = b"\x12" + v(len(put_head) + put_size)          # TxnRequest.success
    compare_head = b"\x0a" + v(len(compare))                      # TxnRequest.compare
    txn_size = (len(compare_head) + len(compare) + len(success_head) + len(put_head)
                + put_size + len(failure))
    return b"".join((b"\x22", v(txn_size), compare_head, compare, success_head, put_head,
                     key_field, value_head, value, lease_field, failure))


def guarded_delete(key: bytes, mod_revision: int) -> bytes:
    """A serialized ``RequestOp``: a transaction deleting ``key`` if its mod_revision is
    ``mod_revision``, else reading the key."""
    if not 0 <= mod_revision <= INT64_MAX:
        raise ValueError(f"revision {mod_revision} out of etcd's range")
    v = varint
    key_field, compare, failure = _key_parts(key)
    compare += v(mod_revision)
    delete = b"\x1a" + v(len(key_field)) + key_field              # RequestOp.request_delete_range
    success = b"\x12" + v(len(delete)) + delete                   # TxnRequest.success
    compare_head = b"\x0a" + v(len(compare))                      # TxnRequest.compare
    txn_size = len(compare_head) + len(compare) + len(success) + len(failure)
    return b"".join((b"\x22", v(txn_size), compare_head, compare, success, failure))


@functools.lru_cache(maxsize=64)
def fence_parts(key: bytes, version: int) -> tuple[bytes, bytes]:
    """A batch's fence (:mod:`meshxl.etcd.fence`): ``TxnRequest.compare`` ``value(key)
    == fence_value(version)`` (target VALUE 3, key 3, value 7; EQUAL is 0, left out)
    and ``TxnRequest.failure`` reading the key, each a whole field."""
    value = fence_value(version)
    compare = (b"\x10\x03\x1a" + varint(len(key)) + key + b"\x3a" + varint(len(value))
               + value)
    read = b"\x0a" + varint(len(key)) + key                    # RangeRequest.key
    op = b"\x0a" + varint(len(read)) + read                    # RequestOp.request_range
    return (b"\x0a" + varint(len(compare)) + compare, b"\x1a" + varint(len(op)) + op)


def txn_request(ops: Iterable[bytes], fence: tuple[bytes, bytes] | None = None) -> bytes:
    """A serialized ``TxnRequest`` whose success branch is ``ops`` (serialized
    ``RequestOp`` messages): what a batch sends; with ``fence`` (:func:`fence_parts`)
    it applies only while the shard's fence is that version, and otherwise reads it."""
    body = b"".join([b"\x12" + varint(len(op)) + op for op in ops])
    return body if fence is None else fence[0] + body + fence[1]
