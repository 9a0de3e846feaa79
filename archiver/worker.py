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
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import botocore.exceptions
import structlog
from pydantic import ValidationError

from archiver import job, metrics, notify, queue, status
from archiver.aws import AwsClients, make_clients
from archiver.errors import ArchiverError, JobAbandoned, PermanentError, TransientError
from archiver.models import (
    ArchivePlan,
    CompletedNotification,
    parse_request,
    plan_archive,
    salvage_context,
    utc_timestamp,
)
from archiver.protection import TaskProtection
from archiver.settings import Settings

log = structlog.get_logger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
BURST_WAIT_SECONDS = 1
HEALTH_INTERVAL = 30  # seconds; `archiver check` allows a few of these
STATUS_INTERVAL = 5  # seconds between progress updates of the status document


class ForcedExit(BaseException):
    """A second signal: stop the job now, abort its upload, release its message."""


class StopPolling(BaseException):
    """A stop signal arrived while the worker was idle in a long poll."""


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
    polling: bool = False
    protection: TaskProtection = field(default_factory=TaskProtection)
    emit_metrics: bool = True
    extensions: int = 0  # visibility extensions of the current job, for its metrics


def connect(settings: Settings, clients: AwsClients | None = None) -> Worker:
    # One connection per thread that may call S3 at once: part uploads, copies (and the head read beside
    # them), HEADs or read-ahead, and a few for the job, heartbeat and status writes.
    clients = clients or make_clients(
        max_connections=2 * settings.upload_concurrency + 1 + job.HEAD_CONCURRENCY + 4,
        expected_bucket_owner=settings.expected_bucket_owner,
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
        except StopPolling:
            pass
        except ForcedExit:
            exit_status = 1
        finally:
            worker.protection.release()
        log.info("worker.stopped", signals=worker.signals, status=exit_status)
    return exit_status


def _poll(worker: Worker, *, burst: bool) -> queue.Message | None:
    worker.polling = True
    try:
        return queue.receive(
            worker.clients.sqs,
            worker.source_url,
            wait_seconds=BURST_WAIT_SECONDS if burst else queue.LONG_POLL_SECONDS,
            visibility_timeout=worker.settings.visibility_timeout,
        )
    finally:
        worker.polling = False


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
        if worker.polling:
            raise StopPolling  # idle in a 20 s long poll: leave it now, no message is in hand

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
    """Another live worker holds this request_id's lease; try again after it has finished."""


def handle(worker: Worker, message: queue.Message) -> None:
    """Work on one message and settle it: delete after success or a permanent failure, else release."""
    started = time.monotonic()
    worker.extensions = 0
    request_id: str = message.message_id
    metadata: dict[str, Any] = {}
    plan: ArchivePlan | None = None
    outcome: dict[str, Any] = {}
    with structlog.contextvars.bound_contextvars(message_id=message.message_id, request_id=request_id):
        try:
            document = job.load_document(worker.clients.s3, worker.settings, message.body)
            salvaged_id, metadata = salvage_context(document)
            request_id = salvaged_id or message.message_id
            structlog.contextvars.bind_contextvars(request_id=request_id)
            plan = plan_archive(
                parse_request(document), settings=worker.settings, message_id=message.message_id
            )
            structlog.contextvars.bind_contextvars(archive_key=plan.key)
            notification, outcome = _archive_once(worker, message, plan)
            notify.send_notification(worker.clients.sqs, worker.destination_url, notification)
            queue.delete(worker.clients.sqs, worker.source_url, message)
        except PermanentError as exc:
            outcome = {"outcome": "failed", "error_code": exc.code, "error": exc.message}
            if plan is not None:
                _record_status(worker, plan, "failed", error={"code": exc.code, "message": exc.message})
            try:
                _fail_permanently(worker, message, request_id=request_id, metadata=metadata, error=exc)
            except Exception as settle_error:
                # The notification or delete failed: the message comes back and fails the same way then.
                outcome["outcome"] = "released"
                _release(worker, message, request_id=request_id, metadata=metadata, error=settle_error)
        except (Exception, ForcedExit) as exc:
            # Once the archive is complete, status.json says so even if notifying or deleting failed:
            # the redelivery then only re-sends the notification.
            archived = outcome.get("outcome") in ("completed", "duplicate")
            outcome = {
                "outcome": "released",
                "error_code": "internal",
                "error": f"{type(exc).__name__}: {exc}",
            }
            if plan is not None and not archived and not isinstance(exc, RequestBusy):
                # Back in the queue: a redelivery may take it at once, without waiting for a lease to expire.
                _record_status(worker, plan, "queued", error={"code": "internal", "message": str(exc)[:500]})
            _release(worker, message, request_id=request_id, metadata=metadata, error=exc, archived=archived)
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
                visibility_extensions=worker.extensions,
                **outcome,
            )
            if worker.emit_metrics:
                _emit_metrics(worker, outcome, duration=duration, latency=latency, request_id=request_id)


