"""HPACK decoding (RFC 7541) for the etcd client's answers (``meshxl.etcd.h2conn``). Pure.

python-hyper's ``hpack`` decodes with a Huffman state table of 4,096 entries, 0.7 MiB
of a process's memory once imported: the idle sidecar, which decodes etcd's answers with
its first connection, went past its 45 MiB (``bench/sidecar_memory.py``). The code here
keeps the 257 code lengths only (HPACK's code is canonical: RFC 7541 Appendix B is
rebuilt from them) and decodes bit by bit, which suits blocks that are few and short:
etcd answers a connection's calls with the same few fields, indexed after the first
(``meshxl.etcd.h2conn`` keeps the blocks it decoded). ``tests/unit/test_hpackin.py``
decodes what ``hpack``'s encoder writes, checked against ``hpack``'s decoder.
"""

from __future__ import annotations

import collections

from meshxl.errors import InputError
from meshxl.h2wire import integer

__all__ = ["HeaderDecoder", "HeaderError", "huffman_decode"]


class HeaderError(InputError):
    """A header block that does not decode (the connection is broken off)."""


_STATIC: tuple[tuple[bytes, bytes], ...] = (
    (b':authority', b''), (b':method', b'GET'), (b':method', b'POST'), (b':path', b'/'),
    (b':path', b'/index.html'), (b':scheme', b'http'), (b':scheme', b'https'),
    (b':status', b'200'), (b':status', b'204'), (b':status', b'206'), (b':status', b'304'),
    (b':status', b'400'), (b':status', b'404'), (b':status', b'500'),
    (b'accept-charset', b''), (b'accept-encoding', b'gzip, deflate'),
    (b'accept-language', b''), (b'accept-ranges', b''), (b'accept', b''),
    (b'access-control-allow-origin', b''), (b'age', b''), (b'allow', b''),
    (b'authorization', b''), (b'cache-control', b''), (b'content-disposition', b''),
    (b'content-encoding', b''), (b'content-language', b''), (b'content-length', b''),
    (b'content-location', b''), (b'content-range', b''), (b'content-type', b''),
    (b'cookie', b''), (b'date', b''), (b'etag', b''), (b'expect', b''), (b'expires', b''),
    (b'from', b''), (b'host', b''), (b'if-match', b''), (b'if-modified-since', b''),
    (b'if-none-match', b''), (b'if-range', b''), (b'if-unmodified-since', b''),
    (b'last-modified', b''), (b'link', b''), (b'location', b''), (b'max-forwards', b''),
    (b'proxy-authenticate', b''), (b'proxy-authorization', b''), (b'range', b''),
    (b'referer', b''), (b'refresh', b''), (b'retry-after', b''), (b'server', b''),
    (b'set-cookie', b''), (b'strict-transport-security', b''), (b'transfer-encoding', b''),
    (b'user-agent', b''), (b'vary', b''), (b'via', b''), (b'www-authenticate', b''),
)

_HUFFMAN_LENGTHS = bytes.fromhex(
    "0d171c1c1c1c1c1c1c181e1c1c1e1c1c1c1c1c1c1c1c1e1c1c1c1c1c1c1c1c1c060a0a0c0d06080b"
    "0a0a080b080606060505050606060606060607080f060c0a0d060707070707070707070707070707"
    "07070707070707070807080d130d0e060f0506050605060606050707060606050607060505060707"
    "0707070f0b0e0d1c1416141416161617161717171717181718181617181717171715161716171718"
    "16151416161717151716161815161717151516151716171714161616171616171a1a141316171619"
    "1a1a1a1b1b1a181913151a1b1b1a1b1815151a1a1c1b1b1b14181415161515171616191918181a17"
    "1a1b1a1a1b1b1b1b1b1c1b1b1b1b1b1a1e")


def _canonical() -> tuple[dict[int, tuple[int, int, int]], list[int]]:
    """For each code length: (first code, first symbol's place, count); the symbols in
    code order."""
    order = sorted(range(257), key=lambda s: (_HUFFMAN_LENGTHS[s], s))
    by_length: dict[int, tuple[int, int, int]] = {}
    code, previous = 0, _HUFFMAN_LENGTHS[order[0]]
    for place, symbol in enumerate(order):
        size = _HUFFMAN_LENGTHS[symbol]
        if place:
            code = (code + 1) << (size - previous)
        previous = size
        first = by_length.get(size)
        by_length[size] = (code, place, 1) if first is None else (first[0], first[1],
                                                                  first[2] + 1)
    return by_length, order


