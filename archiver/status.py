"""The status document next to each archive (`<prefix>/<request_id>/status.json`).

It tells producers how a request is going (processing, completed, failed, with progress), and it is
how a worker knows whether a request_id is already done (re-send the notification, do not rebuild) or
being worked on right now by another worker (a `processing` document refreshed within the last
VISIBILITY_TIMEOUT seconds): a lease, so a duplicate delivery does not build the same archive twice.
The lease is taken with a conditional write on what was read (`claim`), so two workers that read the
same document at once cannot both take it. No document means the request is queued or unknown.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import botocore.exceptions
import structlog

from archiver.aws import http_status, retry_transient
from archiver.errors import TransientError
from archiver.models import request_dir, utc_timestamp

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = structlog.get_logger(__name__)

STATUS_NAME = "status.json"
WORKER_ID = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

Status = Literal["queued", "processing", "completed", "failed", "cancelled"]


def request_status_key(prefix: str, request_id: str) -> str:
    """Where a request's status document is, known by its id alone, whatever its archive is named."""
    return f"{request_dir(prefix, request_id)}/{STATUS_NAME}"


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
    # A fanned-out archive's segments (archiver.fanout); 0 when it is built in one piece.
    segments_total: int = 0
    segments_done: int = 0


class LeaseLost(TransientError):
    """Another worker took over this request's status document: this one must stop writing and building."""


def _document(
    *,
    request_id: str,
    archive_key: str,
    status: Status,
    progress: Progress,
    lease: LeaseTerms,
    error: dict[str, Any] | None,
    notification: dict[str, Any] | None,
) -> bytes:
    now = datetime.now(UTC)
    live = status == "processing"
    document = {
        "request_id": request_id,
        "status": status,
        "archive_key": archive_key,
        "files_total": progress.files_total,
        "files_done": progress.files_done,
        "bytes_total": progress.bytes_total,
        "bytes_done": progress.bytes_done,
        "started_at": progress.started_at,
        "updated_at": utc_timestamp(now),
        "worker": WORKER_ID,
        # The lease: while `processing`, no other worker builds this request before this moment. Written
        # by the holder, so a reader never judges it by its own VISIBILITY_TIMEOUT.
        "lease_expires_at": utc_timestamp(now + timedelta(seconds=lease.seconds)) if live else None,
        "lease_id": lease.lease_id,
        "message_id": lease.message_id,
        "request_digest": lease.digest,
        "error": error,
        "notification": notification,
    }
    if progress.segments_total:
        document["segments_total"] = progress.segments_total
        document["segments_done"] = progress.segments_done
    return json.dumps(document).encode()


@dataclass(frozen=True)
class LeaseTerms:
    """What a lease on one request is: who holds it, for which message and request body, for how long."""

    message_id: str
    digest: str
    seconds: int
    lease_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class Stored:
    document: dict[str, Any] | None  # None when absent or unreadable
    etag: str | None  # the object's ETag whenever it exists, readable or not


def read_stored(s3: S3Client, *, bucket: str, archive_key: str) -> Stored:
    """The status document (None when absent, or unreadable: treated as absent and rebuilt)."""
    document, etag = read_document(s3, bucket, status_key(archive_key))
    return Stored(document=document, etag=etag)


@dataclass
class Lease:
    """This worker's hold on a request's status document. Every write is conditional on the document
    still being the one this worker wrote last (its ETag): a worker that stalled past its lease (a GC
    pause, SIGSTOP, a partition) and resumes finds the document changed, and stops, instead of writing
    over the new holder's status."""

    s3: S3Client
    bucket: str
    archive_key: str
    request_id: str
    terms: LeaseTerms
    etag: str | None
    conditional: bool = True  # False on a server that answered a conditional write with 501
    # Until a final status (completed, failed, queued) is written: the heartbeat renews only while held.
    held: bool = True
    # The heartbeat's renewals and the job's own writes come from two threads; one write at a time, or a
    # renewal could land after the final status and write `processing` over it.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def renew(self, progress: Progress) -> bool:
        """Write `processing` with the progress and a new expiry, if the lease is still held; False when
        it turned out to be another worker's."""
        try:
            self.write("processing", progress, renewal=True)
        except LeaseLost:
            log.warning("status.lease_lost", state="processing")
            return False
        return True

    def write(
        self,
        status: Status,
        progress: Progress,
        *,
        error: dict[str, Any] | None = None,
        notification: dict[str, Any] | None = None,
        renewal: bool = False,
    ) -> None:
        """Write the document if the lease is still this worker's, else raise `LeaseLost`. A renewal
        after the final status is a no-op."""
        with self._lock:
            if renewal and not self.held:
                return
            self._write(status, progress, error=error, notification=notification)
            if status != "processing":
                self.held = False

    def _write(
        self,
        status: Status,
        progress: Progress,
        *,
        error: dict[str, Any] | None,
        notification: dict[str, Any] | None,
    ) -> None:
        body = _document(
            request_id=self.request_id,
            archive_key=self.archive_key,
            status=status,
            progress=progress,
            lease=self.terms,
            error=error,
            notification=notification,
        )
        for _ in range(2):
            condition = {"IfMatch": self.etag} if self.conditional and self.etag else {}
            try:
                self.etag = _put(self.s3, self.bucket, self.archive_key, body, condition)
                return
            except botocore.exceptions.ClientError as exc:
                if http_status(exc) == 501 and condition:
                    self.conditional = False
                    continue
                if http_status(exc) not in (409, 412):
                    raise
            # Changed since this worker's last write: still ours if this lease wrote it (a write whose
            # answer was lost, then retried), else another worker's.
            current = read_stored(self.s3, bucket=self.bucket, archive_key=self.archive_key)
            if current.document is None or current.document.get("lease_id") != self.terms.lease_id:
                raise LeaseLost(f"request {self.request_id}: the status document is another worker's now")
            self.etag = current.etag
        raise LeaseLost(f"request {self.request_id}: the status document keeps changing")


