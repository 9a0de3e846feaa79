"""Notification payloads for the destination queue, and the archive link they carry (contract §3)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from archiver import queue
from archiver.errors import ErrorCode
from archiver.models import (
    ArchiveInfo,
    CompletedNotification,
    ErrorInfo,
    FailedNotification,
    RenamedEntry,
    SkippedSource,
    utc_timestamp,
)
from archiver.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sqs import SQSClient


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
) -> CompletedNotification:
    return CompletedNotification(
        request_id=request_id,
        archive=archive,
        skipped=skipped,
        renamed=renamed,
        metadata=metadata,
        created_at=utc_timestamp(),
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


# SQS's message size limit before 2025; queues created since allow 1 MiB, but not every queue is new.
MAX_NOTIFICATION_BYTES = 256 * 1024


def fit(
    notification: CompletedNotification, max_bytes: int = MAX_NOTIFICATION_BYTES
) -> CompletedNotification:
    """Cut the `skipped` and `renamed` lists (50,000 renames would be megabytes) until the notification
    fits one SQS message, and say so; the status document keeps the full lists."""
    fitted = notification
    while len(fitted.model_dump_json().encode()) > max_bytes and (fitted.skipped or fitted.renamed):
        fitted = fitted.model_copy(
            update={
                "skipped": fitted.skipped[: len(fitted.skipped) // 2],
                "renamed": fitted.renamed[: len(fitted.renamed) // 2],
                "truncated": True,
            }
        )
    return fitted


def send_notification(
    sqs: SQSClient, queue_url: str, notification: CompletedNotification | FailedNotification
) -> str:
    if isinstance(notification, CompletedNotification):
        notification = fit(notification)
    return queue.send(sqs, queue_url, notification.model_dump_json())
