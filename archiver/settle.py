"""How one attempt at a request ended, and what then happens to its message: one typed outcome, read by
the log line, the metrics and the status, and one pure decision (`decide`), unit-tested case by case."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from archiver.errors import ErrorCode
from archiver.settings import SQS_MAX_VISIBILITY

OutcomeKind = Literal["completed", "duplicate", "failed", "deferred", "released", "done", "cancelled"]
StatusToWrite = Literal["failed", "queued", "cancelled"]


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended.

    completed / duplicate: the archive exists and its notification is to be sent. failed: a permanent
    error. deferred: another worker holds the request. released: anything else (a transient error, a
    stop), `archived` when the archive was built and only notifying or deleting failed. cancelled: a
    cancel decided the request's end (archiver.decision), its upload aborted. done: a message
    with no producer waiting on it (a fan-out segment task) whose work is over, whatever it came to.
    Such a message is never answered: `answers_producer` is False, and it writes no status."""

    kind: OutcomeKind
    error_code: ErrorCode | None = None
    error: str | None = None
    archived: bool = False
    abandoned: bool = False  # stopped by a shutdown: another worker should take it at once
    retry_after: int = 0  # deferred: seconds until the holder's lease ends
    holder_is_another_message: bool = False  # deferred: the holder works on a different message
    size: int | None = None
    entries: int | None = None
    copied_bytes: int | None = None
    skipped: int | None = None
    renamed: int | None = None
    answers_producer: bool = True

    def log_fields(self) -> dict[str, Any]:
        """The outcome's part of the `request.done` line: only what applies."""
        fields: dict[str, Any] = {"outcome": self.kind}
        if self.kind in ("deferred", "cancelled"):
            fields["reason"] = self.error
        elif self.error is not None:
            fields.update(error_code=self.error_code, error=self.error)
        for name in ("size", "entries", "copied_bytes", "skipped", "renamed"):
            if (value := getattr(self, name)) is not None:
                fields[name] = value
        return fields


@dataclass(frozen=True)
class FailedNotice:
    code: ErrorCode
    message: str
    retryable: bool


@dataclass(frozen=True)
class Settlement:
    """What to do with the message: notify (the completed or cancelled notification, or a failed
    notice), write the status under this worker's lease, then delete it or release it with a delay."""

    delete: bool
    release_after: int | None = None  # seconds of invisibility when released
    send_completed: bool = False
    send_cancelled: bool = False
    failed_notice: FailedNotice | None = None
    status: StatusToWrite | None = None


def release_delay(receive_count: int, visibility_timeout: int) -> int:
    """Seconds before a failed message is seen again: grows with each delivery, so a struggling
    dependency is not hammered, and never longer than a normal visibility timeout."""
    return min(visibility_timeout, 1 << min(receive_count, 12))


def decide(
    outcome: Outcome, *, receive_count: int, max_receive_count: int | None, visibility_timeout: int
) -> Settlement:
    """The one decision about a message, from how its attempt ended and which delivery it was."""
    last = max_receive_count is not None and receive_count >= max_receive_count
    if outcome.kind in ("completed", "duplicate"):
        return Settlement(delete=True, send_completed=True)
    if outcome.kind == "done":
        return Settlement(delete=True)
    if outcome.kind == "cancelled":
        return Settlement(delete=True, send_cancelled=True, status="cancelled")
    if outcome.kind == "failed":
        permanent = FailedNotice(
            code=outcome.error_code or "internal", message=outcome.error or "", retryable=False
        )
        return Settlement(delete=True, failed_notice=permanent, status="failed")
    if outcome.kind == "deferred":
        # Not a failure: another worker answers for the request. Its own message only waits; another
        # message for the request is deleted rather than dead-lettered on its last delivery.
        if last and outcome.holder_is_another_message:
            return Settlement(delete=True)
        return Settlement(delete=False, release_after=min(outcome.retry_after, SQS_MAX_VISIBILITY))
    # Released. The next receive moves the last delivery to the DLQ, whatever ended it; but an archive
    # that exists is not a failure (a redrive re-sends its completed notification).
    # A message nobody waits on (a segment task) is answered by its coordinator, not here.
    answer = outcome.answers_producer and not outcome.archived
    notice: FailedNotice | None = None
    if last and answer:
        message = f"gave up after {receive_count} attempts: {outcome.error}"
        notice = FailedNotice(code=outcome.error_code or "internal", message=message, retryable=True)
    # Back in the queue: a redelivery may take it at once, without waiting for a lease to expire.
    status: StatusToWrite | None = "queued" if answer else None
    delay = 0 if outcome.abandoned else release_delay(receive_count, visibility_timeout)
    return Settlement(delete=False, release_after=delay, failed_notice=notice, status=status)
