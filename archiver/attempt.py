"""One delivery of one message, whatever its kind: what a worker works with (`Worker`), the delivery's
state (`Attempt`), what handles a kind of message (`Handler`), and carrying out the one decision
`settle.decide` makes from how it ended (`settle_attempt`): notify, write the status, delete or release.

The worker (archiver.worker) receives a message, asks each kind's handler in turn whether the message is
theirs, runs the handler's `work` under the heartbeat, settles the outcome here and lets the handler
report it. Adding a kind of message is adding a handler.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog

from archiver import decision, notify, queue, settle, status
from archiver.aws import AwsClients
from archiver.errors import clip
from archiver.fanout.claims import Claim
from archiver.heartbeat import StopReason
from archiver.notices import CompletedNotification
from archiver.protection import TaskProtection
from archiver.publish import publish
from archiver.settings import Settings
from archiver.settle import Outcome

log = structlog.get_logger(__name__)


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


AbandonReason = StopReason


@dataclass
class Attempt:
    """One delivery of one message, from its receipt until it is deleted or released."""

    message: queue.Message
    request_id: str
    shutdown: Shutdown
    max_receive_count: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    lease: status.Lease | None = None
    progress: status.Progress = field(default_factory=status.Progress)
    notification: CompletedNotification | None = None  # once the archive exists
    extensions: int = 0  # visibility extensions, for the metrics
    abandon_reason: AbandonReason | None = None  # set by the heartbeat
    claim: Claim | None = None  # on the fan-out segment this worker is building, renewed by the heartbeat
    # Where the request's decision is, once the worker works on it: the heartbeat looks there for a cancel.
    decision_place: decision.Place | None = None
    cancelled_at: str | None = None  # when the cancel that ended it was decided

    def cancel_seen(self) -> bool:
        """Whether a cancel binds this request now (archiver.decision); a failed look is no cancel."""
        if self.decision_place is None:
            return False
        try:
            found = decision.cancelled(self.decision_place)
        except Exception as exc:
            log.warning("decision.read_failed", error=repr(exc))
            return False
        if found is not None:
            self.cancelled_at = found.decided_at
        return found is not None

    @property
    def last_delivery(self) -> bool:
        return self.max_receive_count is not None and self.message.receive_count >= self.max_receive_count

    @property
    def archived(self) -> bool:
        """The archive exists and status.json says `completed` (or it was found so)."""
        return self.notification is not None

    def abandoned(self) -> bool:
        """Whether the job must stop at its next chunk: shutdown overdue, JOB_TIMEOUT, or a lost lease."""
        return self.abandon_reason is not None or self.shutdown.overdue.is_set()

    def hold(self, claim: Claim | None) -> None:
        """The segment claim the heartbeat renews from now on (None: none)."""
        self.claim = claim


@dataclass(frozen=True)
class Handler:
    """What the worker does with one kind of message. `work` turns the delivery into its Outcome, every
    way it can end (a second stop signal aside); `report` writes its canonical log line, and metrics,
    once the message is settled."""

    name: str  # the first word of its log events: `request.done`, `segment_task.done`
    request_id: str  # as far as it is known on receipt
    log_context: dict[str, Any]
    work: Callable[[Worker, Attempt], Outcome]
    report: Callable[[Worker, Attempt, Outcome, float], None]
    answers_producer: bool = True  # False: nobody waits on it, so it never gets a failed notice


@contextlib.contextmanager
def request_context(**values: Any) -> Iterator[None]:
    """Log context for one message: whatever is bound inside (the archive key, the request id once the
    body is read) is gone afterwards, so nothing leaks into the next message's lines."""
    before = structlog.contextvars.get_contextvars()
    structlog.contextvars.bind_contextvars(**values)
    try:
        yield
    finally:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(**before)


def released(
    attempt: Attempt, error: BaseException, *, abandoned: bool = False, answers_producer: bool = True
) -> Outcome:
    message = clip(f"{type(error).__name__}: {error}")
    return Outcome(
        "released",
        error_code="internal",
        error=message,
        archived=attempt.archived,
        abandoned=abandoned,
        answers_producer=answers_producer,
    )


def settle_attempt(worker: Worker, attempt: Attempt, outcome: Outcome) -> Outcome:
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
        error = {"code": outcome.error_code, "message": outcome.error} if outcome.error_code else None
        write_status(attempt, settlement.status, error=error)
    try:
        _deliver(worker, attempt, settlement)
    except Exception as exc:
        log.error("request.settle_failed", exc_info=exc)
        retry = released(attempt, exc, answers_producer=outcome.answers_producer)
        with contextlib.suppress(Exception):
            _deliver(worker, attempt, decide(retry))
        return retry
    return outcome


def _deliver(worker: Worker, attempt: Attempt, settlement: settle.Settlement) -> None:
    """Notify, then delete or release the message, as settled."""
    sqs = worker.clients.sqs
    if settlement.send_completed and attempt.notification is not None:
        _notify(worker, attempt.notification)
    if settlement.send_cancelled:
        answer = notify.cancelled(
            request_id=attempt.request_id,
            cancelled_at=attempt.cancelled_at or "",
            metadata=attempt.metadata,
        )
        _notify(worker, answer)
    if (notice := settlement.failed_notice) is not None:
        failed = notify.failed(
            request_id=attempt.request_id,
            code=notice.code,
            message=notice.message,
            retryable=notice.retryable,
            metadata=attempt.metadata,
        )
        if settlement.delete:
            _notify(worker, failed)  # must arrive before the delete
        else:
            with contextlib.suppress(Exception):  # the release matters more than this notice
                _notify(worker, failed)
    if settlement.delete:
        queue.delete(sqs, worker.source_url, attempt.message)
    else:
        set_visibility(worker, attempt.message, settlement.release_after or 0)


def _notify(worker: Worker, notification: notify.Notice) -> None:
    publish(worker.clients, worker.settings, worker.destination_url, notification)


def write_status(attempt: Attempt, state: status.Status, *, error: dict[str, Any] | None = None) -> None:
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


def set_visibility(worker: Worker, message: queue.Message, seconds: int) -> None:
    try:
        queue.set_visibility(worker.clients.sqs, worker.source_url, message, seconds)
    except Exception as exc:
        # The message reappears by itself when its visibility timeout runs out.
        log.warning("request.release_failed", error=repr(exc))
