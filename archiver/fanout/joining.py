"""A coordinator's last step: every segment recorded, their ends joined into parts of at least S3's
5 MiB, the central directory moved into place after them, and the upload completed."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING

import botocore.exceptions
import structlog

from archiver import checksums
from archiver.aws import AwsClients, http_status, retry_transient
from archiver.fanout.directory import end_records, needs_zip64, relocate
from archiver.fanout.layout import Segment
from archiver.fanout.segment import SegmentResult
from archiver.fanout.store import Store, StoredPlan, get_bytes, head_name, tail_name
from archiver.job import archive_metadata
from archiver.models import ArchivePlan
from archiver.multipart import MultipartUpload, UploadedObject, completed_part
from archiver.settings import MIN_PART_SIZE

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

log = structlog.get_logger(__name__)


def complete(
    clients: AwsClients,
    plan: ArchivePlan,
    store: Store,
    stored: StoredPlan,
    results: list[SegmentResult],
    *,
    confirm: Callable[[], None],
) -> UploadedObject:
    """Join the segments' ends into parts, append the central directory, complete the upload.
    `results` are the segments' records in the plan's order."""
    segments = stored.segments
    upload = MultipartUpload(
        clients.s3,
        bucket=plan.bucket,
        key=plan.key,
        upload_id=stored.upload_id,
        metadata=archive_metadata(plan, int(stored.document["entries"])),
    )
    parts, pending = _joined(upload, store, segments, results)
    directory, offset, zip64 = bytearray(), 0, False
    for result in results:
        directory += relocate(result.directory, offset)
        zip64 = zip64 or needs_zip64(result.directory)
        offset += result.length
    ends = end_records(count=sum(r.count for r in results), size=len(directory), start=offset, zip64=zip64)
    pending += directory + ends
    parts.append(upload.upload_part(int(stored.document["final_part"]), pending))
    upload.add_parts(parts, apart_bytes=sum(result.copied_bytes for result in results))
    upload.ledger.position = offset + len(directory) + len(ends)
    uploaded = upload.complete(confirm=confirm)
    uploaded = _with_checksums(uploaded, stored, results, bytes(directory + ends))
    log.info("fanout.completed", segments=len(segments), parts=len(parts), bytes=uploaded.size)
    return uploaded


def _with_checksums(
    uploaded: UploadedObject, stored: StoredPlan, results: list[SegmentResult], directory: bytes
) -> UploadedObject:
    """The archive's CRC-32, and its checksum in the plan's algorithm, joined from its segments' (each
    worker's, of its own stream) and the directory's: S3 has none, the upload having no part checksums."""
    crc32 = _archive_checksum(checksums.CRC32, [r.crc32 for r in results], results, directory)
    algorithm = stored.algorithm
    value = (
        crc32
        if algorithm is checksums.CRC32
        else _archive_checksum(algorithm, [r.checksum for r in results], results, directory)
    )
    return replace(
        uploaded,
        crc32=crc32,
        checksum=None if value is None else algorithm.encode(value),
        checksum_algorithm=None if value is None else algorithm.name,
        s3_verified=False,
    )


def _archive_checksum(
    algorithm: checksums.Algorithm,
    values: list[int | None],
    results: list[SegmentResult],
    directory: bytes,
) -> int | None:
    """The archive's checksum from the segments' `values` and the directory's; None when a segment's
    record has none (written by an older archiver, or by a worker that could not compute it)."""
    pieces = [
        (value, result.length) for value, result in zip(values, results, strict=True) if value is not None
    ]
    if len(pieces) < len(results):
        return None
    return algorithm.joined([*pieces, (algorithm.of(directory), len(directory))])


def _joined(
    upload: MultipartUpload, store: Store, segments: list[Segment], results: list[SegmentResult]
) -> tuple[list[CompletedPartTypeDef], bytearray]:
    """Every segment's parts, its head copied in (in parallel) or joined to what precedes it (a
    previous tail, small segments) into a part of at least 5 MiB; and what is left for the last part."""
    parts: list[CompletedPartTypeDef] = []
    pending = bytearray()
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="join") as pool:
        copies = []
        for segment, result in zip(segments, results, strict=True):
            head = head_name(segment.index)
            if not pending and result.head_size >= MIN_PART_SIZE:
                copies.append(pool.submit(_copy_in, upload, segment.first_part, store.key(head)))
            else:
                pending += store.read_bytes(head)
                if len(pending) >= MIN_PART_SIZE:
                    parts.append(upload.upload_part(segment.first_part, pending))
                    pending = bytearray()
                elif result.parts or result.tail_size:
                    raise RuntimeError(f"segment {segment.index}: a head under 5 MiB with parts after it")
            parts.extend(result.parts)
            if result.tail_size:
                pending += store.read_bytes(tail_name(segment.index))
        parts.extend(future.result() for future in copies)
    return parts, pending


@retry_transient
def _copy_in(upload: MultipartUpload, number: int, key: str) -> CompletedPartTypeDef:
    """A segment's head, a temporary object, copied into the upload as its part inside S3; fetched and
    uploaded where the server does not copy (501)."""
    try:
        result = upload.copy_part(number, {"Bucket": upload.bucket, "Key": key})
    except botocore.exceptions.ClientError as exc:
        if http_status(exc) != 501:
            raise
        return upload.upload_part(number, get_bytes(upload.s3, upload.bucket, key))
    return completed_part(number, result, checksummed=upload.checksummed)
