"""The poll loop: receive a message, hand it to the handler of its kind, and settle it once.

One message is worked on at a time per worker process; operators scale by running more tasks. A message
is a request (archiver.request_handler), a cancel (archiver.cancel_handler) or a fan-out segment task
(archiver.segment_handler): `handle` asks each handler in turn, the request last. From the moment a
message is received until it is settled, a heartbeat (archiver.heartbeat) keeps it invisible, refreshes
the health file, the lease and a segment's claim, enforces JOB_TIMEOUT and looks for a cancel. How the
attempt ended is one typed `settle.Outcome`, and what happens to the message is `settle.decide`'s
answer, carried out by `attempt.settle_attempt`.

Stopping, named once: a first SIGTERM or SIGINT sets `Shutdown.requested` (receive no more), and
SHUTDOWN_GRACE seconds later `Shutdown.overdue`; a second signal raises `ForcedExit`. A job is
*abandoned* (stopped at its next chunk, its upload aborted: `JobAbandoned`) when the shutdown is
overdue, at JOB_TIMEOUT, or when its lease turns out to be another worker's: `Attempt.abandon_reason`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import signal
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType

import structlog

from archiver import cancel_handler, heartbeat, job, queue, request_handler, segment_handler
from archiver.attempt import (
    Attempt,
    Handler,
    Shutdown,
    Worker,
    released,
    request_context,
    settle_attempt,
)
from archiver.aws import AwsClients, make_clients
from archiver.heartbeat import touch_health_file
from archiver.settings import Settings
from archiver.settle import release_delay

__all__ = ["ForcedExit", "Shutdown", "Worker", "connect", "handle", "release_delay", "run"]

log = structlog.get_logger(__name__)

M_ARENA_MAX = -8  # glibc's mallopt parameter number
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
BURST_WAIT_SECONDS = 1


class ForcedExit(BaseException):
    """A second signal: stop the job now, abort its upload, release its message."""


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

# Each kind of message's handler, asked in turn; a request takes whatever no other kind claims.
RECEIVERS: tuple[Callable[[queue.Message], Handler | None], ...] = (
    segment_handler.receive,
    cancel_handler.receive,
    request_handler.receive,
)


def handler_for(message: queue.Message) -> Handler:
    for receive in RECEIVERS:
        handler = receive(message)
        if handler is not None:
            return handler
    raise AssertionError("the request handler takes every message")


def handle(worker: Worker, message: queue.Message) -> None:
    """Work on one message and settle it: delete after success or a permanent failure, else release."""
    handler = handler_for(message)
    started = time.monotonic()
    attempt = Attempt(
        message=message,
        request_id=handler.request_id,
        shutdown=worker.shutdown,
        max_receive_count=worker.max_receive_count,
    )
    forced: ForcedExit | None = None
    with request_context(message_id=message.message_id, **handler.log_context):
        try:
            # Stopped before the message is settled: a beat after a release would hide it again.
            with heartbeat.running(_beats(worker, attempt)):
                outcome = handler.work(worker, attempt)
        except ForcedExit as exc:
            forced = exc
            log.warning(f"{handler.name}.released", reason="forced exit")
            outcome = released(attempt, exc, abandoned=True, answers_producer=handler.answers_producer)
        outcome = settle_attempt(worker, attempt, outcome)
        handler.report(worker, attempt, outcome, started)
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

    def stop_job(reason: heartbeat.StopReason) -> None:
        attempt.abandon_reason = reason

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
        cancelled=attempt.cancel_seen,
    )


def _renew_claim(attempt: Attempt) -> None:
    claim = attempt.claim
    if claim is None:
        return
    try:
        claim.renew()
    except Exception as exc:  # at worst another worker builds the same segment the same way
        log.warning("segment.claim_renew_failed", error=repr(exc))
