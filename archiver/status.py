"""The status document next to each archive (`<prefix>/<request_id>/status.json`).

It tells producers how a request is going (processing, completed, failed, with progress), and it is
how a worker knows whether a request_id is already done (re-send the notification, do not rebuild) or
being worked on right now by another worker (a `processing` document refreshed within the last
VISIBILITY_TIMEOUT seconds): a lease, so a duplicate delivery does not build the same archive twice.
The lease is taken with a conditional write on what was read (`claim`), so two workers that read the
same document at once cannot both take it. No document means the request is queued or unknown.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import botocore.exceptions

from archiver.aws import http_status, retry_transient
from archiver.models import utc_timestamp

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

STATUS_NAME = "status.json"
WORKER_ID = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

Status = Literal["queued", "processing", "completed", "failed"]


def status_key(archive_key: str) -> str:
    return f"{archive_key.rsplit('/', 1)[0]}/{STATUS_NAME}" if "/" in archive_key else STATUS_NAME


@dataclass
class Progress:
    """Counters the zip stream advances and the heartbeat reports; plain ints, written by one thread."""

    files_total: int = 0
    bytes_total: int = 0
    files_done: int = 0
    bytes_done: int = 0
    started_at: str = field(default_factory=utc_timestamp)
    # Of the archive, copied by S3 (server-side assembly): for the metrics, not in the document.
    bytes_copied: int = 0


@retry_transient
def write_status(
    s3: S3Client,
    *,
    bucket: str,
    archive_key: str,
    request_id: str,
    status: Status,
    progress: Progress,
    error: dict[str, Any] | None = None,
    notification: dict[str, Any] | None = None,
    condition: dict[str, str] | None = None,
) -> None:
    """Write the document; `condition` (IfMatch / IfNoneMatch) makes S3 refuse it with 412 when the
    document is no longer the one it names."""
    document = {
        "request_id": request_id,
        "status": status,
        "archive_key": archive_key,
        "files_total": progress.files_total,
        "files_done": progress.files_done,
        "bytes_total": progress.bytes_total,
        "bytes_done": progress.bytes_done,
        "started_at": progress.started_at,
        "updated_at": utc_timestamp(),
        "worker": WORKER_ID,
        "error": error,
        "notification": notification,
    }
    s3.put_object(
        Bucket=bucket,
        Key=status_key(archive_key),
        Body=json.dumps(document).encode(),
        ContentType="application/json",
        CacheControl="no-store",
        **(condition or {}),  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class Stored:
    document: dict[str, Any] | None  # None when absent or unreadable
    etag: str | None  # the object's ETag whenever it exists, readable or not


@retry_transient
def read_stored(s3: S3Client, *, bucket: str, archive_key: str) -> Stored:
    try:
        response = s3.get_object(Bucket=bucket, Key=status_key(archive_key))
    except botocore.exceptions.ClientError as exc:
        # 403 is what S3 says for a missing key when the role may not list the bucket.
        if http_status(exc) in (403, 404):
            return Stored(document=None, etag=None)
        raise
    etag = str(response["ETag"])
    try:
        document = json.loads(response["Body"].read())
    except ValueError:
        return Stored(document=None, etag=etag)  # unreadable: treat as absent and rebuild
    return Stored(document=document if isinstance(document, dict) else None, etag=etag)


def claim(
    s3: S3Client, *, bucket: str, archive_key: str, request_id: str, progress: Progress, seen: Stored
) -> bool:
    """Write this worker's `processing` document only if the status is still the one read (or still
    absent): of two workers that read the same document at the same moment, one gets the lease and the
    other False. A server without conditional writes (501) gets the document unconditionally."""
    write = functools.partial(
        write_status,
        s3,
        bucket=bucket,
        archive_key=archive_key,
        request_id=request_id,
        status="processing",
        progress=progress,
    )
    try:
        write(condition={"IfMatch": seen.etag} if seen.etag else {"IfNoneMatch": "*"})
    except botocore.exceptions.ClientError as exc:
        # 412: the document changed since it was read; 409: S3 is settling a concurrent conditional write.
        if http_status(exc) in (409, 412):
            return False
        if http_status(exc) != 501:
            raise
        write()
    return True


def seconds_since(timestamp: str) -> float:
    try:
        moment = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except (TypeError, ValueError):
        return float("inf")
    return (datetime.now(UTC) - moment).total_seconds()


def held_by_another_worker(document: dict[str, Any] | None, *, lease_seconds: int) -> bool:
    """Another live worker is building this archive: its `processing` document is fresh."""
    return (
        document is not None
        and document.get("status") == "processing"
        and document.get("worker") != WORKER_ID
        and seconds_since(str(document.get("updated_at"))) < lease_seconds
    )


@retry_transient
def abort_stale_uploads(s3: S3Client, *, bucket: str, key: str) -> int:
    """Abort incomplete multipart uploads a dead worker left for this exact key; returns how many."""
    aborted = 0
    listing = s3.list_multipart_uploads(Bucket=bucket, Prefix=key)
    for upload in listing.get("Uploads", []):
        if upload.get("Key") == key:
            s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"])
            aborted += 1
    return aborted
