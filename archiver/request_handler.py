"""A request message, from its receipt to its outcome: the body read and planned, the request's lease
taken (or the request found done, busy or cancelled), the archive built by this worker or fanned out
over the fleet, its completion decided against any cancel, and the status written `completed`. Every
way it can end is an Outcome for the one settle decision; the canonical `request.done` line and the
request's metrics report it."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import botocore.exceptions
import structlog
from pydantic import ValidationError

from archiver import decision, job, metrics, notify, queue, request, status
from archiver.attempt import Attempt, Handler, Worker, released
from archiver.aws import http_status
from archiver.errors import Cancelled, JobAbandoned, PermanentError, TransientError
from archiver.fanout.coordinator import Coordinator
from archiver.models import ArchivePlan, parse_request, plan_archive, salvage_context, utc_timestamp
from archiver.notices import CompletedNotification
from archiver.settle import Outcome

log = structlog.get_logger(__name__)


class RequestBusy(TransientError):
    """Another worker holds this request_id's lease (or took it from this one): not a failure of the
    request, so it is deferred until the lease ends and never reported to the producer as failed."""

    def __init__(self, message: str, *, retry_after: int, holder_message_id: str | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.holder_message_id = holder_message_id


def receive(message: queue.Message) -> Handler:
    """Any message no other handler takes is a request (and an invalid one fails as such)."""
    return Handler(
        name="request",
        # The message id until the body names the request's own.
        request_id=message.message_id,
        log_context={"request_id": message.message_id},
        work=outcome_of,
        report=report,
    )


def outcome_of(worker: Worker, attempt: Attempt) -> Outcome:
    """Work on the request; every way it can end, as an Outcome (ForcedExit aside)."""
    try:
        return _work(worker, attempt)
    except PermanentError as exc:
        return Outcome("failed", error_code=exc.code, error=exc.message)
    except Cancelled as exc:
        return Outcome("cancelled", error=exc.message)
    except (RequestBusy, status.LeaseLost) as exc:
        # Not a failure of the request: another worker has it. No status write, no failed notice.
        busy = exc if isinstance(exc, RequestBusy) else None
        retry_after = busy.retry_after if busy else worker.settings.visibility_timeout
        holder = busy.holder_message_id if busy else None
        log.warning("request.deferred", reason=exc.message, retry_after=retry_after)
        return Outcome(
            "deferred",
            error=exc.message,
            retry_after=retry_after,
            holder_is_another_message=holder not in (None, attempt.message.message_id),
        )
    except Exception as exc:
        # Stopped by a shutdown: hand the message straight to another worker. A JOB_TIMEOUT is a failure
        # like any other, so it backs off and ends in the DLQ if it keeps happening.
        abandoned = isinstance(exc, JobAbandoned) and worker.shutdown.requested.is_set()
        if abandoned:
            log.warning("request.released", reason=str(exc) or type(exc).__name__)
        else:
            log.error("request.error", exc_info=exc)
        return released(attempt, exc, abandoned=abandoned)


def _work(worker: Worker, attempt: Attempt) -> Outcome:
    """Read and plan the request, then archive it once."""
    document = request.load_document(worker.clients.s3, worker.settings, attempt.message.body)
    salvaged_id, attempt.metadata = salvage_context(document)
    attempt.request_id = salvaged_id or attempt.message.message_id
    structlog.contextvars.bind_contextvars(request_id=attempt.request_id)
    plan = plan_archive(
        parse_request(document), settings=worker.settings, message_id=attempt.message.message_id
    )
    del document  # ~350 bytes a file that the build would otherwise hold: the plan has what it needs
    structlog.contextvars.bind_contextvars(archive_key=plan.key)
    return _archive_once(worker, attempt, plan)


def report(worker: Worker, attempt: Attempt, outcome: Outcome, started: float) -> None:
    """The canonical log line, one event per request with everything an operator asks about it, and
    the request's metrics."""
    message = attempt.message
    duration = time.monotonic() - started
    latency = (datetime.now(UTC) - message.sent_at).total_seconds() if message.sent_at else None
    log.info(
        "request.done",
        receive_count=message.receive_count,
        duration_s=round(duration, 3),
        queue_latency_s=None if latency is None else round(latency, 3),
        visibility_extensions=attempt.extensions,
        **outcome.log_fields(),
    )
    if not worker.emit_metrics:
        return
    try:
        metrics.emit_request(
            outcome=outcome.kind,
            error_code=outcome.error_code if outcome.kind in ("failed", "released") else None,
            duration_s=duration,
            queue_latency_s=latency,
            size=outcome.size,
            entries=outcome.entries,
            copied=outcome.copied_bytes,
            extensions=attempt.extensions,
            properties={"request_id": attempt.request_id},
        )
    except Exception:  # metrics must never cost a request
        log.warning("metrics.failed", exc_info=True)


