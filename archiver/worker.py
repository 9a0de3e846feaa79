"""The poll loop: receive a request, archive it, notify, and settle its message once.

One message is worked on at a time per worker process; operators scale by running more tasks. From the
moment a message is received until it is settled, a heartbeat (archiver.heartbeat) keeps it invisible,
refreshes the health file and the lease, and enforces JOB_TIMEOUT. How the attempt ended is one typed
`settle.Outcome`, and what happens to the message is `settle.decide`'s answer.

Stopping, named once: a first SIGTERM or SIGINT sets `Shutdown.requested` (receive no more), and
SHUTDOWN_GRACE seconds later `Shutdown.overdue`; a second signal raises `ForcedExit`. A job is
*abandoned* (stopped at its next chunk, its upload aborted: `JobAbandoned`) when the shutdown is
overdue, at JOB_TIMEOUT, or when its lease turns out to be another worker's: `Attempt.abandon_reason`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import FrameType
from typing import Any, Literal

import botocore.exceptions
import structlog
from pydantic import ValidationError

from archiver import fanout, heartbeat, job, metrics, notify, queue, request, settle, status
from archiver.aws import AwsClients, http_status, make_clients
from archiver.errors import JobAbandoned, PermanentError, TransientError, clip
from archiver.heartbeat import touch_health_file
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
from archiver.settle import Outcome, release_delay

__all__ = ["ForcedExit", "Worker", "connect", "handle", "release_delay", "run"]

log = structlog.get_logger(__name__)

M_ARENA_MAX = -8  # glibc's mallopt parameter number
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
BURST_WAIT_SECONDS = 1


class ForcedExit(BaseException):
    """A second signal: stop the job now, abort its upload, release its message."""


@dataclass
class Shutdown:
    """What stop signals have asked for so far."""

    requested: threading.Event = field(default_factory=threading.Event)  # receive no more messages
    overdue: threading.Event = field(default_factory=threading.Event)  # SHUTDOWN_GRACE ran out
    signals: int = 0


@dataclass
class Worker:
    """Everything a worker needs, built once at start-up."""

    settings: Settings
    clients: AwsClients
    source_url: str
    destination_url: str
    max_receive_count: int | None
    shutdown: Shutdown = field(default_factory=Shutdown)
    protection: TaskProtection = field(default_factory=TaskProtection)
    emit_metrics: bool = True


def connect(settings: Settings, clients: AwsClients | None = None) -> Worker:
    clients = clients or make_clients(
        max_connections=job.s3_connections(settings),
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
    back when its upload is done. And at most 2 heaps (arenas): glibc gives up to 8 per core to threads
    that allocate at once, and the 32 source readers (and obstore's own threads) each kept freed bodies
    in their own, 12-55 MiB of peak RSS on 400 x 3 MiB (measured). A no-op where the C library is not
    glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
        libc.mallopt(M_ARENA_MAX, 2)
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------------------- the loop


def run(worker: Worker, *, burst: bool = False) -> int:
    """Poll until stopped (or, in burst mode, until the queue is empty). Returns the exit status."""
    exit_status = 0
    shutdown = worker.shutdown
    with _signal_handlers(worker):
        log.info("worker.started", source_queue=worker.source_url, burst=burst)
        try:
            while not shutdown.requested.is_set():
                touch_health_file(worker.settings.health_file)
                message = _poll(worker, burst=burst)
                if message is None:
                    if burst:
                        break
                    continue
                if shutdown.requested.is_set():
                    # Received as the stop signal came: hand it straight back rather than start it.
                    queue.set_visibility(worker.clients.sqs, worker.source_url, message, 0)
                    break
                # Protected only while there is work in hand, as AWS advises for queue workers: an idle
                # task stays free to be scaled in or replaced. The moment between the receive and this
                # call is covered by the SIGTERM path above.
                worker.protection.protect()
                try:
                    handle(worker, message)
                finally:
                    worker.protection.release()
        except ForcedExit:
            exit_status = 1
        log.info("worker.stopped", signals=shutdown.signals, status=exit_status)
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
        yield  # signals reach the main thread only; an embedded worker is stopped through its Shutdown
        return

    shutdown = worker.shutdown

    def on_signal(signum: int, _: FrameType | None) -> None:
        shutdown.signals += 1
        if shutdown.signals > 1:
            raise ForcedExit(signal.Signals(signum).name)
        log.info("worker.stopping", signal=signal.Signals(signum).name, grace=worker.settings.shutdown_grace)
        shutdown.requested.set()
        timer = threading.Timer(worker.settings.shutdown_grace, shutdown.overdue.set)
        timer.daemon = True
        timer.start()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------------------- one message


class RequestBusy(TransientError):
    """Another worker holds this request_id's lease (or took it from this one): not a failure of the
    request, so it is deferred until the lease ends and never reported to the producer as failed."""

    def __init__(self, message: str, *, retry_after: int, holder_message_id: str | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.holder_message_id = holder_message_id


AbandonReason = Literal["timeout", "lease_lost"]


@dataclass
class Attempt:
    """One delivery of one message, from its receipt until it is deleted or released."""

    message: queue.Message
    request_id: str
    shutdown: Shutdown
    metadata: dict[str, Any] = field(default_factory=dict)
    lease: status.Lease | None = None
    progress: status.Progress = field(default_factory=status.Progress)
    notification: CompletedNotification | None = None  # once the archive exists
    extensions: int = 0  # visibility extensions, for the metrics
    abandon_reason: AbandonReason | None = None  # set by the heartbeat
    claim: fanout.Claim | None = (
        None  # on the fan-out segment this worker is building, renewed by the heartbeat
    )

    @property
    def last_delivery(self) -> bool:
        return self.max_receive_count is not None and self.message.receive_count >= self.max_receive_count

    max_receive_count: int | None = None

    @property
    def archived(self) -> bool:
        """The archive exists and status.json says `completed` (or it was found so)."""
        return self.notification is not None

    def abandoned(self) -> bool:
        """Whether the job must stop at its next chunk: shutdown overdue, JOB_TIMEOUT, or a lost lease."""
        return self.abandon_reason is not None or self.shutdown.overdue.is_set()


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
    task = fanout.parse_task(message)
    if task is not None:
        _handle_task(worker, message, task)
        return
    started = time.monotonic()
    attempt = _attempt(worker, message, message.message_id)
    forced: ForcedExit | None = None
    with request_context(message_id=message.message_id, request_id=message.message_id):
        try:
            # Stopped before the message is settled: a beat after a release would hide it again.
            with heartbeat.running(_beats(worker, attempt)):
                outcome = _outcome_of(worker, attempt)
        except ForcedExit as exc:
            forced = exc
            log.warning("request.released", reason="forced exit")
            outcome = _released(attempt, exc, abandoned=True)
        outcome = _settle(worker, attempt, outcome)
        _report(worker, attempt, outcome, started)
    if forced is not None:
        raise forced


def _beats(worker: Worker, attempt: Attempt) -> heartbeat.Beats:
    settings, sqs = worker.settings, worker.clients.sqs

    def renew_lease() -> bool:
        _renew_claim(attempt)
        try:
            return attempt.lease is None or attempt.lease.renew(attempt.progress)
        except Exception as exc:
            log.warning("status.write_failed", state="processing", error=repr(exc))
            return True

    def stop_job(reason: str) -> None:
        attempt.abandon_reason = "lease_lost" if reason == "lease_lost" else "timeout"

    def extended() -> None:
        attempt.extensions += 1

    return heartbeat.Beats(
        health_file=settings.health_file,
        visibility_timeout=settings.visibility_timeout,
        job_timeout=settings.job_timeout,
        extend_visibility=lambda: queue.set_visibility(
            sqs, worker.source_url, attempt.message, settings.visibility_timeout
        ),
        renew_lease=renew_lease,
        renew_protection=worker.protection.protect,
        stop_job=stop_job,
        on_extended=extended,
    )


def _attempt(worker: Worker, message: queue.Message, request_id: str) -> Attempt:
    return Attempt(
        message=message,
        request_id=request_id,
        shutdown=worker.shutdown,
        max_receive_count=worker.max_receive_count,
    )


def _renew_claim(attempt: Attempt) -> None:
    claim = attempt.claim
    if claim is None:
        return
    try:
        claim.renew()
    except Exception as exc:  # at worst another worker builds the same segment the same way
        log.warning("segment.claim_renew_failed", error=repr(exc))


def _handle_task(worker: Worker, message: queue.Message, task: fanout.SegmentTask) -> None:
    """A fan-out segment task: build the segment, or find there is nothing to do, and delete the task;
    on an error, release it for another try (its last try records the failure for the coordinator)."""
    started = time.monotonic()
    attempt = _attempt(worker, message, task.request_id)
    run = fanout.TaskRun()
    plan_dir = fanout.request_dir(worker.settings.s3_file_prefix, task.request_id)
    with request_context(
        message_id=message.message_id, request_id=task.request_id, segment=task.segment, archive_dir=plan_dir
    ):
        try:
            with heartbeat.running(_beats(worker, attempt)):
                fanout.run_task(
                    worker.clients,
                    worker.settings,
                    task,
                    run,
                    abandoned=attempt.abandoned,
                    last_delivery=attempt.last_delivery,
                    hold=lambda claim: setattr(attempt, "claim", claim),
                )
            queue.delete(worker.clients.sqs, worker.source_url, message)
        except ForcedExit:
            _set_visibility(worker, message, 0)
            raise
        except Exception as exc:
            run.outcome = "released"
            shutdown = isinstance(exc, JobAbandoned) and worker.shutdown.requested.is_set()
            if shutdown:
                log.warning("segment_task.released", reason=str(exc))
            else:
                log.error("segment_task.error", exc_info=exc)
            delay = (
                0 if shutdown else release_delay(message.receive_count, worker.settings.visibility_timeout)
            )
            _set_visibility(worker, message, delay)
        log.info(
            "segment_task.done",
            outcome=run.outcome,
            reason=run.reason or None,
            receive_count=message.receive_count,
            duration_s=round(time.monotonic() - started, 3),
        )


def _outcome_of(worker: Worker, attempt: Attempt) -> Outcome:
    """Work on the request; every way it can end, as an Outcome (ForcedExit aside)."""
    try:
        return _work(worker, attempt)
    except PermanentError as exc:
        return Outcome("failed", error_code=exc.code, error=exc.message)
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
        return _released(attempt, exc, abandoned=abandoned)


def _released(attempt: Attempt, error: BaseException, *, abandoned: bool = False) -> Outcome:
    message = clip(f"{type(error).__name__}: {error}")
    return Outcome(
        "released", error_code="internal", error=message, archived=attempt.archived, abandoned=abandoned
    )


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


def _settle(worker: Worker, attempt: Attempt, outcome: Outcome) -> Outcome:
    """Carry out the decision for `outcome`. If notifying or deleting fails, the message is released
    instead (it comes back, and a built archive is only re-notified then): that is the outcome."""
    decide = functools.partial(
        settle.decide,
        receive_count=attempt.message.receive_count,
        max_receive_count=worker.max_receive_count,
        visibility_timeout=worker.settings.visibility_timeout,
    )
    settlement = decide(outcome)
    if settlement.status is not None:
        _write_status(
            attempt, settlement.status, error={"code": outcome.error_code, "message": outcome.error}
        )
    try:
        _deliver(worker, attempt, settlement)
    except Exception as exc:
        log.error("request.settle_failed", exc_info=exc)
        retry = _released(attempt, exc)
        with contextlib.suppress(Exception):
            _deliver(worker, attempt, decide(retry))
        return retry
    return outcome


def _deliver(worker: Worker, attempt: Attempt, settlement: settle.Settlement) -> None:
    """Notify, then delete or release the message, as settled."""
    sqs = worker.clients.sqs
    if settlement.send_completed and attempt.notification is not None:
        notify.send_notification(sqs, worker.destination_url, attempt.notification)
    if (notice := settlement.failed_notice) is not None:
        failed = notify.failed(
            request_id=attempt.request_id,
            code=notice.code,
            message=notice.message,
            retryable=notice.retryable,
            metadata=attempt.metadata,
        )
        if settlement.delete:
            notify.send_notification(sqs, worker.destination_url, failed)  # must arrive before the delete
        else:
            with contextlib.suppress(Exception):  # the release matters more than this notice
                notify.send_notification(sqs, worker.destination_url, failed)
    if settlement.delete:
        queue.delete(sqs, worker.source_url, attempt.message)
    else:
        _set_visibility(worker, attempt.message, settlement.release_after or 0)


def _report(worker: Worker, attempt: Attempt, outcome: Outcome, started: float) -> None:
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
        # Without the link: it is made afresh on every re-send, and a presigned one is a credential.
        notification=notification.model_dump(mode="json", exclude={"archive": {"url"}}),
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
    return attempt.lease


def _build(
    worker: Worker,
    attempt: Attempt,
    plan: ArchivePlan,
    lease: status.Lease,
    coordinator: fanout.Coordinator | None,
) -> CompletedNotification:
    try:
        if coordinator is not None:
            fanned = _fan_out(worker, plan, coordinator)
            if fanned is not None:
                return fanned
        return job.build_archive(
            worker.clients,
            worker.settings,
            plan,
            progress=attempt.progress,
            abandoned=attempt.abandoned,
            # A worker that stalled past its lease finds out here at the latest, before its archive
            # replaces the one the new holder may have completed.
            confirm=lambda: lease.write("processing", attempt.progress),
        )
    except JobAbandoned:
        if attempt.abandon_reason == "lease_lost":
            raise status.LeaseLost(f"request {plan.request_id}: another worker took its lease") from None
        raise


def _coordinator(
    worker: Worker, attempt: Attempt, plan: ArchivePlan, lease: status.Lease
) -> fanout.Coordinator:
    """This request's fan-out coordinator, which reads the request's stored plan, if any, once."""
    return fanout.Coordinator(
        clients=worker.clients,
        settings=worker.settings,
        plan=plan,
        source_url=worker.source_url,
        progress=attempt.progress,
        abandoned=attempt.abandoned,
        confirm=lambda: lease.write("processing", attempt.progress),
        last_delivery=attempt.last_delivery,
        hold=lambda claim: setattr(attempt, "claim", claim),
    )


def _fan_out(
    worker: Worker, plan: ArchivePlan, coordinator: fanout.Coordinator
) -> CompletedNotification | None:
    """The archive built by segments over the fleet, or None when the request is too small to fan out."""
    fanned = coordinator.build()
    if fanned is None:
        return None
    return job.completed_notification(
        worker.clients, worker.settings, plan, fanned.uploaded, paths=fanned.paths, missing=fanned.missing
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


def _write_status(attempt: Attempt, state: status.Status, *, error: dict[str, Any] | None = None) -> None:
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


def _set_visibility(worker: Worker, message: queue.Message, seconds: int) -> None:
    try:
        queue.set_visibility(worker.clients.sqs, worker.source_url, message, seconds)
    except Exception as exc:
        # The message reappears by itself when its visibility timeout runs out.
        log.warning("request.release_failed", error=repr(exc))
