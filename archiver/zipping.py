"""Sources -> stream-zip member tuples -> archive byte chunks.

The compression of each entry is decided before it starts, from its name and what its HEAD told us:
- compressible content (and everything under `compression: deflate`): deflate level 1;
- already-compressed media (and everything under `compression: store`): STORED when S3 gave a full-object
  CRC-32, so size and CRC go in the local header and nothing is read twice; otherwise deflate level 0
  (stored blocks, ~1.3 GB/s), since STORED with a data descriptor is refused by Java's ZipInputStream and
  macOS Archive Utility.
ZIP64 is used per entry only where it is needed (an entry or offset past 4 GiB, entries past 65,535).
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from stream_zip import NO_COMPRESSION_32, NO_COMPRESSION_64, ZIP_AUTO, Method, stream_zip

from archiver.sources import SourceObject

CHUNK_SIZE = 64 * 1024
FILE_MODE = stat.S_IFREG | 0o644
ZIP32_LIMIT = 0xFFFFFFFF
ZIP32_MAX_ENTRIES = 0xFFFF
# Room for one entry's local header, extra fields and a data descriptor, with a margin.
ENTRY_OVERHEAD = 512

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


class _StoredKnownCrc(Method):
    """STORED with size and CRC in the local header, choosing ZIP64 only when this entry needs it.

    stream-zip's own NO_COMPRESSION_32 would overflow mid-stream past 4 GiB, so the choice is made from
    the offset the entry starts at, which only stream-zip knows: hence a Method of our own that delegates.
    """

    def __init__(self, size: int, crc32: int, index: int) -> None:
        self._size, self._crc32, self._index = size, crc32, index

    def _get(self, offset: int, default_get_compressobj: Any) -> Any:
        needs_zip64 = offset + self._size + ENTRY_OVERHEAD > ZIP32_LIMIT or self._index >= ZIP32_MAX_ENTRIES
        chosen = (NO_COMPRESSION_64 if needs_zip64 else NO_COMPRESSION_32)(self._size, self._crc32)
        return chosen._get(offset, default_get_compressobj)


@dataclass(frozen=True)
class ZipEntry:
    path: str
    source: SourceObject


def choose_method(entry: ZipEntry, index: int, compression: Compression) -> Method:
    obj = entry.source
    uncompressed = compression == "store" or (
        compression == "auto" and is_precompressed(entry.path, obj.content_type)
    )
    if not uncompressed:
        return ZIP_AUTO(obj.size, level=1)
    if obj.crc32 is not None:
        return _StoredKnownCrc(obj.size, obj.crc32, index)
    return ZIP_AUTO(obj.size, level=0)


def zip_chunks(
    entries: Iterable[ZipEntry],
    *,
    open_source: Callable[[SourceObject], Iterator[bytes]],
    compression: Compression,
) -> Iterator[bytes]:
    """The archive as 64 KiB chunks. Members are generated lazily: a source is opened only when
    stream-zip reaches it, so one GET is open at a time."""

    def members() -> Iterator[tuple[str, Any, int, Method, Iterator[bytes]]]:
        for index, entry in enumerate(entries):
            method = choose_method(entry, index, compression)
            yield entry.path, entry.source.last_modified, FILE_MODE, method, open_source(entry.source)

    return iter(stream_zip(members(), chunk_size=CHUNK_SIZE, extended_timestamps=True))


def archive_size_bound(entries: Iterable[ZipEntry]) -> int:
    """An upper bound of the archive's size, to size multipart parts before the upload starts. Deflate
    can grow incompressible data by ~0.03% (zlib's deflateBound); the central directory repeats names."""
    total = 22 + 56 + 20  # end of central directory records, zip32 and zip64
    for entry in entries:
        size = entry.source.size
        name = len(entry.path.encode("utf-8"))
        total += size + (size >> 12) + (size >> 14) + 64 + 2 * (name + ENTRY_OVERHEAD)
    return total