_BY_LENGTH, _SYMBOLS = _canonical()
_EOS = 256
MAX_INTEGER = 1 << 28
"""The largest integer a block may hold (an index, a length, a table size)."""


def huffman_decode(data: bytes) -> bytes:
    """A Huffman-coded string (RFC 7541 section 5.2); HeaderError for one that is not:
    the end of string symbol inside it, or padding that is not the code's first bits of
    ones (more than 7 bits, or a zero in it)."""
    out = bytearray()
    code = size = 0
    for byte in data:
        for shift in range(7, -1, -1):
            code = code << 1 | (byte >> shift) & 1
            size += 1
            found = _BY_LENGTH.get(size)
            if found is not None and code - found[0] < found[2]:
                symbol = _SYMBOLS[found[1] + code - found[0]]
                if symbol == _EOS:
                    raise HeaderError("a Huffman string holds the end of string symbol")
                out.append(symbol)
                code = size = 0
            elif size > 30:
                raise HeaderError("a Huffman string holds no code")
    if size > 7 or code != (1 << size) - 1:
        raise HeaderError("a Huffman string's padding is not its end of string's bits")
    return bytes(out)


class HeaderDecoder:
    """One connection's decoding side: its dynamic table (RFC 7541 section 2.3.2), at
    most ``max_table_size`` bytes (what this side's SETTINGS allow), and blocks of at most
    ``max_list_size`` bytes of fields (names and values, and 32 a field)."""

    def __init__(self, max_table_size: int = 4096, max_list_size: int = 1 << 16):
        self.max_table_size = max_table_size
        self.max_list_size = max_list_size
        self.table_size = max_table_size
        self.dynamic: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self.used = 0

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """The block's fields, in order; HeaderError for a block that is not one (the
        table is then no longer the peer's: the connection must end)."""
        fields: list[tuple[bytes, bytes]] = []
        at, end, listed = 0, len(block), 0
        try:
            while at < end:
                first = block[at]
                if first & 0x80:  # an indexed field
                    index, at = self._integer(block, at, 0x7F)
                    fields.append(self._field(index))
                elif first & 0x40:  # a literal, added to the table
                    name, value, at = self._literal(block, at, 0x3F)
                    fields.append((name, value))
                    self._add(name, value)
                elif first & 0x20:  # a table size update
                    if fields:
                        raise HeaderError("a table size update after a field")
                    size, at = self._integer(block, at, 0x1F)
                    if size > self.max_table_size:
                        raise HeaderError(f"a table of {size} bytes; at most "
                                          f"{self.max_table_size}")
                    self.table_size = size
                    self._evict()
                    continue
                else:  # a literal not indexed, or never indexed
                    name, value, at = self._literal(block, at, 0x0F)
                    fields.append((name, value))
                listed += len(fields[-1][0]) + len(fields[-1][1]) + 32
                if listed > self.max_list_size:
                    raise HeaderError(f"a header list past {self.max_list_size} bytes")
        except IndexError:
            raise HeaderError("a header block cut short") from None
        return fields

    @staticmethod
    def _integer(block: bytes, at: int, prefix: int) -> tuple[int, int]:
        value, at = integer(block, at, prefix)  # ends within the block, or IndexError
        if value > MAX_INTEGER:
            raise HeaderError("an integer past 2**28")
        return value, at

    def _string(self, block: bytes, at: int) -> tuple[bytes, int]:
        huffman = block[at] & 0x80
        size, at = self._integer(block, at, 0x7F)
        if at + size > len(block):
            raise HeaderError("a string past the end of its block")
        raw = block[at:at + size]
        return (huffman_decode(raw) if huffman else raw), at + size

    def _literal(self, block: bytes, at: int, prefix: int) -> tuple[bytes, bytes, int]:
        index, at = self._integer(block, at, prefix)
        if index:
            name = self._field(index)[0]
        else:
            name, at = self._string(block, at)
        value, at = self._string(block, at)
        return name, value, at

    def _field(self, index: int) -> tuple[bytes, bytes]:
        if 0 < index <= len(_STATIC):
            return _STATIC[index - 1]
        place = index - len(_STATIC) - 1
        if index == 0 or place >= len(self.dynamic):
            raise HeaderError(f"no field at index {index}")
        return self.dynamic[place]

    def _add(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + 32
        if size > self.table_size:  # it empties the table (RFC 7541 section 4.4)
            self.dynamic.clear()
            self.used = 0
            return
        self.dynamic.appendleft((name, value))
        self.used += size
        self._evict()

    def _evict(self) -> None:
        while self.used > self.table_size:
            name, value = self.dynamic.pop()
            self.used -= len(name) + len(value) + 32
