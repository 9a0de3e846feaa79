"""CRC-32 arithmetic, checked against zlib.crc32 over the real bytes; and how copied objects are cut."""

from __future__ import annotations

import base64
import itertools
import zlib

from awscrt import checksums as crt  # type: ignore[import-untyped]
from hypothesis import given
from hypothesis import strategies as st

from archiver import checksums, crc
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


# ---------------------------------------------------------------------- the archive's S3 checksum


@given(
    pieces=st.lists(blobs, max_size=6),
    name=st.sampled_from(sorted(checksums.ALGORITHMS)),
)
def test_an_archive_checksum_joined_from_pieces_is_the_whole_ones(pieces: list[bytes], name: str) -> None:
    """What a completion hands S3: each part's checksum joined in order, the checksum of all the bytes,
    checked against zlib's CRC-32 and awscrt's CRC64NVME computed over the whole (also an earlier value
    carried on, as a part's is computed)."""
    algorithm = checksums.ALGORITHMS[name]  # type: ignore[index]
    whole = b"".join(pieces)
    expected = {"CRC32": zlib.crc32, "CRC64NVME": crt.crc64nvme}[name](whole)
    assert algorithm.joined((algorithm.of(piece), len(piece)) for piece in pieces) == expected
    carried = 0
    for piece in pieces:
        carried = algorithm.of(piece, carried)
    assert carried == expected


@given(
    value=st.integers(min_value=0, max_value=2**64 - 1), name=st.sampled_from(sorted(checksums.ALGORITHMS))
)
def test_an_archive_checksum_reads_back_as_s3_writes_it(value: int, name: str) -> None:
    algorithm = checksums.ALGORITHMS[name]  # type: ignore[index]
    value %= 1 << (8 * algorithm.width)
    text = algorithm.encode(value)
    assert len(base64.b64decode(text)) == algorithm.width
    assert algorithm.decode(text) == value
    other = checksums.CRC64NVME if algorithm is checksums.CRC32 else checksums.CRC32
    assert other.decode(text) is None  # a value of the other width is not one of this algorithm's
    assert algorithm.decode(None) is None and algorithm.decode("not base64!") is None
