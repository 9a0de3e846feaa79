"""One request's archive: its sources HEADed and checked, then zipped and uploaded, ending in the
completed notification. The worker around it decides what happens to the message."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING
from urllib.parse import quote

import structlog

from archiver import notify
from archiver.assembly import CopiedEntry, Copier, copier_threads, plan_copies
from archiver.aws import AwsClients
from archiver.errors import ChecksumMismatch, PermanentError
from archiver.models import (
    ArchiveInfo,
    ArchivePlan,
    CompletedNotification,
    SkippedSource,
)
from archiver.multipart import MultipartUpload, UploadedObject, upload_threads
from archiver.prefetch import Prefetcher
from archiver.settings import Settings
from archiver.sources import SourceObject, head_sources, read_source
from archiver.status import Progress
from archiver.zipping import ZipEntry, zip_chunks

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = structlog.get_logger(__name__)

HEAD_CONCURRENCY = 8  # HEADs at once, and readers of small sources ahead of the zip writer
# S3 calls a worker makes outside the job's thread pools: the job's own, the heartbeat's lease renewals,
# status writes, and one spare.
OTHER_S3_CALLERS = 4


def s3_connections(settings: Settings) -> int:
    """Connections the S3 client's pool needs so no thread waits for one: part uploads, copies (and the
    lead read beside them), HEADs or read-ahead, and the rest."""
    return (
        upload_threads(settings.upload_concurrency)
        + copier_threads(settings.upload_concurrency)
        + HEAD_CONCURRENCY
        + OTHER_S3_CALLERS
    )


@dataclass(frozen=True)
class Resolved:
    """A plan checked against what the HEADs found: the entries to archive and the sources skipped."""

    entries: list[ZipEntry]
    missing: list[str]
    total_bytes: int


def resolve_entries(
    plan: ArchivePlan, objects: Sequence[SourceObject | None], *, max_archive_bytes: int
) -> Resolved:
    """The plan's entries whose source exists, or the permanent failure a request gets before any
    upload: a missing source with `on_missing: fail`, no source at all, more bytes than allowed."""
    missing = [entry.ref.source for entry, obj in zip(plan.entries, objects, strict=True) if obj is None]
    if missing and plan.request.on_missing == "fail":
        shown_missing = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise PermanentError("source_not_found", f"{len(missing)} source(s) not found: {shown_missing}")
    entries = [
        ZipEntry(path=entry.path, source=obj) for entry, obj in zip(plan.entries, objects, strict=True) if obj
    ]
    if not entries:
        raise PermanentError("source_not_found", "none of the sources exists")
    total = sum(entry.source.size for entry in entries)
    if total > max_archive_bytes:
        raise PermanentError(
            "too_large", f"the sources add up to {total} bytes; MAX_ARCHIVE_BYTES is {max_archive_bytes}"
        )
    return Resolved(entries=entries, missing=missing, total_bytes=total)


def build_archive(
    clients: AwsClients,
    settings: Settings,
    plan: ArchivePlan,
    *,
    progress: Progress,
    abandoned: Callable[[], bool],
    confirm: Callable[[], None] = lambda: None,
) -> CompletedNotification:
    """HEAD every source, check what must fail before any upload, then stream the archive to S3 and
    describe it in the completed notification. Progress is counted as source bytes are written;
    `confirm` runs before the upload is completed and may stop it by raising."""
    objects = head_sources(clients.s3, [entry.ref for entry in plan.entries], concurrency=HEAD_CONCURRENCY)
    resolved = resolve_entries(plan, objects, max_archive_bytes=settings.max_archive_bytes)
    entries = resolved.entries
    progress.files_total, progress.bytes_total = len(entries), resolved.total_bytes
    upload = functools.partial(
        _upload_archive, clients.s3, settings, plan, progress=progress, abandoned=abandoned, confirm=confirm
    )
    try:
        uploaded = upload(entries)
    except ChecksumMismatch as exc:
        # A CRC-32 S3 called the object's is not: this server's are not to be trusted, and the next
        # delivery would fail the same way. Start over in this attempt, computing every CRC here.
        log.warning("source.crc_mismatch", source=exc.source)
        entries = [replace(entry, source=replace(entry.source, crc32=None)) for entry in entries]
        progress.files_done = progress.bytes_done = 0
        uploaded = upload(entries)
    progress.bytes_copied = uploaded.apart_bytes
    log.info(
        "archive.assembled",
        bytes=uploaded.size,
        copied_bytes=uploaded.apart_bytes,
        streamed_bytes=uploaded.size - uploaded.apart_bytes,
    )
    kept = {entry.path for entry in entries}
    return notify.completed(
        request_id=plan.request_id,
        archive=ArchiveInfo(
            bucket=uploaded.bucket,
            key=uploaded.key,
            url=notify.archive_url(clients.presign, settings, bucket=uploaded.bucket, key=uploaded.key),
            size=uploaded.size,
            entries=len(entries),
        ),
        skipped=[SkippedSource(source=source, reason="not_found") for source in resolved.missing],
        renamed=[renamed for renamed in plan.renamed if renamed.name in kept],
        metadata=plan.request.metadata,
    )


def _upload_archive(
    s3: S3Client,
    settings: Settings,
    plan: ArchivePlan,
    entries: list[ZipEntry],
    *,
    progress: Progress,
    abandoned: Callable[[], bool],
    confirm: Callable[[], None],
) -> UploadedObject:
    """Zip `entries` into the archive's multipart upload, copying big uncompressed ones inside S3."""
    compression = plan.request.compression
    copyable, part_size = plan_copies(entries, settings, compression)
    archive_name = plan.key.rsplit("/", 1)[-1]
    with MultipartUpload.create(
        s3,
        bucket=plan.bucket,
        key=plan.key,
        metadata={"request-id": plan.request_id, "entries": str(len(entries))},
        content_disposition=f"attachment; filename*=UTF-8''{quote(archive_name)}",
    ) as upload:
        copier = Copier(
            upload, part_size=part_size, concurrency=settings.upload_concurrency, abandoned=abandoned
        )
        prefetcher = Prefetcher(
            [entry.source for entry in entries],
            read=lambda obj: read_source(s3, obj),
            window_bytes=settings.prefetch_bytes,
            workers=HEAD_CONCURRENCY,
            skip=copyable,
        )

        def copy(index: int, obj: SourceObject) -> CopiedEntry | None:
            copied = copier.copy(obj) if index in copyable else None
            if copied is not None:
                progress.bytes_done += obj.size
                progress.files_done += 1
            return copied

        def counted(index: int, obj: SourceObject) -> Iterator[bytes]:
            for chunk in prefetcher.open(index):
                progress.bytes_done += len(chunk)
                yield chunk
            progress.files_done += 1

        try:
            chunks = zip_chunks(entries, open_source=counted, compression=compression, copy=copy)
            upload.write(
                chunks, part_size=part_size, concurrency=settings.upload_concurrency, abandoned=abandoned
            )
        finally:
            prefetcher.close()
            copier.close()
        return upload.complete(confirm=confirm)
