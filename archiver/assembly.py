"""Server-side assembly: the data of big STORED entries copied inside S3 (UploadPartCopy), never through
the worker.

A STORED entry's data is its source object's bytes, so S3 can copy them into the archive's multipart
upload itself. The worker streams everything else: local headers, small or deflated entries, the central
directory, and the first HEAD_BYTES of each copied object, which make the part that ends where a copy
begins at least S3's 5 MiB minimum. The ZIP layout stays stream-zip's: it is told each copied entry's
size and CRC like any STORED entry and is fed stand-in bytes for the copied range (zeros, then four bytes
that give the whole the entry's CRC, which stream-zip checks), and the part assembler (multipart.parts_of)
drops those. So the archive is byte for byte the one streaming would write for the same entries.

Part numbers: a copy is sent while stream-zip prepares the entry's local header, because the header needs
the CRC, which without a full-object CRC from S3 comes from the copied parts' own checksums. The copied
parts take numbers a few above the last one given out (`Layout.reserve`); the streamed parts before the
copy fit below them, unused numbers are gaps, which S3 allows.

Fallback: a server that rejects UploadPartCopy, or answers without the part checksums an object without
its own CRC needs, gets that entry streamed instead, and this job streams the rest that would fail the
same way; parts already copied under numbers the stream then reuses are overwritten, the others are left
out of CompleteMultipartUpload, which discards them.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import botocore.exceptions
import structlog

from archiver import crc
from archiver.aws import error_code, http_status, is_transient, retry_transient
from archiver.errors import JobAbandoned, TransientError
from archiver.settings import MAX_PARTS, MIN_PART_SIZE, MiB
from archiver.sources import SourceObject, read_source

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef, CopyPartResultTypeDef

log = structlog.get_logger(__name__)

# Streamed from the start of each copied object: the part ending where its copy begins holds these bytes
# plus whatever came before, so it is never under S3's minimum part size.
HEAD_BYTES = MIN_PART_SIZE
# Copied parts are cut evenly into pieces of [piece, 2 x piece): at most 2.5 GiB keeps them under S3's
# 5 GiB. Archives whose part size is bigger are not copied (job.py), so copies never take more part
# numbers than streaming the same bytes would.
MAX_COPY_PIECE = 2560 * MiB
# Streamed parts that may still come before a copy once it is sent: the one being filled, one the local
# header may complete, and the one that ends where the copy starts.
NUMBERING_SLACK = 3
STAND_IN = bytes(64 * 1024)
CANCEL_POLL = 1.0  # seconds between looks at the job's stop flag while copies run


@dataclass(frozen=True)
class UploadTarget:
    bucket: str
    key: str
    upload_id: str


@dataclass(frozen=True)
class Hole:
    """Archive bytes [start, end) that S3 copies as parts first..last; the stream has stand-ins there."""

    start: int
    end: int
    first: int
    last: int


@dataclass
class Layout:
    """Where the archive's parts come from, shared by the zip writer and the part assembler, which run
    in one thread: the writer registers a copied range when its data starts, the assembler numbers the
    streamed parts around it and skips its stand-in bytes."""

    upload: UploadTarget | None = None
    position: int = 0  # archive bytes the assembler has taken from the stream, copied ranges included
    last_number: int = 0  # the highest part number given out, streamed or copied
    holes: deque[Hole] = field(default_factory=deque)
    copied_parts: list[CompletedPartTypeDef] = field(default_factory=list)
    copied_bytes: int = 0

    def reserve(self) -> int:
        """The first number for the parts of a copy about to be sent. stream-zip prepares an entry while
        the end of the previous one may still be on its way to the assembler: a copy the assembler has
        not passed yet holds its numbers all the same."""
        taken = max([self.last_number, *(hole.last for hole in self.holes)])
        return taken + NUMBERING_SLACK + 1

    def number_streamed(self) -> int:
        number = self.last_number + 1
        if self.holes and number >= self.holes[0].first:
            raise RuntimeError(f"streamed part {number} would overwrite copied part {self.holes[0].first}")
        self.last_number = number
        return number

    def passed(self, hole: Hole) -> None:
        self.holes.popleft()
        self.last_number = hole.last


@dataclass(frozen=True)
class CopiedEntry:
    """An entry whose data S3 copied, bar its head: what the zip writer needs to lay it out."""

    crc32: int
    head: list[bytes]
    head_crc32: int
    size: int
    first: int
    last: int
    layout: Layout

    def chunks(self) -> Iterator[bytes]:
        """The entry's data as stream-zip sees it: the head, then stand-ins the assembler drops. Runs
        when stream-zip starts the data, by which time the assembler has taken every byte before it."""
        start = self.layout.position + HEAD_BYTES
        self.layout.holes.append(
            Hole(start=start, end=start + self.size - HEAD_BYTES, first=self.first, last=self.last)
        )
        yield from self.head
        yield from stand_in(self.size - HEAD_BYTES, self.head_crc32, self.crc32)


def stand_in(length: int, crc_before: int, crc_after: int) -> Iterator[bytes]:
    """`length` bytes taking a CRC-32 from `crc_before` to `crc_after`: zeros, then four forged bytes."""
    zeros = length - 4
    forged = crc.forge(crc.combine(crc_before, crc.of_zeros(zeros), zeros), crc_after)
    whole, rest = divmod(zeros, len(STAND_IN))
    for _ in range(whole):
        yield STAND_IN
    yield bytes(rest) + forged


def copy_ranges(size: int, *, part_size: int, concurrency: int) -> list[tuple[int, int]]:
    """The object's bytes after its head, cut evenly into parts of at least `part_size` and at least a
    `concurrency`-th of them (so they copy in parallel), each under S3's 5 GiB."""
    length = size - HEAD_BYTES
    piece = min(MAX_COPY_PIECE, max(part_size, -(-length // concurrency)))
    count = max(1, length // piece)
    bounds = [HEAD_BYTES + length * index // count for index in range(count + 1)]
    return list(itertools.pairwise(bounds))


class CopyRejected(Exception):
    """The server refused UploadPartCopy for a reason other than the source changing."""


@retry_transient
def _copy_part(
    s3: S3Client, target: UploadTarget, number: int, obj: SourceObject, start: int, end: int
) -> CopyPartResultTypeDef:
    try:
        response = s3.upload_part_copy(
            Bucket=target.bucket,
            Key=target.key,
            UploadId=target.upload_id,
            PartNumber=number,
            CopySource={"Bucket": obj.ref.bucket, "Key": obj.ref.key},
            CopySourceRange=f"bytes={start}-{end - 1}",
            CopySourceIfMatch=obj.etag,
        )
    except botocore.exceptions.ClientError as exc:
        if http_status(exc) in (404, 412) or error_code(exc) in ("NoSuchKey", "PreconditionFailed"):
            raise TransientError(f"{obj.ref.source} changed while being archived") from None
        if http_status(exc) == 501 or not is_transient(exc):
            raise CopyRejected(error_code(exc) or str(http_status(exc))) from exc
        raise
    return response["CopyPartResult"]


class Copier:
    """Copies the data of big STORED entries into the upload, one entry at a time as the zip writer
    reaches it, its parts in parallel. Which entries are offered is the caller's choice
    (job.plan_copies); the copier only declines what this server has shown it cannot do."""

    def __init__(
        self,
        s3: S3Client,
        layout: Layout,
        *,
        part_size: int,
        concurrency: int,
        cancelled: Callable[[], bool],
    ) -> None:
        self._s3, self._layout, self._cancelled = s3, layout, cancelled
        self._part_size, self._concurrency = part_size, concurrency
        self._pool = ThreadPoolExecutor(max_workers=concurrency + 1, thread_name_prefix="copy")
        self.rejected = False  # the server refused a copy: this job streams the rest
        self.unchecksummed = False  # copies came back without checksums: objects without a CRC stream

    def wants(self, obj: SourceObject) -> bool:
        return not self.rejected and (obj.crc32 is not None or not self.unchecksummed)

    def copy(self, obj: SourceObject) -> CopiedEntry | None:
        """Copy the object's data after its head into the upload; None when it must be streamed."""
        if not self.wants(obj) or self._layout.upload is None:
            return None
        target = self._layout.upload
        ranges = copy_ranges(obj.size, part_size=self._part_size, concurrency=self._concurrency)
        first = self._layout.reserve()
        last = first + len(ranges) - 1
        if last > MAX_PARTS:
            return None
        head = self._pool.submit(lambda: list(read_source(self._s3, obj, end=HEAD_BYTES)))
        copies = [
            self._pool.submit(_copy_part, self._s3, target, number, obj, start, end)
            for number, (start, end) in enumerate(ranges, first)
        ]
        # Every copy must have finished, one way or the other, before its number can be reused.
        started: list[Future[Any]] = [head, *copies]
        self._wait(started)
        if not self._all_copied(started, obj):
            return None
        head_chunks = head.result()
        head_crc = crc.of(head_chunks)
        results = [future.result() for future in copies]
        part_crcs = [crc.from_base64(result.get("ChecksumCRC32")) for result in results]
        entry_crc = obj.crc32
        if all(value is not None for value in part_crcs):
            pieces = [
                (value or 0, end - start) for value, (start, end) in zip(part_crcs, ranges, strict=True)
            ]
            copied_crc = crc.joined([(head_crc, HEAD_BYTES), *pieces])
            if entry_crc is not None and copied_crc != entry_crc:
                # CopySourceIfMatch held the ETag, so these are the bytes S3 described: its CRC-32 was
                # not theirs. The parts' own checksums are the bytes' (and the next delivery would see
                # the same disagreement, so failing would only loop).
                log.warning("source.crc_mismatch", source=obj.ref.source)
            entry_crc = copied_crc
        if entry_crc is None:
            self.unchecksummed = True
            log.info("copy.no_checksums", source=obj.ref.source)
            return None
        for number, result in enumerate(results, first):
            part: CompletedPartTypeDef = {"PartNumber": number, "ETag": result["ETag"]}
            if "ChecksumCRC32" in result:
                part["ChecksumCRC32"] = result["ChecksumCRC32"]
            self._layout.copied_parts.append(part)
        self._layout.copied_bytes += obj.size - HEAD_BYTES
        log.debug("copy.done", source=obj.ref.source, parts=len(ranges), bytes=obj.size - HEAD_BYTES)
        return CopiedEntry(
            crc32=entry_crc,
            head=head_chunks,
            head_crc32=head_crc,
            size=obj.size,
            first=first,
            last=last,
            layout=self._layout,
        )

    def _wait(self, futures: Sequence[Future[Any]]) -> None:
        """Until every copy has finished, or the job is stopped: a shutdown must not wait for S3 to copy
        gigabytes. The copies left running then fail against the aborted upload."""
        pending: set[Future[Any]] = set(futures)
        while pending:
            _, pending = wait(pending, timeout=CANCEL_POLL)
            if pending and self._cancelled():
                for future in pending:
                    future.cancel()
                raise JobAbandoned("the job was stopped while its sources were being copied")

    def _all_copied(self, futures: Sequence[Future[Any]], obj: SourceObject) -> bool:
        """False when the server refused a copy (this job then streams); other errors are raised."""
        errors = [error for error in (future.exception() for future in futures) if error is not None]
        for error in errors:
            if not isinstance(error, CopyRejected):
                raise error
        if errors:
            self.rejected = True
            log.warning("copy.rejected", source=obj.ref.source, error=str(errors[0]))
            return False
        return True

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
