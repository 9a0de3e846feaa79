"""One segment of a fanned-out archive (archiver.fanout): a contiguous run of its entries, zipped by
stream-zip exactly as the whole archive's run would write them, into the archive's multipart upload under
the segment's own range of part numbers.

What is not a plain part of the upload: the segment's central directory (stream-zip writes one at the end
of the segment's stream; it is held back, cut off and recorded, offsets from the segment's start, for the
coordinator to move into place), its first part (the head, kept as a temporary object: the bytes before it,
the end of the previous segment, may be too few to make a part of S3's 5 MiB on their own, and the
coordinator joins them to it), and a short last part that follows a server-side copy (the tail, kept the
same way). A short last part after a streamed one is joined to it here, so most segments end in a full
part.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from archiver import checksums
from archiver.assembly import CopiedEntry, Copier
from archiver.aws import AwsClients, retry_transient
from archiver.errors import TransientError
from archiver.fanout.directory import Directory, directory_bound, read_directory
from archiver.job import SOURCE_GETS
from archiver.manifest import Row, Rows
from archiver.multipart import MultipartUpload
from archiver.parts import PartLedger, parts_of, upload_parts
from archiver.prefetch import Planned, Prefetcher
from archiver.settings import MIN_PART_SIZE
from archiver.sources import Fetched, SourceObject, fetch_small, read_source
from archiver.zipping import Compression, ZipEntry, is_uncompressed, zip_chunks

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class SegmentWork:
    """What building one segment needs, all of it from the stored plan."""

    index: int
    entries: list[ZipEntry]
    copyable: frozenset[int]  # positions in `entries` that S3 may copy server-side
    first_part: int
    last_part: int
    base_offset: int  # for each entry's format (zipping.zip_chunks)
    part_size: int
    small_limit: int
    compression: Compression
    algorithm: checksums.Algorithm | None  # the plan's, for the segment's checksum; None: not computed
    head_key: str
    tail_key: str

    @property
    def least_bytes(self) -> int:
        """The fewest bytes the segment's entries can take: their uncompressed data, which no format
        shrinks (parts_of then knows a short last part cannot follow sooner)."""
        return sum(entry.source.size for entry in self.entries if is_uncompressed(entry, self.compression))


@dataclass
class SegmentResult:
    """What the coordinator needs of a built segment."""

    length: int  # bytes of the segment's entries in the archive
    parts: list[CompletedPartTypeDef]
    head_size: int
    tail_size: int  # 0: no tail
    directory: bytes  # the segment's central directory records, offsets from its start
    count: int
    copied_bytes: int
    crc32: int | None = None  # of the segment's bytes in the archive
    # Of the same bytes in the plan's checksum algorithm, when it is not CRC-32 (crc32 is then the one).
    checksum: int | None = None
    rows: list[Row] | None = None  # its entries', for the archive's manifest

    def document(self) -> dict[str, Any]:
        return {
            "length": self.length,
            "parts": [dict(part) for part in self.parts],
            "head_size": self.head_size,
            "tail_size": self.tail_size,
            "directory": base64.b64encode(self.directory).decode(),
            "count": self.count,
            "copied_bytes": self.copied_bytes,
            "crc32": self.crc32,
            "checksum": self.checksum,
            "manifest": None if self.rows is None else [row.document() for row in self.rows],
        }

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> SegmentResult:
        return cls(
            length=int(document["length"]),
            parts=list(document["parts"]),
            head_size=int(document["head_size"]),
            tail_size=int(document["tail_size"]),
            directory=base64.b64decode(document["directory"]),
            count=int(document["count"]),
            copied_bytes=int(document.get("copied_bytes", 0)),
            # None in a record of an archiver older than these fields.
            crc32=document.get("crc32"),
            checksum=document.get("checksum"),
            rows=None
            if document.get("manifest") is None
            else [Row.from_document(r) for r in document["manifest"]],
        )


@dataclass
class _WithoutDirectory:
    """The zip stream without its central directory and end records: the last `held` bytes are kept
    back until the stream ends, then the directory is read from them and only the entries' bytes passed
    on. `held` is at least the directory's size (directory.directory_bound). `position` counts the bytes
    zipped so far, held ones included: where a copied entry's data starts (assembly.CopiedEntry), which
    the part assembler, behind the held bytes, cannot tell."""

    held: int
    directory: Directory | None = None
    position: int = 0
    _tail: bytearray = field(default_factory=bytearray)

    def strip(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.position += len(chunk)
            self._tail += chunk
            if len(self._tail) > 2 * self.held:
                cut = len(self._tail) - self.held
                yield bytes(self._tail[:cut])
                del self._tail[:cut]
        self.directory = read_directory(bytes(self._tail), self.position)
        kept = len(self._tail) - (self.position - self.directory.entries_length)
        if kept:
            yield bytes(self._tail[:kept])
        self._tail = bytearray()


def build_segment(
    clients: AwsClients,
    upload: MultipartUpload,
    work: SegmentWork,
    *,
    concurrency: int,
    prefetch_bytes: int,
    abandoned: Callable[[], bool],
) -> SegmentResult:
    """Zip the segment's entries into the upload; its head and tail as temporary objects."""
    upload.ledger.last_number = work.first_part - 1
    stripped = _WithoutDirectory(held=directory_bound([entry.path for entry in work.entries]))
    sink = _Sink(clients.s3, upload, work)
    copier = Copier(
        upload,
        part_size=work.part_size,
        concurrency=concurrency,
        abandoned=abandoned,
        position=lambda: stripped.position,
    )
    prefetcher = _prefetcher(clients, work, prefetch_bytes)
    entries = [_resolved(prefetcher, index, entry) for index, entry in enumerate(work.entries)]
    stream = checksums.Running(checksums.CRC32)  # of its bytes in the archive, copies' stand-ins included
    # CRC-32 is `stream`; another algorithm is counted beside it (a plan of one copies nothing: layout).
    summed = None
    if work.algorithm is not None and work.algorithm is not checksums.CRC32:
        summed = checksums.Running(work.algorithm)
    rows = Rows()
    try:
        chunks = zip_chunks(
            (entry() for entry in entries),
            open_source=lambda index, obj: rows.over(
                index, work.entries[index].path, obj, prefetcher.open(index)
            ),
            compression=work.compression,
            copy=lambda index, obj: _copied(copier, rows, work, index, obj),
            base_offset=work.base_offset,
        )
        zipped = stream.over(stripped.strip(chunks))
        parts = _parts(zipped if summed is None else summed.over(zipped), work, abandoned, upload.ledger)
        streamed = upload_parts(upload, parts, concurrency=concurrency, send=sink.send)
    finally:
        prefetcher.close()
        copier.close()
    directory = stripped.directory
    assert directory is not None
    if upload.ledger.position != directory.entries_length:
        raise RuntimeError(f"segment {work.index}: {upload.ledger.position} bytes assembled, not {directory}")
    return SegmentResult(
        length=directory.entries_length,
        parts=[*upload.parts, *streamed],
        head_size=sink.sizes["head"],
        tail_size=sink.sizes["tail"],
        directory=directory.records,
        count=directory.count,
        copied_bytes=upload.apart_bytes,
        crc32=stream.value if stream.length == directory.entries_length else None,
        checksum=_checksum(summed, directory.entries_length, upload.apart_bytes),
        rows=rows.listed(len(work.entries)),
    )


