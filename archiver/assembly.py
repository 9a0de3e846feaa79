"""Server-side assembly: the data of big STORED entries copied inside S3 (UploadPartCopy), never through
the worker.

A STORED entry's data is its source object's bytes, so S3 can copy them into the archive's multipart
upload itself. The worker streams everything else: local headers, small or deflated entries, the central
directory, and the first LEAD_BYTES of each copied object (its lead), which make the part that ends where
a copy begins at least S3's 5 MiB minimum. The ZIP layout stays stream-zip's: it is told each copied entry's
size and CRC like any STORED entry and is fed stand-in bytes for the copied range (zeros, then four bytes
that give the whole the entry's CRC, which stream-zip checks), and the part assembler (multipart.parts_of)
drops those. So the archive is byte for byte the one streaming would write for the same entries.

Part numbers: a copy is sent while stream-zip prepares the entry's local header, because the header needs
the CRC, which without a full-object CRC from S3 comes from the copied parts' own checksums. The copied
parts take the numbers right after the part being filled (the upload's `PartLedger.reserve`), which then
runs on to where the copy starts: S3 completes an upload with part checksums only if its numbers have no
gaps. A fan-out upload has no part checksums (its segments leave gaps), so it copies only sources with
S3's full-object CRC-32.

Fallback: a server that rejects UploadPartCopy, or answers without the part checksums an object without
its own CRC needs, gets that entry streamed instead, and this job streams the rest that would fail the
same way; parts already copied under numbers the stream then reuses are overwritten, the others are left
out of CompleteMultipartUpload, which discards them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import botocore.exceptions
import structlog

from archiver import checksums, crc
from archiver.aws import error_code, http_status, is_transient, retry_transient
from archiver.errors import JobAbandoned, TransientError, archive_too_large
from archiver.multipart import MultipartUpload, choose_part_size, completed_part
from archiver.parts import RESERVE_GAP, Hole, PartLedger
from archiver.settings import MAX_PARTS, MIN_PART_SIZE, MiB, Settings
from archiver.sources import SourceObject, read_source
from archiver.zipping import (
    DEFLATE_LEVEL,
    ENTRY_OVERHEAD,
    Compression,
    ZipEntry,
    archive_size_bound,
    deflate_bound,
    is_uncompressed,
)

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef, CopyPartResultTypeDef

log = structlog.get_logger(__name__)

# Streamed from the start of each copied object: the part ending where its copy begins holds these bytes
# plus whatever came before, so it is never under S3's minimum part size.
LEAD_BYTES = MIN_PART_SIZE
# Copied parts are cut evenly into pieces of [piece, 2 x piece): at most 2.5 GiB keeps them under S3's
# 5 GiB. Archives whose part size is bigger are not copied (plan_copies), so copies never take more part
# numbers than streaming the same bytes would.
MAX_COPY_PIECE = 2560 * MiB
# Numbers a copied entry may take beyond streaming the same bytes: the gap reserved before its copy, the
# part cut short where the copy starts, and one for rounding.
COPY_EXTRA_PARTS = RESERVE_GAP + 2
STAND_IN = bytes(64 * 1024)
CANCEL_POLL = 1.0  # seconds between looks at the job's stop flag while copies run


@dataclass(frozen=True)
class CopiedEntry:
    """An entry whose data S3 copied, bar its lead: what the zip writer needs to lay it out (it is the
    zipping.CopiedData the writer asks for)."""

    crc32: int
    lead: list[bytes]
    lead_crc32: int
    size: int
    first: int
    last: int
    ledger: PartLedger
    # Stream bytes written before this entry's data: the assembler's position when it reads the zip
    # stream itself (it has taken every byte before the data by then), or a count kept upstream of it.
    position: Callable[[], int]

    def chunks(self) -> Iterator[bytes]:
        """The entry's data as stream-zip sees it: the lead, then stand-ins the assembler drops. Runs
        when stream-zip starts the data, once every byte before it is written."""
        start = self.position() + LEAD_BYTES
        self.ledger.add_hole(
            Hole(start=start, end=start + self.size - LEAD_BYTES, first=self.first, last=self.last)
        )
        yield from self.lead
        yield from stand_in(self.size - LEAD_BYTES, self.lead_crc32, self.crc32)


def stand_in(length: int, crc_before: int, crc_after: int) -> Iterator[bytes]:
    """`length` bytes taking a CRC-32 from `crc_before` to `crc_after`: zeros, then four forged bytes."""
    zeros = length - 4
    forged = crc.forge(crc.combine(crc_before, crc.of_zeros(zeros), zeros), crc_after)
    whole, rest = divmod(zeros, len(STAND_IN))
    for _ in range(whole):
        yield STAND_IN
    yield bytes(rest) + forged


def copy_ranges(size: int, *, part_size: int, concurrency: int) -> list[tuple[int, int]]:
    """The object's bytes after its lead, cut evenly into parts of at least `part_size` and at least a
    `concurrency`-th of them (so they copy in parallel), each under S3's 5 GiB."""
    length = size - LEAD_BYTES
    piece = min(MAX_COPY_PIECE, max(part_size, -(-length // concurrency)))
    count = max(1, length // piece)
    bounds = [LEAD_BYTES + length * index // count for index in range(count + 1)]
    return list(itertools.pairwise(bounds))


def _completed_parts(
    results: list[CopyPartResultTypeDef], first: int, upload: MultipartUpload
) -> list[CompletedPartTypeDef]:
    return [
        completed_part(number, result, checksummed=upload.checksummed, field=upload.algorithm.field)
        for number, result in enumerate(results, first)
    ]


def _archive_checksums_known(upload: MultipartUpload, results: list[CopyPartResultTypeDef]) -> bool:
    """Whether the copied parts came back with the checksums the archive's is joined from: needed on an
    upload whose algorithm is not CRC-32 (that one counts a copy through its stand-in instead)."""
    algorithm = upload.algorithm
    if not upload.checksummed or algorithm is checksums.CRC32:
        return True
    return all(algorithm.decode(result.get(algorithm.field)) is not None for result in results)


class CopyRejected(Exception):
    """The server refused UploadPartCopy for a reason other than the source changing."""


@retry_transient
def _copy_part(
    upload: MultipartUpload, number: int, obj: SourceObject, start: int, end: int
) -> CopyPartResultTypeDef:
    try:
        return upload.copy_part(
            number,
            {"Bucket": obj.ref.bucket, "Key": obj.ref.key},
            CopySourceRange=f"bytes={start}-{end - 1}",
            CopySourceIfMatch=obj.etag,
        )
    except botocore.exceptions.ClientError as exc:
        if http_status(exc) in (404, 412) or error_code(exc) in ("NoSuchKey", "PreconditionFailed"):
            raise TransientError(f"{obj.ref.source} changed while being archived") from None
        if http_status(exc) == 501 or not is_transient(exc):
            raise CopyRejected(error_code(exc) or str(http_status(exc))) from exc
        raise


def copier_threads(concurrency: int) -> int:
    """One per copied part in flight, and one for the lead read beside them."""
    return concurrency + 1


class Copier:
    """Copies the data of big STORED entries into the upload, one entry at a time as the zip writer
    reaches it, its parts in parallel. Which entries are offered is the caller's choice (plan_copies);
    the copier only declines what this server has shown it cannot do."""

    def __init__(
        self,
        upload: MultipartUpload,
        *,
        part_size: int,
        concurrency: int,
        abandoned: Callable[[], bool],
        position: Callable[[], int] | None = None,
    ) -> None:
        self._upload, self._abandoned = upload, abandoned
        self._position = position or (lambda: upload.ledger.position)
        self._part_size, self._concurrency = part_size, concurrency
        self._pool = ThreadPoolExecutor(max_workers=copier_threads(concurrency), thread_name_prefix="copy")
        self.rejected = False  # the server refused a copy: this job streams the rest
        self.unchecksummed = False  # copies came back without checksums: objects without a CRC stream

    def wants(self, obj: SourceObject) -> bool:
        """Without part checksums (a fan-out upload's, or a server that leaves them out) the entry's CRC
        can only be S3's full-object CRC-32 of the source. So too on an upload whose checksum is not
        CRC-32: its copied parts' checksums are in that algorithm, and join the archive's, so a server
        that leaves them out gets no more copies at all."""
        upload = self._upload
        if self.rejected:
            return False
        if upload.checksummed and upload.algorithm is not checksums.CRC32:
            return obj.crc32 is not None and not self.unchecksummed
        return obj.crc32 is not None or not (self.unchecksummed or not upload.checksummed)

    def copy(self, obj: SourceObject) -> CopiedEntry | None:
        """Copy the object's data after its lead into the upload; None when it must be streamed."""
        if not self.wants(obj):
            return None
        upload = self._upload
        ranges = copy_ranges(obj.size, part_size=self._part_size, concurrency=self._concurrency)
        first = upload.ledger.reserve(len(ranges))
        last = first + len(ranges) - 1
        copied = None
        try:
            if last <= MAX_PARTS:
                copied = self._copied(obj, first, last, ranges)
        finally:
            if copied is None:
                # The stream numbers on through the reserved numbers, which must not be left as a gap.
                upload.ledger.release()
        return copied

    def _copied(
        self, obj: SourceObject, first: int, last: int, ranges: list[tuple[int, int]]
    ) -> CopiedEntry | None:
        upload, s3 = self._upload, self._upload.s3
        lead = self._pool.submit(lambda: list(read_source(s3, obj, end=LEAD_BYTES)))
        copies = [
            self._pool.submit(_copy_part, upload, number, obj, start, end)
            for number, (start, end) in enumerate(ranges, first)
        ]
        # Every copy must have finished, one way or the other, before its number can be reused.
        started: list[Future[Any]] = [lead, *copies]
        self._wait(started)
        if not self._all_copied(started, obj):
            return None
        lead_chunks = lead.result()
        lead_crc = crc.of(lead_chunks)
        results = [future.result() for future in copies]
        entry_crc = self._entry_crc(obj, lead_crc, results, ranges)
        if entry_crc is None or not _archive_checksums_known(upload, results):
            self.unchecksummed = True
            log.info("copy.no_checksums", source=obj.ref.source)
            return None
        upload.add_parts(
            _completed_parts(results, first, upload),
            apart_bytes=obj.size - LEAD_BYTES,
            lengths=[end - start for start, end in ranges],
        )
        log.debug("copy.done", source=obj.ref.source, parts=len(ranges), bytes=obj.size - LEAD_BYTES)
        return CopiedEntry(
            crc32=entry_crc,
            lead=lead_chunks,
            lead_crc32=lead_crc,
            size=obj.size,
            first=first,
            last=last,
            ledger=upload.ledger,
            position=self._position,
        )

    @staticmethod
    def _entry_crc(
        obj: SourceObject, lead_crc: int, results: list[CopyPartResultTypeDef], ranges: list[tuple[int, int]]
    ) -> int | None:
        """The entry's CRC-32: from the copied parts' checksums where S3 returned them all, else S3's
        full-object CRC-32, else None."""
        part_crcs = [crc.from_base64(result.get("ChecksumCRC32")) for result in results]
        if any(value is None for value in part_crcs):
            return obj.crc32
        pieces = [(value or 0, end - start) for value, (start, end) in zip(part_crcs, ranges, strict=True)]
        copied_crc = crc.joined([(lead_crc, LEAD_BYTES), *pieces])
        if obj.crc32 is not None and copied_crc != obj.crc32:
            # CopySourceIfMatch held the ETag, so these are the bytes S3 described: its CRC-32 was not
            # theirs. The parts' own checksums are the bytes' (and the next delivery would see the same
            # disagreement, so failing would only loop).
            log.warning("source.crc_mismatch", source=obj.ref.source)
        return copied_crc

    def _wait(self, futures: Sequence[Future[Any]]) -> None:
        """Until every copy has finished, or the job is stopped: a shutdown must not wait for S3 to copy
        gigabytes. The copies left running then fail against the aborted upload."""
        pending: set[Future[Any]] = set(futures)
        while pending:
            _, pending = wait(pending, timeout=CANCEL_POLL)
            if pending and self._abandoned():
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


def plan_copies(
    entries: list[ZipEntry], settings: Settings, compression: Compression
) -> tuple[frozenset[int], int]:
    """The entries S3 may copy server-side, and the part size that leaves room for their part numbers.

    None when thousands of big entries would crowd out the streamed parts with their spare numbers, or
    when parts would be over 2.5 GiB (PART_SIZE set so, or an archive of terabytes): copies could then
    take more numbers than streaming, and the part ending where a copy starts (part size + 5 MiB) could
    pass S3's 5 GiB."""
    least = settings.server_side_copy_min_bytes
    copyable = frozenset(
        index
        for index, entry in enumerate(entries)
        if least and entry.source.size >= least and is_uncompressed(entry, compression)
    )
    if len(copyable) * COPY_EXTRA_PARTS > MAX_PARTS // 2:
        copyable = frozenset()
    bound = archive_size_bound(entries)
    part_size = choose_part_size(bound, settings.part_size, extra_parts=COPY_EXTRA_PARTS * len(copyable))
    if part_size > MAX_COPY_PIECE:
        return frozenset(), choose_part_size(bound, settings.part_size)
    return copyable, part_size


class Replan(Exception):
    """What the job learnt while reading no longer fits the plan it started with (the archive outgrew
    its part size, or a source is missing under `on_missing: skip`): start over with every source HEADed
    first."""


class PartBudget:
    """The part size of an archive and the entries S3 copies, for sources whose sizes are learnt as they
    are read (each from its GET, or its HEAD once the GET showed it big).

    Before the upload starts, a source not seen yet counts as `small_limit` bytes (the most one GET reads
    ahead; a bigger source is HEADed), and the whole archive as no more than MAX_ARCHIVE_BYTES allows. As
    each source is seen, its real size replaces that guess; MAX_ARCHIVE_BYTES is checked on the sizes
    seen, and an uncompressed source of SERVER_SIDE_COPY_MIN_BYTES or more is copied if the part numbers
    its copy may need fit. An archive that no longer fits S3's 10,000 parts of the chosen size raises
    `Replan`. Sources known from HEADs (`known`) keep plan_copies' choice."""

    def __init__(self, settings: Settings, compression: Compression, *, bound: int, cap: int) -> None:
        self._settings, self._compression = settings, compression
        self._bound, self._cap = bound, cap  # the archive's size bound, and the most MAX_ARCHIVE_BYTES allows
        self.part_size = choose_part_size(min(bound, cap), settings.part_size)
        self.copyable: set[int] = set()  # plan indexes of the entries S3 copies
        self.known_bytes = 0  # source bytes seen so far
        self._spares = 0  # part numbers set aside for copies
        self._guess = 0  # what each unseen source counts for in the bound
        self._fixed = False  # every size was known before the upload (plan_copies decided)
        self._planned_copies: frozenset[int] = frozenset()  # plan_copies' choice, by archive position

    @classmethod
    def unknown(
        cls, paths: list[str], settings: Settings, compression: Compression, *, small_limit: int
    ) -> PartBudget:
        overhead = 22 + 56 + 20 + sum(2 * (len(path.encode("utf-8")) + ENTRY_OVERHEAD) for path in paths)
        guess = deflate_bound(small_limit, DEFLATE_LEVEL)
        # The sum of deflate bounds is at most the bound of the sum plus its constant once per entry.
        cap = overhead + deflate_bound(settings.max_archive_bytes, DEFLATE_LEVEL) + 1024 * len(paths)
        budget = cls(settings, compression, bound=overhead + guess * len(paths), cap=cap)
        budget._guess = guess
        return budget

    @classmethod
    def known(cls, entries: list[ZipEntry], settings: Settings, compression: Compression) -> PartBudget:
        copyable, part_size = plan_copies(entries, settings, compression)
        bound = archive_size_bound(entries)
        budget = cls(settings, compression, bound=bound, cap=bound)
        budget.part_size, budget._fixed = part_size, True
        budget.known_bytes = sum(entry.source.size for entry in entries)
        budget._planned_copies = copyable
        return budget

    def admit(self, index: int, position: int, entry: ZipEntry) -> None:
        """Entry `position` of the archive (plan entry `index`) has been seen: check the limits, and
        decide whether S3 copies it."""
        if self._fixed:
            if position in self._planned_copies:
                self.copyable.add(index)
            return
        size = entry.source.size
        self.known_bytes += size
        if self.known_bytes > self._settings.max_archive_bytes:
            raise archive_too_large(self._settings.max_archive_bytes)
        self._bound += deflate_bound(size, DEFLATE_LEVEL) - self._guess
        if self._copies(entry) and self._fits(self._spares + COPY_EXTRA_PARTS):
            self.copyable.add(index)
            self._spares += COPY_EXTRA_PARTS
        if not self._fits(self._spares):
            raise Replan(f"an archive of up to {self._bound} bytes outgrew {self.part_size}-byte parts")

    def _copies(self, entry: ZipEntry) -> bool:
        least = self._settings.server_side_copy_min_bytes
        return (
            bool(least)
            and entry.source.size >= least
            and is_uncompressed(entry, self._compression)
            and self.part_size <= MAX_COPY_PIECE
            and (len(self.copyable) + 1) * COPY_EXTRA_PARTS <= MAX_PARTS // 2
        )

    def _fits(self, spares: int) -> bool:
        return -(-min(self._bound, self._cap) // (MAX_PARTS - spares)) <= self.part_size
