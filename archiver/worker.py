"""The poll loop: receive a request, archive it, notify, and decide once whether to delete or release.

One message is worked on at a time per worker process; operators scale by running more tasks. While a
job runs, a heartbeat thread keeps the message invisible, refreshes the health file and enforces
JOB_TIMEOUT. SIGTERM stops receiving at once and gives the job SHUTDOWN_GRACE seconds to finish; after
that, or on a second signal, the upload is aborted and the message released for another worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import botocore.exceptions
import structlog
from pydantic import ValidationError

from archiver import job, metrics, notify, queue, status
from archiver.aws import AwsClients, http_status, make_clients
from archiver.errors import ArchiverError, JobAbandoned, PermanentError, TransientError, clip
from archiver.models import (
    ArchivePlan,
    CompletedNotification,
    parse_request,
    plan_archive,
    salvage_context,
    utc_timestamp,
)
from archiver.protection import TaskProtection
from archiver.settings import SQS_MAX_VISIBILITY, Settings

log = structlog.get_logger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
BURST_WAIT_SECONDS = 1
HEALTH_INTERVAL = 30  # seconds; `archiver check` allows a few of these
STATUS_INTERVAL = 5  # seconds between progress updates of the status document


class ForcedExit(BaseException):
    """A second signal: stop the job now, abort its upload, release its message."""


@dataclass
class Worker:
    """Everything a worker needs, built once at start-up."""

    settings: Settings
    clients: AwsClients
    source_url: str
    destination_url: str
    max_receive_count: int | None
    stopping: threading.Event = field(default_factory=threading.Event)
    abandon: threading.Event = field(default_factory=threading.Event)
    signals: int = 0
    protection: TaskProtection = field(default_factory=TaskProtection)
    emit_metrics: bool = True


def connect(settings: Settings, clients: AwsClients | None = None) -> Worker:
    # One connection per thread that may call S3 at once: part uploads, copies (and the head read beside
    # them), HEADs or read-ahead, and a few for the job, heartbeat and status writes.
    clients = clients or make_clients(
        max_connections=2 * settings.upload_concurrency + 1 + job.HEAD_CONCURRENCY + 4,
        expected_bucket_owner=settings.expected_bucket_owner,
        link_endpoint=settings.archive_link_endpoint,
    )
    source_url = queue.resolve_queue_url(clients.sqs, settings.sqs_source_queue)
    return Worker(
        settings=settings,
        clients=clients,
        source_url=source_url,
        destination_url=queue.resolve_queue_url(clients.sqs, settings.sqs_destination_queue),
        max_receive_count=queue.max_receive_count(clients.sqs, source_url),
    )


def return_big_buffers_to_the_os() -> None:
    """Keep glibc's mmap threshold at 128 KiB. glibc raises it to the size of the first big block freed
    (a part buffer), after which parts come from the heap, which fragments and never shrinks: measured
    40-55 MiB of peak RSS on a 1 GiB archive. With the threshold fixed, each part is mmapped and handed
    back when its upload is done. A no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------------------- the loop


def run(worker: Worker, *, burst: bool = False) -> int:
    """Poll until stopped (or, in burst mode, until the queue is empty). Returns the exit status."""
    exit_status = 0
    with _signal_handlers(worker):
        log.info("worker.started", source_queue=worker.source_url, burst=burst)
        try:
            while not worker.stopping.is_set():
                touch_health_file(worker.settings.health_file)
                # Protected before a message can arrive: ECS must not pick this task for scale-in
                # between the receive and the start of the job.
                worker.protection.protect()
                message = _poll(worker, burst=burst)
                if message is None:
                    worker.protection.release()
                    if burst:
                        break
                    continue
                if worker.stopping.is_set():
                    # Received as the stop signal came: hand it straight back rather than start it.
                    queue.set_visibility(worker.clients.sqs, worker.source_url, message, 0)
                    break
                handle(worker, message)
        except ForcedExit:
            exit_status = 1
        finally:
            worker.protection.release()
        log.info("worker.stopped", signals=worker.signals, status=exit_status)
    return exit_status


