"""CRC-32 arithmetic, checked against zlib.crc32 over the real bytes; and how copied objects are cut."""

from __future__ import annotations

import base64
import itertools
import zlib

from hypothesis import given
from hypothesis import strategies as st

from archiver import crc
from archiver.assembly import LEAD_BYTES, MAX_COPY_PIECE, copy_ranges
from archiver.settings import MAX_PART_SIZE, MIN_COPIED_OBJECT, MIN_PART_SIZE

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


@given(
    size=st.integers(min_value=MIN_COPIED_OBJECT, max_value=5 * 1024**4),
    part_size=st.integers(min_value=MIN_PART_SIZE, max_value=MAX_COPY_PIECE),  # larger: not copied
    concurrency=st.integers(min_value=1, max_value=64),
)
def test_copy_ranges_cover_the_object_after_its_head_in_valid_parts(
    size: int, part_size: int, concurrency: int
) -> None:
    ranges = copy_ranges(size, part_size=part_size, concurrency=concurrency)
    assert ranges[0][0] == LEAD_BYTES and ranges[-1][1] == size
    assert all(end == start for (_, end), (start, _) in itertools.pairwise(ranges))
    assert all(MIN_PART_SIZE <= end - start <= MAX_PART_SIZE for start, end in ranges)
    # Never more parts than streaming the same bytes would take: the part-number budget counts on it.
    assert len(ranges) <= -(-(size - LEAD_BYTES) // part_size)


@given(value=st.integers(min_value=0, max_value=0xFFFFFFFF))
def test_from_base64_reads_s3s_checksum_form(value: int) -> None:
    assert crc.from_base64(base64.b64encode(value.to_bytes(4, "big")).decode()) == value


def test_from_base64_refuses_what_is_not_a_crc32() -> None:
    assert crc.from_base64(None) is None
    assert crc.from_base64("") is None
    assert crc.from_base64("not base64!") is None
    assert crc.from_base64(base64.b64encode(bytes(8)).decode()) is None  # a CRC-64
