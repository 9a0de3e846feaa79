"""zip_chunks in memory: every entry written whatever its size and name, including where stream-zip 0.0.84
alone stops early (a local header ending exactly on one of its 64 KiB output blocks)."""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from stream_zip import NO_COMPRESSION_32, stream_zip

from archiver.models import SourceRef
from archiver.sources import SourceObject
from archiver.zipping import CHUNK_SIZE, FILE_MODE, Compression, ZipEntry, zip_chunks
from tests.zipcheck import check_with_tools, check_with_zipfile

MODIFIED = datetime(2024, 5, 6, 7, 8, 10, tzinfo=UTC)
# stream-zip's zip32 local header: 30 fixed bytes, the name, and a 9-byte extended timestamp.
HEADER_OVERHEAD = 30 + 9


def source(path: str, body: bytes, *, content_type: str, known_crc: bool) -> SourceObject:
    return SourceObject(
        ref=SourceRef(source=f"s3://memory/{path}", bucket="memory", key=path),
        size=len(body),
        etag='"x"',
        last_modified=MODIFIED,
        content_type=content_type,
        crc32=zlib.crc32(body) if known_crc else None,
    )


def build(files: dict[str, bytes], *, compression: Compression = "auto", known_crc: bool = True) -> bytes:
    bodies = list(files.values())
    entries = [
        ZipEntry(path, source(path, body, content_type="image/png", known_crc=known_crc))
        for path, body in files.items()
    ]

    def open_source(index: int, obj: SourceObject) -> Iterator[bytes]:
        body = bodies[index]
        return iter([body[start : start + CHUNK_SIZE] for start in range(0, len(body), CHUNK_SIZE)])

    return b"".join(zip_chunks(entries, open_source=open_source, compression=compression))


def aligned_first_body(second_name: str) -> bytes:
    """A first entry whose data, plus the second entry's local header, is exactly one output block: the
    second header then ends on a block boundary."""
    size = CHUNK_SIZE - HEADER_OVERHEAD - len(second_name.encode())
    return random.Random(size).randbytes(size)


def test_stream_zip_alone_still_cuts_such_an_archive() -> None:
    """The upstream bug the workaround exists for. When this fails, stream-zip has fixed it and
    zipping._whole can go."""
    first, second = aligned_first_body("b.png"), b"second"
    members = [
        (name, MODIFIED, FILE_MODE, NO_COMPRESSION_32(len(body), zlib.crc32(body)), iter([body]))
        for name, body in (("a.png", first), ("b.png", second))
    ]
    output = b"".join(stream_zip(members, chunk_size=CHUNK_SIZE))
    assert b"PK\x05\x06" not in output  # no end of central directory: the archive was cut
    assert len(output) == CHUNK_SIZE + HEADER_OVERHEAD + len("a.png")


@pytest.mark.parametrize("compression", ["store", "deflate"])
def test_header_ending_on_a_block_boundary_keeps_the_whole_archive(
    compression: Compression, tmp_path: Path
) -> None:
    files = {"a.png": aligned_first_body("b.png"), "b.png": b"second", "c.txt": b"third " * 1000}
    if compression == "deflate":
        # A deflated first entry: its compressed size is what must line up, found by trying.
        files = _deflated_alignment()
    data = build(files, compression=compression)
    check_with_zipfile(data, files)
    path = tmp_path / "aligned.zip"
    path.write_bytes(data)
    check_with_tools(path, list(files))


def _deflated_alignment() -> dict[str, bytes]:
    """Files whose first entry, deflated by zip_chunks, puts the second header's end on a block boundary.
    Incompressible bytes at level 0 grow by a fixed amount, so the size that lines up is searched for."""
    for size in range(CHUNK_SIZE - 200, CHUNK_SIZE):
        body = random.Random(7).randbytes(size)
        candidate = {"a.bin": body, "b.bin": b"second"}
        data = build(candidate, compression="store", known_crc=False)  # deflate level 0, data descriptor
        first_data_start = HEADER_OVERHEAD + len("a.bin")
        second_header = data.index(b"PK\x03\x04", first_data_start)
        if (second_header + HEADER_OVERHEAD + len("b.bin") - first_data_start) % CHUNK_SIZE == 0:
            return candidate
    raise AssertionError("no size lines up")


names = st.text(alphabet="abcdefghij_-é/", min_size=1, max_size=12).filter(
    lambda name: not name.startswith("/") and not name.endswith("/") and "//" not in name
)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=3 * CHUNK_SIZE), min_size=1, max_size=5),
    nudge=st.integers(min_value=-2, max_value=2),
    second=names,
    compression=st.sampled_from(["auto", "store", "deflate"]),
    known_crc=st.booleans(),
)
def test_any_sizes_and_names_give_a_whole_archive(
    sizes: list[int], nudge: int, second: str, compression: Compression, known_crc: bool
) -> None:
    """Sizes near the one that lines the second header up with a block boundary, and anywhere else."""
    aligned = CHUNK_SIZE - HEADER_OVERHEAD - len(f"{second}.1".encode())
    sizes = [max(0, aligned + nudge), *sizes[1:]]
    files = {f"{second}.{index}": random.Random(index).randbytes(size) for index, size in enumerate(sizes)}
    check_with_zipfile(build(files, compression=compression, known_crc=known_crc), files)
