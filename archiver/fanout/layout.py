"""A fanned-out archive's layout: its entries cut into segments, each segment's range of part numbers,
where it lands around 4 GiB, and the part size that fits them all in S3's 10,000 parts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from archiver.assembly import COPY_EXTRA_PARTS, MAX_COPY_PIECE, plan_copies
from archiver.errors import PermanentError
from archiver.multipart import choose_part_size
from archiver.settings import MAX_PART_SIZE, MAX_PARTS, Settings
from archiver.zipping import ZIP32_LIMIT, Compression, ZipEntry, archive_size_bound, is_uncompressed

# About this many segments at most: each takes a few part numbers of S3's 10,000 and one task message, so
# past it segments grow (plan_layout grows them further to keep parts small: 5 TiB gets 4 GiB segments).
MAX_SEGMENTS = 2_000


@dataclass(frozen=True)
class Segment:
    index: int
    first_entry: int  # in the plan's entries
    count: int
    first_part: int
    last_part: int
    # The offset the segment's own offsets are counted from when an entry's format is chosen; None when
    # it may straddle 4 GiB (chained: built once its exact offset is known).
    base: int | None
    source_bytes: int


@dataclass(frozen=True)
class Layout:
    segments: list[Segment]
    part_size: int
    copyable: frozenset[int]  # plan entry indexes that S3 may copy server-side
    final_part: int  # the last part: the end of the last segment and the central directory


def segment_runs(sizes: Sequence[int], segment_bytes: int) -> list[tuple[int, int]]:
    """(first, count) of contiguous runs of about `segment_bytes` source bytes each (an entry is never
    split; a big one is a segment of its own), at most MAX_SEGMENTS of them."""
    total = sum(sizes)
    target = max(segment_bytes, math.ceil(total / MAX_SEGMENTS))
    runs: list[tuple[int, int]] = []
    first, run = 0, 0
    for index, size in enumerate(sizes):
        if run and run + size > target:
            runs.append((first, index - first))
            first, run = index, 0
        run += size
    runs.append((first, len(sizes) - first))
    return runs


def plan_layout(
    entries: list[ZipEntry], settings: Settings, compression: Compression, segment_bytes: int
) -> Layout:
    """Segments, their part numbers and placement, and the part size that fits them in 10,000 parts.

    Each segment's range holds a few numbers more than its bytes need, so many segments make parts
    bigger than a single worker's (and memory is (UPLOAD_CONCURRENCY + 2) x part size): segments double
    in size until the part size is at most twice the one a single worker would use."""
    single = choose_part_size(archive_size_bound(entries), settings.part_size)
    while True:
        layout = _layout(entries, settings, compression, segment_bytes)
        if layout.part_size <= 2 * single or len(layout.segments) <= 2:
            return layout
        segment_bytes *= 2


def _layout(
    entries: list[ZipEntry], settings: Settings, compression: Compression, segment_bytes: int
) -> Layout:
    runs = segment_runs([entry.source.size for entry in entries], segment_bytes)
    copyable, _ = plan_copies(entries, settings, compression)
    if settings.archive_checksum != "CRC32":
        # A copied range reaches a segment's checksum only as a CRC-32 stand-in, and S3 promises no part
        # checksums for copies into an upload without them (a fan-out's): such an archive streams it all.
        copyable = frozenset()
    bounds = [archive_size_bound(entries[first : first + count]) for first, count in runs]
    copies = [sum(1 for i in range(first, first + count) if i in copyable) for first, count in runs]
    # Beyond its bytes a segment's range holds its copies' spare numbers, one for its smaller first part,
    # and two for rounding (numbers are only ever left unused, which S3 allows).
    extras = [COPY_EXTRA_PARTS * n + 3 for n in copies]
    spare = sum(extras) + len(runs) + 1
    if copyable and (spare >= MAX_PARTS // 2 or _part_size(bounds, settings, spare) > MAX_COPY_PIECE):
        copyable, extras = frozenset(), [3] * len(runs)
        spare = sum(extras) + len(runs) + 1
    part_size = _part_size(bounds, settings, spare)
    segments: list[Segment] = []
    number, lower, upper = 1, 0, 0
    for index, ((first, count), bound, extra) in enumerate(zip(runs, bounds, extras, strict=True)):
        span = -(-bound // part_size) + extra
        below = upper + bound < ZIP32_LIMIT
        base = lower if below or lower >= ZIP32_LIMIT else None
        chunk = entries[first : first + count]
        segments.append(
            Segment(
                index=index,
                first_entry=first,
                count=count,
                first_part=number,
                last_part=number + span - 1,
                base=base,
                source_bytes=sum(entry.source.size for entry in chunk),
            )
        )
        number += span
        # Fewest bytes the segment can take: its uncompressed entries' data, which no format shrinks.
        lower += sum(entry.source.size for entry in chunk if is_uncompressed(entry, compression))
        upper += bound
    if number > MAX_PARTS:
        raise PermanentError("too_large", f"the archive needs more than {MAX_PARTS} parts")
    return Layout(segments=segments, part_size=part_size, copyable=copyable, final_part=number)


def _part_size(bounds: list[int], settings: Settings, spare: int) -> int:
    if spare >= MAX_PARTS:
        return MAX_PART_SIZE + 1  # too many segments for their numbers: the caller makes them bigger
    try:
        return choose_part_size(sum(bounds), settings.part_size, extra_parts=spare)
    except PermanentError:
        return MAX_PART_SIZE + 1
