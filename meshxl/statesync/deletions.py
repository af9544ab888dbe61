"""The record a delete through the API leaves in etcd: who deleted which version, when.

Put in the delete's own transaction, at ``Keys.deletion(cluster, session, revision)``
(the version deleted; a version is deleted once, so the key is new: its compare expects
it absent), with the session lease of its time bucket: it lives as long as the session
could have. A session gone from etcd without such a record was not deleted through the
API: it expired, or something else removed it (``etcdctl del``, a restore from an older
backup), which the drill's data check tells apart (``meshxl.operator.consistency``).
The value is a small JSON document, ``{"member": "a", "at": 1764000000.5}``. Pure code.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

__all__ = ["MAX_RECORD", "DeletionRecord"]

MAX_RECORD = 1024
"""Bytes a stored record may take to be read (a member name and a number)."""


@dataclass(frozen=True, slots=True)
class DeletionRecord:
    member: str
    """The member whose sidecar deleted the session."""
    at: float
    """When (its wall clock, seconds since the epoch)."""

    def encode(self) -> bytes:
        """ValueError for a record :meth:`decode` would refuse (a member's name is at
        most 63 characters, far below the bound: see ``NAME_PATTERN``)."""
        raw = json.dumps({"member": self.member, "at": self.at}, separators=(",", ":"),
                         ensure_ascii=True).encode()
        if len(raw) > MAX_RECORD:
            raise ValueError(f"a deletion record of {len(raw)} bytes (at most {MAX_RECORD})")
        return raw

    @classmethod
    def decode(cls, raw: bytes) -> DeletionRecord:
        """ValueError for anything that is not such a record."""
        if len(raw) > MAX_RECORD:
            raise ValueError(f"a deletion record of {len(raw)} bytes (at most {MAX_RECORD})")
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a deletion record: {exc}") from None
        if not isinstance(doc, dict):
            raise ValueError("not a deletion record: not a JSON object")
        member, at = doc.get("member"), doc.get("at")
        if not isinstance(member, str) or isinstance(at, bool) \
                or not isinstance(at, int | float) or not math.isfinite(at):
            raise ValueError("not a deletion record: member (text) and at (a number) wanted")
        return cls(member, float(at))