def _emit_metrics(
    worker: Worker, outcome: dict[str, Any], *, duration: float, latency: float | None, request_id: str
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
            extensions=worker.extensions,
            properties={"request_id": request_id},
        )
    except Exception:  # metrics must never cost a request
        log.warning("metrics.failed", exc_info=True)


def _archive_once(
    worker: Worker, message: queue.Message, plan: ArchivePlan
) -> tuple[CompletedNotification, dict[str, Any]]:
    """Build the archive unless this request_id is already done (re-send its notification) or being
    built by another live worker (release and come back later)."""
    s3 = worker.clients.s3
    stored = status.read_stored(s3, bucket=plan.bucket, archive_key=plan.key)
    previous = stored.document
    if previous is not None and previous.get("status") == "completed":
        notification = _previous_notification(worker, plan, previous)
        if notification is not None:
            return notification, {"outcome": "duplicate", "size": notification.archive.size}
    if status.held_by_another_worker(previous, lease_seconds=worker.settings.visibility_timeout):
        raise RequestBusy(
            f"request {plan.request_id} is being archived by {previous and previous.get('worker')}"
        )
    progress = status.Progress(files_total=len(plan.entries))
    # Claimed before anything else: a worker that lost the race must not abort the winner's upload.
    if not _claim(worker, plan, progress, stored):
        raise RequestBusy(f"request {plan.request_id} was claimed by another worker just now")
    aborted = status.abort_stale_uploads(s3, bucket=plan.bucket, key=plan.key)
    if aborted:
        log.info("request.stale_uploads_aborted", count=aborted)
    with _heartbeat(
        worker, message, on_tick=lambda: _record_status(worker, plan, "processing", progress=progress)
    ):
        notification = job.build_archive(
            worker.clients, worker.settings, plan, progress=progress, cancelled=worker.abandon.is_set
        )
    try:
        # A CreateMultipartUpload whose answer was lost and retried by botocore leaves a twin upload
        # nobody knows the id of; the only place to find it is the listing for this key.
        status.abort_stale_uploads(s3, bucket=plan.bucket, key=plan.key)
    except Exception:
        log.warning("request.cleanup_failed", exc_info=True)
    _record_status(
        worker,
        plan,
        "completed",
        progress=progress,
        # Without the link: it is made afresh on every re-send, and a presigned one is a credential.
        notification=notification.model_dump(mode="json", exclude={"archive": {"url"}}),
    )
    return notification, {
        "outcome": "completed",
        "size": notification.archive.size,
        "entries": notification.archive.entries,
        "copied_bytes": progress.bytes_copied,
        "skipped": len(notification.skipped),
        "renamed": len(notification.renamed),
    }


def _previous_notification(
    worker: Worker, plan: ArchivePlan, document: dict[str, Any]
) -> CompletedNotification | None:
    """The stored notification of a completed request with a fresh link, if its archive still exists."""
    try:
        recorded = dict(document.get("notification") or {})
        recorded["archive"] = {**recorded.get("archive", {}), "url": ""}
        stored = CompletedNotification.model_validate(recorded)
        head = worker.clients.s3.head_object(Bucket=plan.bucket, Key=stored.archive.key)
    except (ValidationError, botocore.exceptions.ClientError):
        return None  # no usable record or the archive expired: build it again
    if head.get("Metadata", {}).get("request-id") != plan.request_id:
        return None
    url = notify.archive_url(
        worker.clients.presign, worker.settings, bucket=plan.bucket, key=stored.archive.key
    )
    return stored.model_copy(
        update={"archive": stored.archive.model_copy(update={"url": url}), "created_at": utc_timestamp()}
    )


def _record_status(
    worker: Worker,
    plan: ArchivePlan,
    state: status.Status,
    *,
    progress: status.Progress | None = None,
    error: dict[str, Any] | None = None,
    notification: dict[str, Any] | None = None,
) -> None:
    """Best effort: a status document that could not be written never fails the request."""
    try:
        status.write_status(
            worker.clients.s3,
            bucket=plan.bucket,
            archive_key=plan.key,
            request_id=plan.request_id,
            status=state,
            progress=progress or status.Progress(files_total=len(plan.entries)),
            error=error,
            notification=notification,
        )
    except Exception:
        log.warning("status.write_failed", state=state, exc_info=True)


