"""Sources -> stream-zip member tuples -> archive byte chunks.

The compression of each entry is decided before it starts, from its name and what its HEAD told us:
- compressible content (and everything under `compression: deflate`): deflate level 1 with isal;
- already-compressed media (and everything under `compression: store`): STORED when S3 gave a full-object
  CRC-32, so size and CRC go in the local header and nothing is read twice; otherwise deflate level 0
  (zlib's stored blocks, ~4 GB/s here), since STORED with a data descriptor is refused by Java's
  ZipInputStream and macOS Archive Utility.
ZIP64 is used only where a record cannot hold a value (see _Member).
"""

from __future__ import annotations

import stat
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from isal import isal_zlib
from stream_zip import NO_COMPRESSION_32, NO_COMPRESSION_64, ZIP_32, ZIP_64, ZIP_AUTO, Method, stream_zip

from archiver import crc
from archiver.errors import ChecksumMismatch
from archiver.sources import SourceObject

CHUNK_SIZE = 64 * 1024
FILE_MODE = stat.S_IFREG | 0o644
ZIP32_LIMIT = 0xFFFFFFFF
# Deflate entries past 4 GiB up to this size are buffered and STORED (see _Member).
BUFFER_LIMIT = 16 * 1024 * 1024
# stream-zip's own "write zip64 end records when the offset or the count needs them" marker, taken
# from its public ZIP_AUTO rather than imported from its private names.
_AUTO_UPGRADE_END_RECORDS = ZIP_AUTO(0)._get(0, zlib.compressobj)[1]
# Room for one entry's local header, extra fields and a data descriptor, with a margin.
ENTRY_OVERHEAD = 512
DEFLATE_LEVEL = 1

Compression = Literal["auto", "store", "deflate"]

# Already-compressed formats: deflating them again costs CPU and saves nothing.
COMPRESSED_EXTENSIONS = frozenset(
    {
        *("jpg", "jpeg", "png", "gif", "webp", "heic", "heif", "avif", "jxl", "tif", "tiff"),
        *("mp3", "m4a", "aac", "ogg", "opus", "flac", "mp4", "m4v", "mov", "avi", "mkv", "webm"),
        *("zip", "gz", "tgz", "bz2", "xz", "zst", "7z", "rar", "lz4", "br", "jar", "apk"),
        *("epub", "docx", "xlsx", "pptx", "odt", "ods", "odp", "pdf", "woff", "woff2"),
    }
)
COMPRESSED_TYPE_PREFIXES = ("image/", "video/", "audio/")
COMPRESSED_TYPES = frozenset(
    {
        "application/zip",
        "application/gzip",
        "application/x-gzip",
        "application/x-7z-compressed",
        "application/x-bzip2",
        "application/x-xz",
        "application/zstd",
        "application/pdf",
        "application/vnd.rar",
    }
)


class CopiedData(Protocol):
    """An entry whose data is uploaded apart from the stream (archiver.assembly copies it inside S3):
    its CRC-32, and the bytes stream-zip is to see in its place."""

    @property
    def crc32(self) -> int: ...

    def chunks(self) -> Iterator[bytes]: ...


def is_precompressed(path: str, content_type: str) -> bool:
    extension = path.rsplit(".", 1)[-1].lower() if "." in path else ""
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == "image/svg+xml" or kind == "image/bmp":
        return False
    return (
        extension in COMPRESSED_EXTENSIONS
        or kind in COMPRESSED_TYPES
        or kind.startswith(COMPRESSED_TYPE_PREFIXES)
    )


def deflate_bound(size: int, level: int) -> int:
    """Most bytes deflate can turn `size` bytes into: zlib's deflateBound for stored blocks (level 0), and
    a wider margin for isal, which grew incompressible data by ~0.1% here."""
    if level == 0:
        return size + (size >> 12) + (size >> 14) + (size >> 25) + 7
    return size + (size >> 6) + 1024


def compressor(level: int) -> Callable[[], Any]:
    """Raw deflate: zlib's stored blocks for level 0 (grows media by 0.03%), isal otherwise (~250 MB/s
    on text here against zlib level 1's 80 MB/s, at a similar ratio)."""
    if level == 0:
        return lambda: zlib.compressobj(0, zlib.DEFLATED, -zlib.MAX_WBITS)
    return lambda: isal_zlib.compressobj(level, isal_zlib.DEFLATED, -isal_zlib.MAX_WBITS)


