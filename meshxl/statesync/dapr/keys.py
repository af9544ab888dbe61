"""Dapr's state keys as meshxl's session ids, and back. Pure code.

Dapr stores a key under a prefix its store component chooses (``keyPrefix``): by
default the application's id, ``appid||key``. meshxl does the same and keeps Dapr's
layout: the session id of a Dapr key is ``PREFIX||KEY``, the key's characters outside
the session-id alphabet (``A-Z a-z 0-9 . _ ~ - : { }``) percent-encoded, ``|`` and ``%``
among them, so ``||`` only ever separates the prefix. Such an id has ``|``, which no id
of meshxl's own API may have: a Dapr key never names a native session by accident.

With ``keyPrefix: none`` the session id is the encoded key alone: a key written in the
session-id alphabet *is* that session (Dapr's ``cart-1`` is meshxl's ``cart-1``), the
documented way to share sessions between a Dapr application and meshxl's own API; a key
with other characters (``a b``, ``a/b``) encodes to an id with ``%``, which no native id
has, so it meets none. Keys that hold ``||`` are refused, as Dapr refuses them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meshxl.errors import InputError
from meshxl.statesync.record import MAX_STORED_ID, storable_session_id

__all__ = ["MAX_KEY_BYTES", "PREFIX_STRATEGIES", "SEPARATOR", "KeyMapping", "KeyRefused",
           "decode_key", "encode_key"]

SEPARATOR = "||"
PREFIX_STRATEGIES = ("appid", "name", "none")
"""Dapr's own ``keyPrefix`` values; any other value is a literal prefix."""
MAX_KEY_BYTES = 512
"""A Dapr key's UTF-8 bytes at most (encoded, its session id stays within the
engine's :data:`~meshxl.statesync.record.MAX_STORED_ID`)."""
_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~-:{}")
_ESCAPE = [chr(b) if b in _PLAIN else f"%{b:02X}" for b in range(256)]
_PLAIN_KEY = re.compile(r"[A-Za-z0-9._~:{}-]*")
"""A key of :data:`_PLAIN` characters only (one match, not a test per character)."""
_ENCODED = re.compile(r"%([0-9A-F]{2})")
PREFIX = re.compile(r"^[A-Za-z0-9._~:{}-]{1,128}$")
"""What a literal prefix (and an application id used as one) may be."""


class KeyRefused(InputError):
    """A key Dapr's API cannot store (empty, with ``||``, too long)."""


def encode_key(key: str) -> str:
    """The key's session-id form: every byte of its UTF-8 outside the alphabet as
    ``%XX``; ``.`` and ``..`` (not an id) encoded too."""
    if key in (".", ".."):
        return key.replace(".", "%2E")
    if _PLAIN_KEY.fullmatch(key):
        return key
    return "".join(_ESCAPE[b] for b in key.encode("utf-8", "surrogatepass"))


def decode_key(encoded: str) -> str:
    """The key :func:`encode_key` encoded."""
    if "%" not in encoded:
        return encoded
    raw = _ENCODED.sub(lambda m: chr(int(m.group(1), 16)), encoded)
    return raw.encode("latin-1").decode("utf-8", "surrogatepass")


@dataclass(frozen=True)
class KeyMapping:
    """One store's keys: ``prefix`` before ``||`` (None: ``keyPrefix: none``)."""

    prefix: str | None

    def session_id(self, key: str) -> str:
        """The session id of Dapr key ``key`` (:class:`KeyRefused` for what Dapr refuses
        or what cannot be stored)."""
        if not key:
            raise KeyRefused("the key is empty")
        if SEPARATOR in key:
            raise KeyRefused(f"input key/keyPrefix {key[:80]!r} can't contain {SEPARATOR!r}")
        if len(key) > MAX_KEY_BYTES or len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
            raise KeyRefused(f"the key is longer than {MAX_KEY_BYTES} bytes of UTF-8")
        encoded = encode_key(key)
        session_id = encoded if self.prefix is None else self.prefix + SEPARATOR + encoded
        if len(session_id) > MAX_STORED_ID or not storable_session_id(session_id):
            raise KeyRefused(f"the key {key[:80]!r} cannot be stored")
        return session_id

    def key(self, session_id: str) -> str | None:
        """The Dapr key of a session id of this store, None for a session that is not
        one (another prefix's, or a native session under a prefix)."""
        if self.prefix is None:
            return None if SEPARATOR in session_id else decode_key(session_id)
        head, sep, encoded = session_id.partition(SEPARATOR)
        return decode_key(encoded) if sep and head == self.prefix else None