def poll_seconds(settings: Settings, *, burst: bool) -> int:
    """How long one receive waits. A stop signal does not cut a long poll short: SQS (LocalStack and
    moto too) keeps a poll open after its client is gone and hands the next message to it, where it
    stays invisible for a whole visibility timeout and counts a receive towards the DLQ. So the poll
    runs to its end and what it got is handed back at once, and it is kept within SHUTDOWN_GRACE, so
    a stop takes no longer than a job's grace."""
    if burst:
        return BURST_WAIT_SECONDS
    return min(queue.LONG_POLL_SECONDS, max(1, settings.shutdown_grace))


def _poll(worker: Worker, *, burst: bool) -> queue.Message | None:
    return queue.receive(
        worker.clients.sqs,
        worker.source_url,
        wait_seconds=poll_seconds(worker.settings, burst=burst),
        visibility_timeout=worker.settings.visibility_timeout,
    )


@contextlib.contextmanager
def _signal_handlers(worker: Worker) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only; an embedded worker is stopped through its events
        return

    def on_signal(signum: int, _: FrameType | None) -> None:
        worker.signals += 1
        if worker.signals > 1:
            raise ForcedExit(signal.Signals(signum).name)
        log.info("worker.stopping", signal=signal.Signals(signum).name, grace=worker.settings.shutdown_grace)
        worker.stopping.set()
        timer = threading.Timer(worker.settings.shutdown_grace, worker.abandon.set)
        timer.daemon = True
        timer.start()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def touch_health_file(path: str) -> None:
    with contextlib.suppress(OSError):
        Path(path).touch()


# ------------------------------------------------------------------------------------------- one message