class _Member(Method):
    """One entry whose format is decided from the offset it starts at, which only stream-zip knows.

    ZIP64 only where a record cannot hold a value: an entry that starts past 4 GiB, or whose size could
    reach 4 GiB. An entry that merely crosses 4 GiB stays zip32, and so does the 65,536th entry: only
    the end records need zip64 then, which stream-zip writes itself when told it may (the auto-upgrade
    marker below). This matters beyond size: Java 17's ZipInputStream misreads the zip64 data
    descriptor of an entry smaller than 4 GiB (JDK-8303866, fixed in 21). For the same reason a small
    deflate entry past 4 GiB is read into memory (at most BUFFER_LIMIT) and STORED with its CRC in the
    local header, with no data descriptor at all. `level` None means STORED with S3's CRC-32.
    """

    def __init__(
        self,
        *,
        size: int,
        level: int | None,
        crc32: int | None,
        source: Iterator[bytes],
        name: str,
        copy: Callable[[], CopiedData | None] | None = None,
        crc_of_bytes: bool = False,
        base_offset: int = 0,
    ) -> None:
        self._size, self._level, self._crc32, self._source = size, level, crc32, source
        self._base_offset = base_offset  # where the stream starts in the archive (a fan-out segment's)
        self._crc_of_bytes = crc_of_bytes  # crc32 was computed from these very bytes
        self._name = name  # the source as requested, for errors
        self._copy = copy
        self._copied: CopiedData | None = None
        self._buffered: list[bytes] | None = None

    def chunks(self) -> Iterator[bytes]:
        """The entry's bytes: stream-zip calls `_get` before it reads them, so the choice is made."""
        if self._copied is not None:
            yield from self._copied.chunks()
            return
        if self._buffered is None:
            if self._level is not None:
                yield from _even(self._source)
            else:
                yield from self._source if self._crc_of_bytes else self._checked(self._source)
            return
        self._buffered.reverse()  # pop from the end: each chunk is freed once written
        while self._buffered:
            yield self._buffered.pop()

    def _checked(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        """A STORED entry's bytes, checked against the CRC-32 S3 reported before stream-zip checks them:
        its error would not say which source, nor that S3's CRC, not the archive, was wrong."""
        value = 0
        for chunk in chunks:
            value = isal_zlib.crc32(chunk, value)
            yield chunk
        if value != self._crc32:
            raise ChecksumMismatch(self._name)

    def _get(self, offset: int, default_get_compressobj: Any) -> Any:
        past = self._base_offset + offset >= ZIP32_LIMIT
        # Copied server-side, the entry is STORED just as streaming with S3's CRC would write it.
        self._copied = self._copy() if self._copy is not None else None
        if self._copied is not None:
            self._level, self._crc32 = None, self._copied.crc32
        if self._level is not None and past and self._size <= BUFFER_LIMIT:
            self._buffered = list(self._source)
            chosen = NO_COMPRESSION_64(self._size, crc.of(self._buffered))._get(
                offset, default_get_compressobj
            )
        elif self._level is None:
            zip64 = past or self._size >= ZIP32_LIMIT
            stored = NO_COMPRESSION_64 if zip64 else NO_COMPRESSION_32
            chosen = stored(self._size, self._crc32 or 0)._get(offset, default_get_compressobj)
        else:
            zip64 = past or deflate_bound(self._size, self._level) >= ZIP32_LIMIT
            chosen = (ZIP_64 if zip64 else ZIP_32)._get(offset, compressor(self._level))
        return (chosen[0], _AUTO_UPGRADE_END_RECORDS, *chosen[2:])


def _even(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The same bytes in pieces of exactly CHUNK_SIZE (the last shorter). Deflate's output depends on how
    its input is cut: fed the network's pieces, which vary from run to run, the same sources would not
    make the same archive."""
    pending = bytearray()
    for chunk in chunks:
        if not pending and len(chunk) == CHUNK_SIZE:
            yield chunk
            continue
        pending += chunk
        while len(pending) >= CHUNK_SIZE:
            yield bytes(pending[:CHUNK_SIZE])
            del pending[:CHUNK_SIZE]
    if pending:
        yield bytes(pending)


@dataclass(frozen=True)
class ZipEntry:
    path: str
    source: SourceObject


def is_uncompressed(entry: ZipEntry, compression: Compression) -> bool:
    """Whether the entry's data goes into the archive as it is (STORED, or deflate's stored blocks)."""
    return choose_level(entry, compression) in (None, 0)


def choose_level(entry: ZipEntry, compression: Compression) -> int | None:
    """The deflate level of an entry, or None for STORED."""
    obj = entry.source
    uncompressed = compression == "store" or (
        compression == "auto" and is_precompressed(entry.path, obj.content_type)
    )
    if not uncompressed:
        return DEFLATE_LEVEL
    return None if obj.crc32 is not None else 0


def zip_chunks(
    entries: Iterable[ZipEntry],
    *,
    open_source: Callable[[int, SourceObject], Iterator[bytes]],
    compression: Compression,
    copy: Callable[[int, SourceObject], CopiedData | None] | None = None,
    base_offset: int = 0,
) -> Iterator[bytes]:
    """The archive as 64 KiB chunks. Members are generated lazily: stream-zip asks for entry i's bytes
    only once entry i-1 is written, so sources are consumed strictly in order. `copy` is offered every
    uncompressed entry when stream-zip reaches it; what it copies server-side is not read here.
    `base_offset`: for a fan-out segment, an offset the stream's own offsets are counted from when an
    entry's format is chosen (archiver.fanout places segments so that this gives the choice the whole
    archive's offsets would); its central directory is the segment's, moved later (archiver.directory)."""

    def members() -> Iterator[tuple[str, Any, int, Method, Iterator[bytes]]]:
        for index, entry in enumerate(entries):
            obj = entry.source
            level = choose_level(entry, compression)
            offer = (
                (lambda index=index, obj=obj: copy(index, obj))
                if copy is not None and level in (None, 0)
                else None
            )
            member = _Member(
                size=obj.size,
                level=level,
                crc32=obj.crc32,
                source=open_source(index, obj),
                name=obj.ref.source,
                copy=offer,
                crc_of_bytes=obj.crc_of_bytes,
                base_offset=base_offset,
            )
            yield entry.path, obj.last_modified, FILE_MODE, member, member.chunks()

    return _whole(stream_zip(members(), chunk_size=CHUNK_SIZE, extended_timestamps=True))


END_OF_CENTRAL_DIRECTORY = b"PK\x05\x06"
END_RECORD_LENGTH = 22  # stream-zip writes no archive comment


def _whole(output: Iterable[bytes]) -> Iterator[bytes]:
    """All of stream-zip's output, which stream-zip 0.0.84 itself can cut short.

    stream-zip regroups its raw output into CHUNK_SIZE blocks and flushes a short block after every local
    header. When a header ends exactly on a block boundary the flush makes an empty block, which the
    regrouping loop takes for the end of the output: the archive stops there, silently, without its
    central directory (about one entry in 65,536 hits it; tests/test_zipping.py builds one; reported
    upstream as https://github.com/uktrade/stream-zip/issues/189). The raw generator still holds the
    rest, so it is taken from the regrouping generator's frame and read to its end; its flush markers are
    empty bytes, passed on as they are. The end record is checked last, so no other cut goes unnoticed.
    """
    zipped: Any = iter(output)  # stream_zip's own generator: iter() returns it
    first = next(zipped, None)
    if first is None:
        raise RuntimeError("stream-zip wrote nothing")
    # stream_zip is `yield from evenly_sized(raw)`; evenly_sized keeps `raw` as `it`.
    raw: Iterator[bytes] = zipped.gi_yieldfrom.gi_frame.f_locals["it"]
    tail = first[-END_RECORD_LENGTH:]
    yield first
    for chunk in zipped:
        tail = (
            chunk[-END_RECORD_LENGTH:]
            if len(chunk) >= END_RECORD_LENGTH
            else (tail + chunk)[-END_RECORD_LENGTH:]
        )
        yield chunk
    for piece in raw:
        tail = (tail + piece)[-END_RECORD_LENGTH:]
        yield piece
    if not tail.startswith(END_OF_CENTRAL_DIRECTORY):
        raise RuntimeError("the archive stream ended before its end of central directory record")


def archive_size_bound(entries: Iterable[ZipEntry]) -> int:
    """An upper bound of the archive's size, to size multipart parts before the upload starts; the
    central directory repeats every name."""
    total = 22 + 56 + 20  # end of central directory records, zip32 and zip64
    for entry in entries:
        name = len(entry.path.encode("utf-8"))
        total += deflate_bound(entry.source.size, DEFLATE_LEVEL) + 2 * (name + ENTRY_OVERHEAD)
    return total