def _put(s3: S3Client, bucket: str, archive_key: str, body: bytes, condition: dict[str, str]) -> str:
    return put_document(s3, bucket, status_key(archive_key), body, condition)


@retry_transient
def put_document(s3: S3Client, bucket: str, key: str, body: bytes, condition: dict[str, str]) -> str:
    """PUT a JSON document archiver keeps beside an archive (status, decision, fan-out records), under
    an If-Match / If-None-Match `condition` or none; returns its ETag. Never cached: each is read to
    decide something."""
    response = s3.put_object(
        Bucket=bucket,
        Key=key,
        Body=body,
        ContentType="application/json",
        CacheControl="no-store",
        **condition,  # type: ignore[arg-type]
    )
    return str(response["ETag"])


@retry_transient
def get_document(s3: S3Client, bucket: str, key: str) -> tuple[bytes, str]:
    """Such a document's bytes and its ETag."""
    response = s3.get_object(Bucket=bucket, Key=key)
    return response["Body"].read(), str(response["ETag"])


def read_document(s3: S3Client, bucket: str, key: str) -> tuple[dict[str, Any] | None, str | None]:
    """Such a document as a JSON object (None if absent or unreadable) and its ETag (None if absent)."""
    try:
        body, etag = get_document(s3, bucket, key)
    except botocore.exceptions.ClientError as exc:
        # 403 is what S3 says for a missing key when the role may not list the bucket.
        if http_status(exc) in (403, 404):
            return None, None
        raise
    try:
        document = json.loads(body)
    except ValueError:
        return None, etag
    return (document if isinstance(document, dict) else None), etag


def claim(
    s3: S3Client,
    *,
    bucket: str,
    archive_key: str,
    request_id: str,
    progress: Progress,
    seen: Stored,
    terms: LeaseTerms,
) -> Lease | None:
    """Write this worker's `processing` document only if the status is still the one read (or still
    absent): of two workers that read the same document at the same moment, one gets the lease and the
    other None. A server without conditional writes (501) gets the document unconditionally. Any other
    error is raised: without the lease, nothing may be built or aborted."""
    lease = Lease(s3, bucket, archive_key, request_id, terms, etag=seen.etag)
    body = _document(
        request_id=request_id,
        archive_key=archive_key,
        status="processing",
        progress=progress,
        lease=terms,
        error=None,
        notification=None,
    )
    condition = {"IfMatch": seen.etag} if seen.etag else {"IfNoneMatch": "*"}
    try:
        lease.etag = _put(s3, bucket, archive_key, body, condition)
    except botocore.exceptions.ClientError as exc:
        if http_status(exc) == 501:
            lease.conditional = False
            lease.etag = _put(s3, bucket, archive_key, body, {})
            return lease
        if http_status(exc) not in (409, 412):
            raise
        # 412: the document changed since it was read; 409: S3 is settling a concurrent conditional
        # write. Either way it is someone else's, unless it is this claim whose answer was lost.
        current = read_stored(s3, bucket=bucket, archive_key=archive_key)
        if current.document is None or current.document.get("lease_id") != terms.lease_id:
            return None
        lease.etag = current.etag
    return lease


def parse_timestamp(value: object) -> datetime | None:
    try:
        return datetime.strptime(str(value), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def lease_remaining(document: dict[str, Any] | None, *, default_seconds: int) -> float:
    """Seconds left on another worker's lease on this request (0 when none is live). The holder's own
    `lease_expires_at` decides; a document from before it was written is judged by `updated_at` and
    this worker's VISIBILITY_TIMEOUT."""
    if document is None or document.get("status") != "processing" or document.get("worker") == WORKER_ID:
        return 0.0
    now = datetime.now(UTC)
    expires = parse_timestamp(document.get("lease_expires_at"))
    if expires is None:
        updated = parse_timestamp(document.get("updated_at"))
        if updated is None:
            return 0.0
        expires = updated + timedelta(seconds=default_seconds)
    return max(0.0, (expires - now).total_seconds())


@retry_transient
def abort_stale_uploads(s3: S3Client, *, bucket: str, key: str, keep: str | None = None) -> int:
    """Abort incomplete multipart uploads a dead worker left for this exact key, but `keep` (a fanned-out
    archive's upload, which its stored plan resumes); returns how many."""
    aborted = 0
    listing = s3.list_multipart_uploads(Bucket=bucket, Prefix=key)
    for upload in listing.get("Uploads", []):
        if upload.get("Key") == key and upload["UploadId"] != keep:
            s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"])
            aborted += 1
    return aborted
