"""Notification payloads for the destination queue, and the archive link they carry (contract §4)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import botocore.exceptions
import structlog

from archiver import queue
from archiver.aws import http_status, is_transient
from archiver.errors import ErrorCode, clip
from archiver.models import utc_timestamp
from archiver.notices import (
    ArchiveInfo,
    CancelledNotification,
    CompletedNotification,
    ErrorInfo,
    FailedNotification,
    ManifestInfo,
    RenamedEntry,
    SkippedSource,
)
from archiver.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sqs import SQSClient

log = structlog.get_logger(__name__)
Notice = CompletedNotification | FailedNotification | CancelledNotification


def archive_url(presign: S3Client, settings: Settings, *, bucket: str, key: str) -> str:
    """`ARCHIVE_BASE_URL/<key>` (CloudFront) when set, else a presigned GET. A presigned URL also dies
    with the credentials that signed it: an ECS task role's last hours, not ARCHIVE_URL_EXPIRES."""
    if settings.archive_base_url:
        return f"{settings.archive_base_url}/{quote(key)}"
    return presign.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=settings.archive_url_expires
    )


def completed(
    *,
    request_id: str,
    archive: ArchiveInfo,
    skipped: list[SkippedSource],
    renamed: list[RenamedEntry],
    metadata: dict[str, Any],
    manifest: ManifestInfo | None = None,
) -> CompletedNotification:
    return CompletedNotification(
        request_id=request_id,
        archive=archive,
        skipped=skipped,
        renamed=renamed,
        metadata=metadata,
        created_at=utc_timestamp(),
        manifest=manifest,
    )


def failed(
    *, request_id: str, code: ErrorCode, message: str, retryable: bool, metadata: dict[str, Any]
) -> FailedNotification:
    return FailedNotification(
        request_id=request_id,
        error=ErrorInfo(code=code, message=message, retryable=retryable),
        metadata=metadata,
        created_at=utc_timestamp(),
    )


def cancelled(*, request_id: str, cancelled_at: str, metadata: dict[str, Any]) -> CancelledNotification:
    return CancelledNotification(
        request_id=request_id, cancelled_at=cancelled_at, metadata=metadata, created_at=utc_timestamp()
    )


# SQS's message size limit before 2025; queues created since allow 1 MiB, but not every queue is new.
MAX_NOTIFICATION_BYTES = 256 * 1024


def fit(
    notification: CompletedNotification, max_bytes: int = MAX_NOTIFICATION_BYTES
) -> CompletedNotification:
    """Cut the `skipped` and `renamed` lists (50,000 renames would be megabytes) until the notification
    fits one SQS message, and say so; the status document keeps the full lists."""
    fitted = notification
    while len(encode(fitted).encode()) > max_bytes and (fitted.skipped or fitted.renamed):
        fitted = fitted.model_copy(
            update={
                "skipped": fitted.skipped[: len(fitted.skipped) // 2],
                "renamed": fitted.renamed[: len(fitted.renamed) // 2],
                "truncated": True,
            }
        )
    return fitted


# SQS accepts only these characters in a message (#x9 | #xA | #xD | #x20-#xD7FF | #xE000-#xFFFD |
# #x10000-#x10FFFF). Outside JSON's own escapes they can only occur inside strings, where a \uXXXX escape
# carries the same text.
_OUTSIDE_SQS = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def encode(notification: Notice) -> str:
    """The notification as a message body SQS accepts: JSON with non-ASCII text as is, and U+FFFE,
    U+FFFF and the like escaped."""
    return _OUTSIDE_SQS.sub(lambda found: f"\\u{ord(found.group()):04x}", notification.model_dump_json())


def reduced(notification: Notice) -> Notice:
    """The same answer without what the request echoed: what is left is bounded by archiver itself."""
    update: dict[str, Any] = {"metadata": {}, "truncated": True}
    if isinstance(notification, CompletedNotification):
        update.update(skipped=[], renamed=[])
    return notification.model_copy(update=update)


def send_notification(sqs: SQSClient, queue_url: str, notification: Notice) -> str:
    """Send the notification; if SQS refuses it for its content (too big for this queue, a character it
    will not take), send the reduced one instead: retrying the same bytes would fail every time, and the
    producer would hear nothing."""
    if isinstance(notification, CompletedNotification):
        notification = fit(notification)
    try:
        return queue.send(sqs, queue_url, encode(notification))
    except (ValueError, botocore.exceptions.ClientError) as exc:
        if isinstance(exc, botocore.exceptions.ClientError) and (
            is_transient(exc) or http_status(exc) != 400
        ):
            raise
        log.warning("notification.reduced", reason=clip(str(exc), 200))
    return queue.send(sqs, queue_url, encode(reduced(notification)))
