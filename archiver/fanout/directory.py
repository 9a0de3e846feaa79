"""The central directory of an archive built in segments (archiver.fanout).

Each segment is zipped by stream-zip on its own, so its central directory records hold offsets from the
segment's start. The segment's end records say where its directory starts (that is, how long its entries
are), and once every segment's length is known the records are moved to where the segment landed: only
the offset field changes (or, in a zip64 record, the offset in its zip64 extra field). The end records
are written as stream-zip writes them for the whole archive, so the result is byte for byte the archive one
stream-zip run over every entry writes (tests/test_fanout.py holds the two side by side).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

RECORD = b"PK\x01\x02"
RECORD_HEADER = 46  # a central directory record before its name, extra fields and comment
END = b"PK\x05\x06"
END_LENGTH = 22
ZIP64_END = b"PK\x06\x06"
ZIP64_END_LENGTH = 56
ZIP64_LOCATOR = b"PK\x06\x07"
ZIP64_LOCATOR_LENGTH = 20
ZIP64_EXTRA = 0x0001
ZIP64_VERSION = 45  # "version needed" of every record stream-zip writes with zip64 fields
UNSET32 = 0xFFFFFFFF
# The most a record can be beyond its name: the header, stream-zip's zip64 extra (28 bytes) and extended
# timestamp (9 bytes), with room to spare.
RECORD_OVERHEAD = RECORD_HEADER + 64
END_RECORDS_MAX = END_LENGTH + ZIP64_END_LENGTH + ZIP64_LOCATOR_LENGTH


def directory_bound(names: list[str]) -> int:
    """The most bytes a central directory of these entry names and its end records take."""
    return sum(RECORD_OVERHEAD + len(name.encode("utf-8")) for name in names) + END_RECORDS_MAX


@dataclass(frozen=True)
class Directory:
    """A zip stream's central directory, read from its end: how long the entries before it are, its
    records (offsets from the stream's start), and how many."""

    entries_length: int
    records: bytes
    count: int


def read_directory(tail: bytes, stream_length: int) -> Directory:
    """The central directory of a stream of `stream_length` bytes whose last bytes are `tail`."""
    if len(tail) < END_LENGTH or tail[-END_LENGTH : -END_LENGTH + 4] != END:
        raise ValueError("the stream does not end with an end of central directory record")
    _, _, _, count, size, start, _ = struct.unpack("<HHHHIIH", tail[-END_LENGTH + 4 :])
    if count == 0xFFFF or size == UNSET32 or start == UNSET32:
        zip64_end = tail[
            -END_LENGTH - ZIP64_LOCATOR_LENGTH - ZIP64_END_LENGTH : -END_LENGTH - ZIP64_LOCATOR_LENGTH
        ]
        if zip64_end[:4] != ZIP64_END:
            raise ValueError("the stream's zip64 end of central directory record is missing")
        _, _, _, _, _, _, count, size, start = struct.unpack("<QHHIIQQQQ", zip64_end[4:])
    first = len(tail) - (stream_length - start)
    if first < 0:
        raise ValueError("the central directory starts before the bytes held")
    return Directory(entries_length=start, records=tail[first : first + size], count=count)


def _records(records: bytes) -> list[tuple[int, int]]:
    """(start, end) of each record."""
    spans, position = [], 0
    while position < len(records):
        if records[position : position + 4] != RECORD:
            raise ValueError(f"no central directory record at byte {position}")
        name, extra, comment = struct.unpack_from("<HHH", records, position + 28)
        end = position + RECORD_HEADER + name + extra + comment
        spans.append((position, end))
        position = end
    return spans


def relocate(records: bytes, base: int) -> bytes:
    """The records with every entry's offset moved `base` bytes on."""
    if base == 0:
        return records
    moved = bytearray(records)
    for start, _ in _records(records):
        (offset,) = struct.unpack_from("<I", moved, start + 42)
        if offset != UNSET32:
            if offset + base >= UNSET32:
                raise ValueError("an entry placed past 4 GiB has no zip64 offset field")
            struct.pack_into("<I", moved, start + 42, offset + base)
            continue
        at = _zip64_offset_field(moved, start)
        (value,) = struct.unpack_from("<Q", moved, at)
        struct.pack_into("<Q", moved, at, value + base)
    return bytes(moved)


def _zip64_offset_field(record: bytearray, start: int) -> int:
    """Where the offset sits in the record's zip64 extra field: after the sizes that are UNSET32 in the
    header (uncompressed, then compressed), as APPNOTE 4.5.3 orders them."""
    compressed, uncompressed, name, extra = struct.unpack_from("<IIHH", record, start + 20)
    position = start + RECORD_HEADER + name
    end = position + extra
    while position + 4 <= end:
        kind, length = struct.unpack_from("<HH", record, position)
        if kind == ZIP64_EXTRA:
            skip = 8 * (int(uncompressed == UNSET32) + int(compressed == UNSET32))
            return int(position + 4 + skip)
        position += 4 + length
    raise ValueError("a record's offset is in a zip64 extra field it does not have")


def needs_zip64(records: bytes) -> bool:
    """Whether any record was written with zip64 fields (stream-zip then writes zip64 end records)."""
    return any(records[start + 6] == ZIP64_VERSION for start, _ in _records(records))


def end_records(*, count: int, size: int, start: int, zip64: bool) -> bytes:
    """The end records stream-zip writes after a central directory of `count` records and `size` bytes
    at `start`: zip64 ones when an entry needed zip64 or the count or the offset is past the zip32
    fields (its auto-upgrade)."""
    if zip64 or count > 0xFFFF or start > UNSET32:
        return (
            ZIP64_END
            + struct.pack("<QHHIIQQQQ", 44, 45, 45, 0, 0, count, count, size, start)
            + ZIP64_LOCATOR
            + struct.pack("<IQI", 0, start + size, 1)
            + END
            + struct.pack("<HHHHIIH", 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, UNSET32, UNSET32, 0)
        )
    return END + struct.pack("<HHHHIIH", 0, 0, count, count, size, start, 0)
