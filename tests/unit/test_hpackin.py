"""meshxl's HPACK decoder (:mod:`meshxl.hpackin`) beside python-hyper's ``hpack``: every
block ``hpack``'s encoder writes (Huffman or not, fields added to the table, never
indexed, table size updates) decodes to the same fields, block after block on one
connection; what is not a block is refused. Pure."""

from __future__ import annotations

import hpack
import pytest
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hypothesis import given, settings
from hypothesis import strategies as st

from meshxl.hpackin import HeaderDecoder, HeaderError, huffman_decode

NAMES = st.one_of(st.sampled_from([b":status", b"content-type", b"grpc-status",
                                   b"grpc-message", b"x-etcd", b"date"]),
                  st.binary(min_size=1, max_size=40))
FIELDS = st.lists(st.tuples(NAMES, st.binary(max_size=120)), max_size=12)


def _encoder() -> HuffmanEncoder:
    return HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)


@given(st.binary(max_size=300))
def test_huffman_strings_decode_as_hpack_wrote_them(text: bytes) -> None:
    assert huffman_decode(_encoder().encode(text)) == text


@settings(max_examples=300)
@given(blocks=st.lists(st.tuples(FIELDS, st.booleans(), st.sampled_from(
    [None, 0, 64, 256, 4096]), st.booleans()), min_size=1, max_size=8))
def test_blocks_decode_as_hpacks_decoder_decodes_them(
        blocks: list[tuple[list[tuple[bytes, bytes]], bool, int | None, bool]]) -> None:
    encoder, reference, ours = hpack.Encoder(), hpack.Decoder(), HeaderDecoder()
    for fields, huffman, table_size, sensitive in blocks:
        if table_size is not None:
            encoder.header_table_size = table_size
        if sensitive:
            fields = [hpack.HeaderTuple(n, v) if i % 2 else hpack.NeverIndexedHeaderTuple(n, v)
                      for i, (n, v) in enumerate(fields)]
        block = encoder.encode(fields, huffman=huffman)
        expected = [(bytes(n), bytes(v)) for n, v in reference.decode(block, raw=True)]
        assert ours.decode(block) == expected
        assert list(ours.dynamic) == [(bytes(n), bytes(v))
                                      for n, v in reference.header_table.dynamic_entries]


@pytest.mark.parametrize("block", [
    b"\x80",                      # index 0
    b"\xbf\x7f",                  # an index past the static table, nothing dynamic
    b"\x0f",                      # a literal cut short
    b"\x00\x05abc",               # a name longer than the block
    b"\x3f\xe2\x1f",              # a table size past what this side allows (4,097)
    b"\x82\x20",                  # a table size update after a field
    b"\x00\x81\x00\x00",          # Huffman padding of zeros
    b"\x00\x85\xff\xff\xff\xff\xff\x00",  # Huffman: the end of string symbol
    b"\xff\xff\xff\xff\xff\x7f",  # an integer past 2**28
])
def test_what_is_not_a_header_block_is_refused(block: bytes) -> None:
    with pytest.raises(HeaderError):
        HeaderDecoder().decode(block)


def test_a_header_list_past_its_limit_is_refused() -> None:
    block = hpack.Encoder().encode([(b"x-big", b"v" * 2000)] * 3)
    assert len(HeaderDecoder(max_list_size=10_000).decode(block)) == 3
    with pytest.raises(HeaderError, match="header list"):
        HeaderDecoder(max_list_size=4_000).decode(block)