def _archive_once(worker: Worker, attempt: Attempt, plan: ArchivePlan) -> Outcome:
    """Build the archive unless this request_id is already done (re-send its notification), being
    built by another live worker (defer until its lease ends) or cancelled."""
    s3, settings = worker.clients.s3, worker.settings
    stored = status.read_stored(s3, bucket=plan.bucket, archive_key=plan.key)
    previous = stored.document
    if previous is not None and previous.get("request_digest") not in (None, plan.digest):
        # Like a payment API's idempotency key: one request_id, one request. Answering with the first
        # request's archive would hand this producer someone else's link and metadata.
        raise PermanentError(
            "invalid_request",
            f"request_id {plan.request_id} was already used for a different request;"
            " send a new request with a new request_id",
        )
    if previous is not None and previous.get("status") == "completed":
        attempt.notification = _previous_notification(worker, plan, previous)
        if attempt.notification is not None:
            return Outcome("duplicate", size=attempt.notification.archive.size)
    remaining = status.lease_remaining(previous, default_seconds=settings.visibility_timeout)
    if remaining > 0:
        raise RequestBusy(
            f"request {plan.request_id} is being archived by {(previous or {}).get('worker')}",
            retry_after=math.ceil(remaining) + 1,
            holder_message_id=(previous or {}).get("message_id"),
        )
    lease = _claim(worker, attempt, plan, stored)
    coordinator = _coordinator(worker, attempt, plan, lease) if settings.fanout_segment_bytes else None
    if attempt.cancel_seen():
        _end_before_start(worker, plan, coordinator)
    # A fanned-out request's upload is kept: its stored plan is resumed (archiver.fanout).
    keep = coordinator.resumed.upload_id if coordinator and coordinator.resumed else None
    aborted = status.abort_stale_uploads(s3, bucket=plan.bucket, key=plan.key, keep=keep)
    if aborted:
        log.info("request.stale_uploads_aborted", count=aborted)
    notification = _build(worker, attempt, plan, lease, coordinator)
    # Written before the twin clean-up below: once the status says `completed`, no other worker claims
    # the key, so any upload left on it is this worker's own. Not best effort: without it a duplicate
    # would build again, perhaps after the producer deleted the sources.
    lease.write(
        "completed",
        attempt.progress,
        # Without the links: made afresh on every re-send, and a presigned one is a credential.
        notification=notification.model_dump(mode="json", exclude={"archive": {"url"}, "manifest": {"url"}}),
    )
    attempt.notification = notification
    try:
        # A CreateMultipartUpload whose answer was lost and retried by botocore leaves a twin upload
        # nobody knows the id of; the only place to find it is the listing for this key.
        status.abort_stale_uploads(s3, bucket=plan.bucket, key=plan.key)
    except Exception as exc:
        log.warning("request.cleanup_failed", error=repr(exc))
    return Outcome(
        "completed",
        size=notification.archive.size,
        entries=notification.archive.entries,
        copied_bytes=attempt.progress.bytes_copied,
        skipped=len(notification.skipped),
        renamed=len(notification.renamed),
    )


def _end_before_start(worker: Worker, plan: ArchivePlan, coordinator: Coordinator | None) -> None:
    """Cancelled before it started (perhaps before it arrived): nothing is read, and what an earlier
    delivery left behind (an upload, a fan-out plan) goes."""
    if coordinator is not None:
        coordinator.end()
    status.abort_stale_uploads(worker.clients.s3, bucket=plan.bucket, key=plan.key)
    raise Cancelled("cancelled before it started")