def _claim(worker: Worker, plan: ArchivePlan, progress: status.Progress, stored: status.Stored) -> bool:
    """The lease, or False if another worker took it since the status was read. Like every status
    write, best effort: a claim that fails otherwise is logged and the build goes ahead."""
    try:
        return status.claim(
            worker.clients.s3,
            bucket=plan.bucket,
            archive_key=plan.key,
            request_id=plan.request_id,
            progress=progress,
            seen=stored,
        )
    except Exception:
        log.warning("status.write_failed", state="processing", exc_info=True)
        return True


def _fail_permanently(
    worker: Worker,
    message: queue.Message,
    *,
    request_id: str,
    metadata: dict[str, Any],
    error: PermanentError,
) -> None:
    notification = notify.failed(
        request_id=request_id, code=error.code, message=error.message, retryable=False, metadata=metadata
    )
    notify.send_notification(worker.clients.sqs, worker.destination_url, notification)
    queue.delete(worker.clients.sqs, worker.source_url, message)


def release_delay(receive_count: int, visibility_timeout: int) -> int:
    """Seconds before a failed message is seen again: grows with each delivery, so a struggling
    dependency is not hammered, and never longer than a normal visibility timeout."""
    return min(visibility_timeout, 1 << min(receive_count, 12))


def _release(
    worker: Worker,
    message: queue.Message,
    *,
    request_id: str,
    metadata: dict[str, Any],
    error: BaseException,
    archived: bool = False,
) -> None:
    # Stopped by a shutdown: hand the message straight to another worker. A JOB_TIMEOUT is a failure
    # like any other, so it backs off and ends in the DLQ if it keeps happening.
    abandoned = isinstance(error, ForcedExit) or (
        isinstance(error, JobAbandoned) and worker.stopping.is_set()
    )
    busy = isinstance(error, RequestBusy)
    if abandoned or busy:
        log.warning("request.released", reason=str(error) or type(error).__name__)
    else:
        log.error("request.error", exc_info=error)
    last = worker.max_receive_count is not None and message.receive_count >= worker.max_receive_count
    # The next receive moves it to the DLQ, whatever ended this attempt; but an archive that exists is
    # not a failure: a redrive from the DLQ re-sends its completed notification.
    if last and not archived:
        code = error.code if isinstance(error, ArchiverError) else "internal"
        notification = notify.failed(
            request_id=request_id,
            code=code,
            message=f"gave up after {message.receive_count} attempts: {type(error).__name__}: {error}",
            retryable=True,
            metadata=metadata,
        )
        with contextlib.suppress(Exception):
            notify.send_notification(worker.clients.sqs, worker.destination_url, notification)
    if abandoned:
        delay = 0
    elif busy:
        delay = worker.settings.visibility_timeout  # about when the other worker's lease would lapse
    else:
        delay = release_delay(message.receive_count, worker.settings.visibility_timeout)
    try:
        queue.set_visibility(worker.clients.sqs, worker.source_url, message, delay)
    except Exception:
        # The message reappears by itself when its visibility timeout runs out.
        log.warning("request.release_failed", exc_info=True)


@contextlib.contextmanager
def _heartbeat(worker: Worker, message: queue.Message, *, on_tick: Callable[[], None]) -> Iterator[None]:
    """While a job runs: keep its message invisible, refresh the health file, report progress through
    `on_tick` every few seconds, and abandon the job at JOB_TIMEOUT."""
    settings = worker.settings
    done = threading.Event()
    extend_every = max(1.0, min(settings.visibility_timeout / 3, HEALTH_INTERVAL))
    tick = min(extend_every, STATUS_INTERVAL)
    deadline = time.monotonic() + settings.job_timeout
    context = structlog.contextvars.get_contextvars()

    def beat() -> None:
        next_extension = time.monotonic() + extend_every
        with structlog.contextvars.bound_contextvars(**context):
            while not done.wait(tick):
                touch_health_file(settings.health_file)
                now = time.monotonic()
                if now > deadline:
                    log.warning("request.timeout", job_timeout=settings.job_timeout)
                    worker.abandon.set()
                    return
                on_tick()
                worker.protection.protect()  # renews a protection that is getting old
                if now >= next_extension:
                    next_extension = now + extend_every
                    try:
                        queue.set_visibility(
                            worker.clients.sqs, worker.source_url, message, settings.visibility_timeout
                        )
                        worker.extensions += 1
                        log.debug("request.visibility_extended", seconds=settings.visibility_timeout)
                    except Exception:
                        log.warning("request.extend_failed", exc_info=True)

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        if not worker.stopping.is_set():
            worker.abandon.clear()  # a JOB_TIMEOUT abandons one job, not the worker
