"""One request's archive: its body read (following extended-client pointers), its sources HEADed
and checked, then zipped and uploaded, ending in the completed notification. The worker around it
decides what happens to the message."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import botocore.exceptions
import structlog

from archiver import notify
from archiver.assembly import MAX_COPY_PIECE, NUMBERING_SLACK, CopiedEntry, Copier, Layout
from archiver.aws import AwsClients, http_status, retry_transient
from archiver.errors import ChecksumMismatch, PermanentError, shown
from archiver.models import (
    ArchiveInfo,
    ArchivePlan,
    CompletedNotification,
    SkippedSource,
    decode_body,
    extended_client_pointer,
)
from archiver.multipart import UploadedObject, choose_part_size, upload_stream
from archiver.prefetch import Prefetcher
from archiver.settings import MAX_PARTS, Settings
from archiver.sources import SourceObject, head_sources, read_source
from archiver.status import Progress
from archiver.zipping import Compression, ZipEntry, archive_size_bound, is_uncompressed, zip_chunks

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = structlog.get_logger(__name__)

HEAD_CONCURRENCY = 8  # HEADs at once, and readers of small sources ahead of the zip writer
MAX_POINTER_BYTES = 64 * 1024 * 1024  # an offloaded request of 50,000 files is a few MiB
# Numbers a copied entry may take beyond streaming the same bytes: the gap before its copy, the part cut
# short where the copy starts, and one for rounding.
COPY_EXTRA_PARTS = NUMBERING_SLACK + 2


def load_document(s3: S3Client, settings: Settings, body: str) -> Any:
    """The decoded request; an extended-client pointer is followed into S3, within the allow-list."""
    document = decode_body(body)
    pointer = extended_client_pointer(document)
    if pointer is None:
        return document
    bucket, key = pointer
    if bucket not in settings.source_buckets:
        raise PermanentError(
            "forbidden_source", f"request pointer names bucket {shown(bucket)}, which is not allowed"
        )
    return decode_body(_read_pointer(s3, bucket, key))


@retry_transient
def _read_pointer(s3: S3Client, bucket: str, key: str) -> str:
    try:
        response = s3.get_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as exc:
        where = f"request pointer s3://{bucket}/{key}"
        if http_status(exc) == 404:
            raise PermanentError("invalid_request", f"{where} does not exist") from None
        if http_status(exc) == 403:
            raise PermanentError("forbidden_source", f"access denied to {where}") from None
        raise
    if response["ContentLength"] > MAX_POINTER_BYTES:
        raise PermanentError(
            "too_large", f"request body in s3://{bucket}/{key} is over {MAX_POINTER_BYTES} bytes"
        )
    return response["Body"].read().decode("utf-8", errors="replace")


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


def build_archive(
    clients: AwsClients,
    settings: Settings,
    plan: ArchivePlan,
    *,
    progress: Progress,
    cancelled: Callable[[], bool],
    confirm: Callable[[], None] = lambda: None,
) -> CompletedNotification:
    """HEAD every source, check what must fail before any upload, then stream the archive to S3 and
    describe it in the completed notification. Progress is counted as source bytes are written;
    `confirm` runs before the upload is completed and may stop it by raising."""
    s3 = clients.s3
    objects = head_sources(s3, [entry.ref for entry in plan.entries], concurrency=HEAD_CONCURRENCY)
    missing = [entry.ref.source for entry, obj in zip(plan.entries, objects, strict=True) if obj is None]
    if missing and plan.request.on_missing == "fail":
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise PermanentError("source_not_found", f"{len(missing)} source(s) not found: {shown}")
    entries = [
        ZipEntry(path=entry.path, source=obj)
        for entry, obj in zip(plan.entries, objects, strict=True)
        if obj is not None
    ]
    if not entries:
        raise PermanentError("source_not_found", "none of the sources exists")
    total = sum(entry.source.size for entry in entries)
    if total > settings.max_archive_bytes:
        raise PermanentError(
            "too_large",
            f"the sources add up to {total} bytes; MAX_ARCHIVE_BYTES is {settings.max_archive_bytes}",
        )
    progress.files_total, progress.bytes_total = len(entries), total
    try:
        uploaded = _upload_archive(
            clients, settings, plan, entries, progress=progress, cancelled=cancelled, confirm=confirm
        )
    except ChecksumMismatch as exc:
        # A CRC-32 S3 called the object's is not: this server's are not to be trusted, and the next
        # delivery would fail the same way. Start over in this attempt, computing every CRC here.
        log.warning("source.crc_mismatch", source=exc.source)
        entries = [replace(entry, source=replace(entry.source, crc32=None)) for entry in entries]
        progress.files_done = progress.bytes_done = 0
        uploaded = _upload_archive(
            clients, settings, plan, entries, progress=progress, cancelled=cancelled, confirm=confirm
        )
    progress.bytes_copied = uploaded.copied_bytes
    log.info(
        "archive.assembled",
        bytes=uploaded.size,
        copied_bytes=uploaded.copied_bytes,
        streamed_bytes=uploaded.size - uploaded.copied_bytes,
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
        skipped=[SkippedSource(source=source, reason="not_found") for source in missing],
        renamed=[renamed for renamed in plan.renamed if renamed.name in kept],
        metadata=plan.request.metadata,
    )


def _upload_archive(
    clients: AwsClients,
    settings: Settings,
    plan: ArchivePlan,
    entries: list[ZipEntry],
    *,
    progress: Progress,
    cancelled: Callable[[], bool],
    confirm: Callable[[], None],
) -> UploadedObject:
    """Zip `entries` into the archive's multipart upload, copying big uncompressed ones inside S3."""
    s3 = clients.s3
    compression = plan.request.compression
    copyable, part_size = plan_copies(entries, settings, compression)
    layout = Layout()
    copier = Copier(
        s3,
        layout,
        part_size=settings.part_size,
        concurrency=settings.upload_concurrency,
        cancelled=cancelled,
    )
    prefetcher = Prefetcher(
        [entry.source for entry in entries],
        read=lambda obj: read_source(s3, obj),
        window_bytes=settings.prefetch_bytes,
        workers=HEAD_CONCURRENCY,
        skip=copyable,
    )

    def copy(index: int, obj: SourceObject) -> CopiedEntry | None:
        if index not in copyable:
            return None
        copied = copier.copy(obj)
        if copied is not None:
            progress.bytes_done += obj.size
            progress.files_done += 1
        return copied

    def counted(index: int, obj: SourceObject) -> Iterator[bytes]:
        for chunk in prefetcher.open(index):
            progress.bytes_done += len(chunk)
            yield chunk
        progress.files_done += 1

    archive_name = plan.key.rsplit("/", 1)[-1]
    try:
        return upload_stream(
            s3,
            zip_chunks(entries, open_source=counted, compression=compression, copy=copy),
            bucket=plan.bucket,
            key=plan.key,
            part_size=part_size,
            concurrency=settings.upload_concurrency,
            metadata={"request-id": plan.request_id, "entries": str(len(entries))},
            content_disposition=f"attachment; filename*=UTF-8''{quote(archive_name)}",
            cancelled=cancelled,
            layout=layout,
            confirm=confirm,
        )
    finally:
        prefetcher.close()
        copier.close()
