"""S3 source objects: HEAD them all up front, then read each as a lazily opened, resuming byte iterator."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import botocore.exceptions
import structlog

from archiver import crc
from archiver.aws import error_code, http_status, is_transient, retry_transient
from archiver.errors import PermanentError, TransientError
from archiver.models import SourceRef

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = structlog.get_logger(__name__)

READ_CHUNK = 64 * 1024  # stream-zip is fastest fed 64 KiB chunks; botocore's default is 1 KiB
MAX_RESUMES = 5


@dataclass(frozen=True)
class SourceObject:
    """What a HEAD told us about one source; the GET must find the same ETag."""

    ref: SourceRef
    size: int
    etag: str
    last_modified: datetime
    content_type: str
    crc32: int | None  # S3's full-object CRC-32 when the object has one (not a composite checksum)


def full_object_crc32(head: Mapping[str, object]) -> int | None:
    """S3's CRC-32 of the whole object, where S3 documents it as that. An object uploaded in parts (the
    AWS CLI and boto3 do so above 8 MiB) may carry a COMPOSITE checksum instead, a CRC of its parts'
    CRCs: S3 marks it with `ChecksumType` and a `-N` suffix, but moto sends it bare, so without a
    `ChecksumType` the value is trusted only on an object written in one piece (an ETag without a part
    count). Anything else is streamed as an object without a CRC would be."""
    value = head.get("ChecksumCRC32")
    if not isinstance(value, str) or "-" in value:  # "<b64>-<parts>": a checksum of part checksums
        return None
    kind = head.get("ChecksumType")
    if kind is None:
        etag = str(head.get("ETag") or "").strip('"')
        if not etag or "-" in etag:
            return None
    elif kind != "FULL_OBJECT":
        return None
    return crc.from_base64(value)


# Storage classes and Intelligent-Tiering tiers whose objects cannot be read until restored.
ARCHIVE_CLASSES = frozenset({"GLACIER", "DEEP_ARCHIVE"})
ARCHIVE_TIERS = frozenset({"ARCHIVE_ACCESS", "DEEP_ARCHIVE_ACCESS"})


def needs_restore(head: Mapping[str, object]) -> bool:
    """An object in an archive tier that has no finished restore: its GET would answer 403
    InvalidObjectState. (GLACIER_IR, Glacier Instant Retrieval, reads like any other class.)"""
    archived = head.get("StorageClass") in ARCHIVE_CLASSES or head.get("ArchiveStatus") in ARCHIVE_TIERS
    return archived and 'ongoing-request="false"' not in str(head.get("Restore") or "")


def archived_message(source: str) -> str:
    return f"{source} is in an archive storage class and must be restored before it can be archived"


def refused_read(exc: botocore.exceptions.ClientError, source: str) -> PermanentError | None:
    """The permanent error for a 403 on a source's GET or copy, which its HEAD did not foresee: an
    archived object (InvalidObjectState), or one whose KMS key this role may not use (AccessDenied).
    Retrying would get the same answer on every delivery."""
    if http_status(exc) != 403:
        return None
    if error_code(exc) == "InvalidObjectState":
        return PermanentError("source_archived", archived_message(source))
    return PermanentError("forbidden_source", f"access denied reading {source} ({error_code(exc) or 403})")


@retry_transient
def head_source(s3: S3Client, ref: SourceRef) -> SourceObject | None:
    """The object's metadata, or None if it does not exist."""
    try:
        head = s3.head_object(Bucket=ref.bucket, Key=ref.key, ChecksumMode="ENABLED")
    except botocore.exceptions.ClientError as exc:
        status = http_status(exc)
        if status == 404 or error_code(exc) in ("NoSuchKey", "NotFound", "NoSuchBucket"):
            return None
        if status == 403:
            # Without s3:ListBucket, S3 answers 403 for a missing key too: the role must list the bucket
            # for missing sources to be told apart from forbidden ones.
            raise PermanentError("forbidden_source", f"access denied to {ref.source}") from None
        raise
    if needs_restore(head):
        raise PermanentError("source_archived", archived_message(ref.source))
    return SourceObject(
        ref=ref,
        size=int(head["ContentLength"]),
        etag=str(head["ETag"]),
        last_modified=head["LastModified"],
        content_type=str(head.get("ContentType") or ""),
        crc32=full_object_crc32(head),
    )


def head_sources(s3: S3Client, refs: Sequence[SourceRef], *, concurrency: int) -> list[SourceObject | None]:
    """HEAD every source with bounded concurrency, in request order, so a request fails before upload."""
    if not refs:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(refs)))) as pool:
        return list(pool.map(lambda ref: head_source(s3, ref), refs))


def _open(s3: S3Client, obj: SourceObject, start: int, end: int) -> Iterator[bytes]:
    try:
        if start or end < obj.size:
            last = str(end - 1) if end < obj.size else ""
            response = s3.get_object(
                Bucket=obj.ref.bucket, Key=obj.ref.key, IfMatch=obj.etag, Range=f"bytes={start}-{last}"
            )
        else:
            response = s3.get_object(Bucket=obj.ref.bucket, Key=obj.ref.key, IfMatch=obj.etag)
    except botocore.exceptions.ClientError as exc:
        if http_status(exc) in (404, 412) or error_code(exc) in ("NoSuchKey", "PreconditionFailed"):
            # Changed or deleted since its HEAD: this attempt cannot finish, but a redelivery that
            # HEADs it afresh can.
            raise TransientError(f"{obj.ref.source} changed while being archived") from None
        if (refused := refused_read(exc, obj.ref.source)) is not None:
            raise refused from None
        raise
    return response["Body"].iter_chunks(READ_CHUNK)


def read_source(
    s3: S3Client,
    obj: SourceObject,
    *,
    end: int | None = None,
    max_resumes: int = MAX_RESUMES,
) -> Iterator[bytes]:
    """Yield the object's bytes (up to `end` when given) in 64 KiB chunks. The GET is sent on the first
    `next()`, not before, so an early-opened connection never idles; a body that breaks off is resumed
    from the byte it stopped at."""
    stop = obj.size if end is None else end
    position = 0
    resumes = 0
    while True:
        try:
            for chunk in _open(s3, obj, position, stop):
                position += len(chunk)
                yield chunk
        except Exception as exc:
            if not is_transient(exc) or resumes >= max_resumes:
                raise
            resumes += 1
            log.warning("source.resume", source=obj.ref.source, at_byte=position, error=type(exc).__name__)
            continue
        if position == stop:
            return
        if position > stop or resumes >= max_resumes:
            raise TransientError(f"{obj.ref.source}: read {position} bytes, expected {stop}")
        resumes += 1  # the body ended early without an error: ask for the rest