class RequestBusy(TransientError):
    """Another worker holds this request_id's lease (or took it from this one): not a failure of the
    request, so it is deferred until the lease ends and never reported to the producer as failed."""

    def __init__(self, message: str, *, retry_after: int, holder_message_id: str | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.holder_message_id = holder_message_id


@dataclass
class Attempt:
    """One delivery of one message, from its receipt until it is deleted or released."""

    message: queue.Message
    request_id: str
    metadata: dict[str, Any] = field(default_factory=dict)
    lease: status.Lease | None = None
    progress: status.Progress = field(default_factory=status.Progress)
    archived: bool = False  # the archive exists and status.json says `completed`
    extensions: int = 0  # visibility extensions, for the metrics
    # Set by the heartbeat: "timeout" (JOB_TIMEOUT) or "lease_lost" (the status document was taken over).
    stop_reason: str | None = None

    def cancelled(self) -> bool:
        return self.stop_reason is not None


@contextlib.contextmanager
def request_context(**values: Any) -> Iterator[None]:
    """Log context for one request: whatever is bound inside (the archive key, the request id once the
    body is read) is gone afterwards, so nothing leaks into the next request's lines."""
    before = structlog.contextvars.get_contextvars()
    structlog.contextvars.bind_contextvars(**values)
    try:
        yield
    finally:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(**before)


def handle(worker: Worker, message: queue.Message) -> None:
    """Work on one message and settle it: delete after success or a permanent failure, else release."""
    started = time.monotonic()
    attempt = Attempt(message=message, request_id=message.message_id)
    outcome: dict[str, Any] = {}
    with request_context(message_id=message.message_id, request_id=message.message_id):
        try:
            outcome = _work(worker, attempt)
            notify.send_notification(worker.clients.sqs, worker.destination_url, outcome.pop("notification"))
            queue.delete(worker.clients.sqs, worker.source_url, message)
        except PermanentError as exc:
            outcome = {"outcome": "failed", "error_code": exc.code, "error": exc.message}
            _write_status(attempt, "failed", error={"code": exc.code, "message": exc.message})
            try:
                _fail_permanently(worker, attempt, exc)
            except Exception as settle_error:
                # The notification or delete failed: the message comes back and fails the same way then.
                outcome["outcome"] = "released"
                _release(worker, attempt, settle_error)
        except (RequestBusy, status.LeaseLost) as exc:
            # Not a failure of the request: another worker has it. No status write, no failed notice.
            outcome = {"outcome": "deferred", "reason": exc.message}
            busy = (
                exc
                if isinstance(exc, RequestBusy)
                else RequestBusy(exc.message, retry_after=worker.settings.visibility_timeout)
            )
            _defer(worker, attempt, busy)
        except (Exception, ForcedExit) as exc:
            outcome = {
                "outcome": "released",
                "error_code": "internal",
                "error": clip(f"{type(exc).__name__}: {exc}"),
            }
            if not attempt.archived:
                # Back in the queue: a redelivery may take it at once, without waiting for a lease to expire.
                _write_status(attempt, "queued", error={"code": "internal", "message": outcome["error"]})
            _release(worker, attempt, exc)
            if isinstance(exc, ForcedExit):
                raise
        finally:
            duration = time.monotonic() - started
            latency = (datetime.now(UTC) - message.sent_at).total_seconds() if message.sent_at else None
            # The canonical log line: one event per request with everything an operator asks about it.
            log.info(
                "request.done",
                receive_count=message.receive_count,
                duration_s=round(duration, 3),
                queue_latency_s=None if latency is None else round(latency, 3),
                visibility_extensions=attempt.extensions,
                **outcome,
            )
            if worker.emit_metrics:
                _emit_metrics(worker, attempt, outcome, duration=duration, latency=latency)


def _work(worker: Worker, attempt: Attempt) -> dict[str, Any]:
    """Read and plan the request, then archive it once: the outcome's log fields and its notification."""
    document = job.load_document(worker.clients.s3, worker.settings, attempt.message.body)
    salvaged_id, attempt.metadata = salvage_context(document)
    attempt.request_id = salvaged_id or attempt.message.message_id
    structlog.contextvars.bind_contextvars(request_id=attempt.request_id)
    plan = plan_archive(
        parse_request(document), settings=worker.settings, message_id=attempt.message.message_id
    )
    structlog.contextvars.bind_contextvars(archive_key=plan.key)
    return _archive_once(worker, attempt, plan)


def _emit_metrics(
    worker: Worker, attempt: Attempt, outcome: dict[str, Any], *, duration: float, latency: float | None
) -> None:
    try:
        metrics.emit_request(
            outcome=str(outcome.get("outcome", "released")),
            error_code=outcome.get("error_code"),
            duration_s=duration,
            queue_latency_s=latency,
            size=outcome.get("size"),
            entries=outcome.get("entries"),
            copied=outcome.get("copied_bytes"),
            extensions=attempt.extensions,
            properties={"request_id": attempt.request_id},
        )
    except Exception:  # metrics must never cost a request
        log.warning("metrics.failed", exc_info=True)


def _archive_once(worker: Worker, attempt: Attempt, plan: ArchivePlan) -> dict[str, Any]:
    """Build the archive unless this request_id is already done (re-send its notification) or being
    built by another live worker (defer until its lease ends)."""
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
        notification = _previous_notification(worker, plan, previous)
        if notification is not None:
            attempt.archived = True
            return {"outcome": "duplicate", "size": notification.archive.size, "notification": notification}
    remaining = status.lease_remaining(previous, default_seconds=settings.visibility_timeout)
    if remaining > 0:
        raise RequestBusy(
            f"request {plan.request_id} is being archived by {previous and previous.get('worker')}",
            retry_after=math.ceil(remaining) + 1,
            holder_message_id=(previous or {}).get("message_id"),
        )
    attempt.progress = status.Progress(files_total=len(plan.entries))
    terms = status.LeaseTerms(
        message_id=attempt.message.message_id, digest=plan.digest, seconds=settings.visibility_timeout
    )
    # Claimed before anything else: a worker that lost the race must not abort the winner's upload.
    attempt.lease = status.claim(
        s3,
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
            retry_after=settings.visibility_timeout,
        )
    lease = attempt.lease
    aborted = status.abort_stale_uploads(s3, bucket=plan.bucket, key=plan.key)
    if aborted:
        log.info("request.stale_uploads_aborted", count=aborted)
    try:
        with _heartbeat(worker, attempt):
            notification = job.build_archive(
                worker.clients,
                settings,
                plan,
                progress=attempt.progress,
                cancelled=lambda: worker.abandon.is_set() or attempt.cancelled(),
                # A worker that stalled past its lease finds out here at the latest, before its
                # archive replaces the one the new holder may have completed.
                confirm=lambda: lease.write("processing", attempt.progress),
            )
    except JobAbandoned:
        if attempt.stop_reason == "lease_lost":
            raise status.LeaseLost(f"request {plan.request_id}: another worker took its lease") from None
        raise
    # Written before the twin clean-up below: once the status says `completed`, no other worker claims
    # the key, so any upload left on it is this worker's own. Not best effort: without it a duplicate
    # would build again, perhaps after the producer deleted the sources.
    lease.write(
        "completed",
        attempt.progress,
        # Without the link: it is made afresh on every re-send, and a presigned one is a credential.
        notification=notification.model_dump(mode="json", exclude={"archive": {"url"}}),
    )
    attempt.archived = True
    try:
        # A CreateMultipartUpload whose answer was lost and retried by botocore leaves a twin upload
        # nobody knows the id of; the only place to find it is the listing for this key.
        status.abort_stale_uploads(s3, bucket=plan.bucket, key=plan.key)
    except Exception as exc:
        log.warning("request.cleanup_failed", error=repr(exc))
    return {
        "outcome": "completed",
        "size": notification.archive.size,
        "entries": notification.archive.entries,
        "copied_bytes": attempt.progress.bytes_copied,
        "skipped": len(notification.skipped),
        "renamed": len(notification.renamed),
        "notification": notification,
    }


def _previous_notification(
    worker: Worker, plan: ArchivePlan, document: dict[str, Any]
) -> CompletedNotification | None:
    """The stored notification of a completed request with a fresh link, if its archive still exists.
    Only a 404 means it does not: any other error on the HEAD (a 503 SlowDown) is raised as transient,
    since rebuilding could turn a completed request into a failed one once its sources are gone."""
    try:
        recorded = dict(document.get("notification") or {})
        recorded["archive"] = {**recorded.get("archive", {}), "url": ""}
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
    url = notify.archive_url(
        worker.clients.presign, worker.settings, bucket=plan.bucket, key=stored.archive.key
    )
    return stored.model_copy(
        update={"archive": stored.archive.model_copy(update={"url": url}), "created_at": utc_timestamp()}
    )


def _write_status(
    attempt: Attempt,
    state: status.Status,
    *,
    error: dict[str, Any] | None = None,
) -> None:
    """Best effort, and only under this attempt's lease: a status that could not be written never fails
    the request, and one that is another worker's now is left alone."""
    if attempt.lease is None:
        return
    try:
        attempt.lease.write(state, attempt.progress, error=error)
    except status.LeaseLost:
        log.warning("status.lease_lost", state=state)
    except Exception as exc:
        log.warning("status.write_failed", state=state, error=repr(exc))


def _fail_permanently(worker: Worker, attempt: Attempt, error: PermanentError) -> None:
    notification = notify.failed(
        request_id=attempt.request_id,
        code=error.code,
        message=error.message,
        retryable=False,
        metadata=attempt.metadata,
    )
    notify.send_notification(worker.clients.sqs, worker.destination_url, notification)
    queue.delete(worker.clients.sqs, worker.source_url, attempt.message)


def release_delay(receive_count: int, visibility_timeout: int) -> int:
    """Seconds before a failed message is seen again: grows with each delivery, so a struggling
    dependency is not hammered, and never longer than a normal visibility timeout."""
    return min(visibility_timeout, 1 << min(receive_count, 12))


def _is_last_delivery(worker: Worker, message: queue.Message) -> bool:
    return worker.max_receive_count is not None and message.receive_count >= worker.max_receive_count


def _defer(worker: Worker, attempt: Attempt, busy: RequestBusy) -> None:
    """Another worker holds the request: hand the message back until that lease ends. On its last
    delivery a *different* message for the same request_id is deleted instead of dead-lettered, since
    the holder answers for the request; the holder's own message (a visibility lapse) is released."""
    message = attempt.message
    log.warning("request.deferred", reason=busy.message, retry_after=busy.retry_after)
    other_message = busy.holder_message_id not in (None, message.message_id)
    if _is_last_delivery(worker, message) and other_message:
        log.warning("request.duplicate_dropped", holder_message_id=busy.holder_message_id)
        queue.delete(worker.clients.sqs, worker.source_url, message)
        return
    _set_visibility(worker, message, min(busy.retry_after, SQS_MAX_VISIBILITY))


def _release(worker: Worker, attempt: Attempt, error: BaseException) -> None:
    message = attempt.message
    # Stopped by a shutdown: hand the message straight to another worker. A JOB_TIMEOUT is a failure
    # like any other, so it backs off and ends in the DLQ if it keeps happening.
    abandoned = isinstance(error, ForcedExit) or (
        isinstance(error, JobAbandoned) and worker.stopping.is_set()
    )
    if abandoned:
        log.warning("request.released", reason=str(error) or type(error).__name__)
    else:
        log.error("request.error", exc_info=error)
    # The next receive moves it to the DLQ, whatever ended this attempt; but an archive that exists is
    # not a failure: a redrive from the DLQ re-sends its completed notification.
    if _is_last_delivery(worker, message) and not attempt.archived:
        code = error.code if isinstance(error, ArchiverError) else "internal"
        notification = notify.failed(
            request_id=attempt.request_id,
            code=code,
            message=f"gave up after {message.receive_count} attempts: {type(error).__name__}: {error}",
            retryable=True,
            metadata=attempt.metadata,
        )
        with contextlib.suppress(Exception):
            notify.send_notification(worker.clients.sqs, worker.destination_url, notification)
    delay = 0 if abandoned else release_delay(message.receive_count, worker.settings.visibility_timeout)
    _set_visibility(worker, message, delay)


def _set_visibility(worker: Worker, message: queue.Message, seconds: int) -> None:
    try:
        queue.set_visibility(worker.clients.sqs, worker.source_url, message, seconds)
    except Exception as exc:
        # The message reappears by itself when its visibility timeout runs out.
        log.warning("request.release_failed", error=repr(exc))


@contextlib.contextmanager
def _heartbeat(worker: Worker, attempt: Attempt) -> Iterator[None]:
    """While a job runs: keep its message invisible, refresh the health file, renew the lease with the
    progress every few seconds, and stop the job at JOB_TIMEOUT or when the lease turns out lost."""
    settings = worker.settings
    done = threading.Event()
    extend_every = max(1.0, min(settings.visibility_timeout / 3, HEALTH_INTERVAL))
    tick = min(extend_every, STATUS_INTERVAL)
    deadline = time.monotonic() + settings.job_timeout
    context = structlog.contextvars.get_contextvars()

    def renew_lease() -> bool:
        if attempt.lease is None:
            return True
        try:
            attempt.lease.write("processing", attempt.progress)
        except status.LeaseLost:
            log.warning("status.lease_lost", state="processing")
            return False
        except Exception as exc:
            log.warning("status.write_failed", state="processing", error=repr(exc))
        return True

    def beat() -> None:
        next_extension = time.monotonic() + extend_every
        with structlog.contextvars.bound_contextvars(**context):
            while not done.wait(tick):
                touch_health_file(settings.health_file)
                now = time.monotonic()
                if now > deadline:
                    log.warning("request.timeout", job_timeout=settings.job_timeout)
                    attempt.stop_reason = "timeout"
                    return
                if not renew_lease():
                    attempt.stop_reason = "lease_lost"
                    return
                worker.protection.protect()  # renews a protection that is getting old
                if now >= next_extension:
                    next_extension = now + extend_every
                    try:
                        queue.set_visibility(
                            worker.clients.sqs,
                            worker.source_url,
                            attempt.message,
                            settings.visibility_timeout,
                        )
                        attempt.extensions += 1
                        log.debug("request.visibility_extended", seconds=settings.visibility_timeout)
                    except Exception as exc:
                        log.warning("request.extend_failed", error=repr(exc))

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
