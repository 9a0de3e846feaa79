"""CRC-32 arithmetic, checked against zlib.crc32 over the real bytes."""

from __future__ import annotations

import zlib

from hypothesis import given
from hypothesis import strategies as st

from archiver import crc

blobs = st.binary(max_size=300)


@given(first=blobs, second=blobs)
def test_combine_equals_the_crc_of_the_joined_bytes(first: bytes, second: bytes) -> None:
    joined = crc.combine(zlib.crc32(first), zlib.crc32(second), len(second))
    assert joined == zlib.crc32(first + second)


@given(pieces=st.lists(blobs, max_size=6))
def test_joined_pieces(pieces: list[bytes]) -> None:
    assert crc.joined((zlib.crc32(piece), len(piece)) for piece in pieces) == zlib.crc32(b"".join(pieces))


@given(length=st.integers(min_value=0, max_value=200_000))
def test_zeros(length: int) -> None:
    assert crc.of_zeros(length) == zlib.crc32(bytes(length))


@given(prefix=blobs, target=st.integers(min_value=0, max_value=0xFFFFFFFF))
def test_forged_bytes_bring_the_crc_to_the_target(prefix: bytes, target: int) -> None:
    forged = crc.forge(zlib.crc32(prefix), target)
    assert len(forged) == 4
    assert zlib.crc32(prefix + forged) == target