def _checksum(summed: checksums.Running | None, length: int, copied: int) -> int | None:
    """The segment's checksum in the plan's algorithm, if counted over all of its bytes: never over a
    copy's stand-in, which only has the copied bytes' CRC-32."""
    if summed is None or summed.length != length or copied:
        return None
    return summed.value


def _copied(
    copier: Copier, rows: Rows, work: SegmentWork, index: int, obj: SourceObject
) -> CopiedEntry | None:
    copied = copier.copy(obj) if index in work.copyable else None
    if copied is not None:
        rows.copied(index, work.entries[index].path, obj)
    return copied


def _parts(
    stream: Iterator[bytes], work: SegmentWork, abandoned: Callable[[], bool], ledger: PartLedger
) -> Iterator[tuple[int, bytes | bytearray]]:
    """The segment's parts: the first of 5 MiB, so its upload starts sooner; a short last part joined
    to the one before where it can be."""
    return parts_of(
        stream,
        work.part_size,
        abandoned,
        ledger,
        join_short_last=True,
        first_size=MIN_PART_SIZE,
        at_least=work.least_bytes,
    )


def _prefetcher(clients: AwsClients, work: SegmentWork, prefetch_bytes: int) -> Prefetcher:
    """The segment's sources, read as a single worker reads them once HEADed: a small one whole by one
    GET (If-Match the plan's ETag), a big one streamed."""

    def fetch(planned: Planned, admit: Callable[[int], None]) -> Any:
        assert isinstance(planned, SourceObject)
        store = clients.source_store(planned.ref.bucket)
        return fetch_small(
            store, planned.ref, limit=work.small_limit, admit=admit, head=lambda: planned, known=planned
        )

    return Prefetcher(
        [entry.source for entry in work.entries],
        fetch=fetch,
        stream=lambda obj: read_source(clients.s3, obj),
        window_bytes=prefetch_bytes,
        small_limit=work.small_limit,
        workers=SOURCE_GETS,
    )


@dataclass
class _Sink:
    """Where each of the segment's parts goes: the upload, or (head and tail) a temporary object."""

    s3: S3Client
    upload: MultipartUpload
    work: SegmentWork
    sizes: dict[str, int] = field(default_factory=lambda: {"head": 0, "tail": 0})

    def send(self, number: int, body: bytes | bytearray) -> CompletedPartTypeDef | None:
        work, upload = self.work, self.upload
        if number > work.last_part:
            raise RuntimeError(
                f"segment {work.index}: part {number} is past its range's end {work.last_part}"
            )
        if number in (work.first_part, upload.ledger.short_last):
            kind = "head" if number == work.first_part else "tail"
            _put_object(self.s3, upload.bucket, work.head_key if kind == "head" else work.tail_key, body)
            self.sizes[kind] = len(body)
            return None
        return upload.upload_part(number, body)


def _resolved(prefetcher: Prefetcher, index: int, entry: ZipEntry) -> Callable[[], ZipEntry]:
    """The entry as its read found it (a small source's CRC-32 is that of the bytes its GET returned, as
    when the whole archive is built in one piece): looked up only when stream-zip reaches it."""

    def resolve() -> ZipEntry:
        found = prefetcher.resolve(index)
        obj = found.obj if isinstance(found, Fetched) else found
        if not isinstance(obj, SourceObject):
            raise TransientError(f"{entry.source.ref.source} changed while being archived")
        return ZipEntry(path=entry.path, source=obj)

    return resolve


@retry_transient
def _put_object(s3: S3Client, bucket: str, key: str, body: bytes | bytearray) -> None:
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(body), ContentType="application/octet-stream")