def _claim(worker: Worker, attempt: Attempt, plan: ArchivePlan, stored: status.Stored) -> status.Lease:
    """The lease on this request, before anything else: a worker that lost the race must not abort the
    winner's upload. Any error but losing the race is raised: without the lease nothing is built."""
    attempt.progress = status.Progress(files_total=len(plan.entries))
    terms = status.LeaseTerms(
        message_id=attempt.message.message_id, digest=plan.digest, seconds=worker.settings.visibility_timeout
    )
    attempt.lease = status.claim(
        worker.clients.s3,
        bucket=plan.bucket,
        archive_key=plan.key,
        request_id=plan.request_id,
        progress=attempt.progress,
        seen=stored,
        terms=terms,
    )
    if attempt.lease is None:
        raise RequestBusy(
            f"request {plan.request_id} was claimed by another worker just now",
            retry_after=worker.settings.visibility_timeout,
        )
    # Under the lease, the heartbeat looks for a cancel of the request from now on.
    attempt.decision_place = decision.place_of(worker.clients.s3, worker.settings, plan.request_id)
    return attempt.lease


def _build(
    worker: Worker,
    attempt: Attempt,
    plan: ArchivePlan,
    lease: status.Lease,
    coordinator: Coordinator | None,
) -> CompletedNotification:
    try:
        if coordinator is not None:
            fanned = coordinator.build()
            if fanned is not None:
                return job.completed_notification(
                    worker.clients,
                    worker.settings,
                    plan,
                    fanned.uploaded,
                    paths=fanned.paths,
                    missing=fanned.missing,
                    rows=fanned.rows,
                )
        return job.build_archive(
            worker.clients,
            worker.settings,
            plan,
            progress=attempt.progress,
            abandoned=attempt.abandoned,
            confirm=_confirm(attempt, lease),
        )
    except JobAbandoned:
        if attempt.abandon_reason == "lease_lost":
            raise status.LeaseLost(f"request {plan.request_id}: another worker took its lease") from None
        if attempt.abandon_reason == "cancelled":
            raise Cancelled("cancelled while it was being built") from None
        raise


def _confirm(attempt: Attempt, lease: status.Lease) -> Callable[[], None]:
    """What runs right before the upload is completed, the one step that cannot be undone. A worker that
    stalled past its lease finds out here at the latest, before its archive replaces the one the new
    holder may have completed; then the completion is decided against any cancel (archiver.decision),
    and a cancel that won aborts the upload."""

    def confirm() -> None:
        lease.write("processing", attempt.progress)
        assert attempt.decision_place is not None, "decided under the lease"
        decided = decision.take(attempt.decision_place, "completed")
        if decided.verdict == "cancelled":
            attempt.cancelled_at = decided.decided_at
            raise Cancelled("cancelled as it was completing")

    return confirm


def _coordinator(worker: Worker, attempt: Attempt, plan: ArchivePlan, lease: status.Lease) -> Coordinator:
    """This request's fan-out coordinator, which reads the request's stored plan, if any, once."""
    return Coordinator(
        clients=worker.clients,
        settings=worker.settings,
        plan=plan,
        source_url=worker.source_url,
        progress=attempt.progress,
        abandoned=attempt.abandoned,
        confirm=_confirm(attempt, lease),
        last_delivery=attempt.last_delivery,
        hold=attempt.hold,
        cancelled=lambda: attempt.abandon_reason == "cancelled",
    )


def _previous_notification(
    worker: Worker, plan: ArchivePlan, document: dict[str, Any]
) -> CompletedNotification | None:
    """The stored notification of a completed request with a fresh link, if its archive still exists.
    Only a 404 means it does not: any other error on the HEAD (a 503 SlowDown) is raised as transient,
    since rebuilding could turn a completed request into a failed one once its sources are gone."""
    try:
        recorded = dict(document.get("notification") or {})
        recorded["archive"] = {**recorded.get("archive", {}), "url": ""}
        if recorded.get("manifest"):
            recorded["manifest"] = {**recorded["manifest"], "url": ""}
        stored = CompletedNotification.model_validate(recorded)
    except ValidationError:
        return None  # no usable record: build it again
    try:
        head = worker.clients.s3.head_object(Bucket=plan.bucket, Key=stored.archive.key)
    except botocore.exceptions.ClientError as exc:
        if http_status(exc) == 404:
            return None  # the archive expired: build it again
        raise
    if head.get("Metadata", {}).get("request-id") != plan.request_id:
        return None

    def link(key: str) -> str:
        return notify.archive_url(worker.clients.presign, worker.settings, bucket=plan.bucket, key=key)

    update: dict[str, Any] = {
        "archive": stored.archive.model_copy(update={"url": link(stored.archive.key)}),
        "created_at": utc_timestamp(),
    }
    if stored.manifest is not None:
        update["manifest"] = stored.manifest.model_copy(update={"url": link(stored.manifest.key)})
    return stored.model_copy(update=update)
