"""The settle decision, case by case: from how an attempt ended and which delivery it was, what happens
to the message (delete or release, and after how long), which notice goes out, which status is written."""

from __future__ import annotations

import pytest

from archiver.settings import SQS_MAX_VISIBILITY
from archiver.settle import FailedNotice, Outcome, Settlement, decide, release_delay

VISIBILITY = 120
MAX_RECEIVES = 5


def settled(
    outcome: Outcome, receive_count: int = 1, max_receive_count: int | None = MAX_RECEIVES
) -> Settlement:
    return decide(
        outcome,
        receive_count=receive_count,
        max_receive_count=max_receive_count,
        visibility_timeout=VISIBILITY,
    )


@pytest.mark.parametrize("kind", ["completed", "duplicate"])
@pytest.mark.parametrize("receive_count", [1, MAX_RECEIVES])
def test_an_archive_is_notified_then_its_message_deleted(kind: str, receive_count: int) -> None:
    outcome = Outcome(kind, size=10, entries=1)  # type: ignore[arg-type]
    assert settled(outcome, receive_count) == Settlement(delete=True, send_completed=True)


@pytest.mark.parametrize("receive_count", [1, MAX_RECEIVES, MAX_RECEIVES + 1])
def test_a_cancelled_request_is_answered_recorded_and_deleted(receive_count: int) -> None:
    """On any delivery: the `cancelled` notification, the status, the delete; never a failed notice."""
    outcome = Outcome("cancelled", error="cancelled while it was being built")
    assert settled(outcome, receive_count) == Settlement(delete=True, send_cancelled=True, status="cancelled")
    assert outcome.log_fields() == {"outcome": "cancelled", "reason": "cancelled while it was being built"}


@pytest.mark.parametrize("receive_count", [1, MAX_RECEIVES])
def test_a_permanent_failure_is_reported_recorded_and_deleted(receive_count: int) -> None:
    outcome = Outcome("failed", error_code="source_not_found", error="1 source(s) not found: a.txt")
    assert settled(outcome, receive_count) == Settlement(
        delete=True,
        failed_notice=FailedNotice("source_not_found", "1 source(s) not found: a.txt", retryable=False),
        status="failed",
    )


@pytest.mark.parametrize(("receive_count", "delay"), [(1, 2), (2, 4), (3, 8), (7, 120), (20, 120)])
def test_a_transient_failure_is_released_with_a_growing_delay_and_queued(
    receive_count: int, delay: int
) -> None:
    outcome = Outcome("released", error_code="internal", error="TransientError: SlowDown")
    assert settled(outcome, receive_count, max_receive_count=None) == Settlement(
        delete=False, release_after=delay, status="queued"
    )


def test_the_last_delivery_of_a_failing_request_sends_a_retryable_notice() -> None:
    outcome = Outcome("released", error_code="internal", error="TransientError: SlowDown")
    assert settled(outcome, MAX_RECEIVES) == Settlement(
        delete=False,
        release_after=release_delay(MAX_RECEIVES, VISIBILITY),
        failed_notice=FailedNotice(
            "internal", f"gave up after {MAX_RECEIVES} attempts: TransientError: SlowDown", retryable=True
        ),
        status="queued",
    )


def test_a_delivery_past_the_redrive_count_is_the_last_too() -> None:
    outcome = Outcome("released", error_code="internal", error="x")
    assert settled(outcome, MAX_RECEIVES + 1).failed_notice is not None
    assert settled(outcome, MAX_RECEIVES - 1).failed_notice is None


@pytest.mark.parametrize("receive_count", [1, MAX_RECEIVES])
def test_a_built_archive_whose_notice_or_delete_failed_is_released_without_failure(
    receive_count: int,
) -> None:
    """The archive exists: no `queued` over `completed`, no failed notice even on the last delivery
    (a redrive re-sends the completed notification)."""
    outcome = Outcome("released", error_code="internal", error="ClientError: send failed", archived=True)
    assert settled(outcome, receive_count) == Settlement(
        delete=False, release_after=release_delay(receive_count, VISIBILITY)
    )


@pytest.mark.parametrize("receive_count", [1, MAX_RECEIVES])
def test_a_job_stopped_by_a_shutdown_goes_straight_back(receive_count: int) -> None:
    """A shutdown (its grace over, or a second signal): visibility 0, so another worker takes it now."""
    outcome = Outcome("released", error_code="internal", error="ForcedExit: SIGTERM", abandoned=True)
    settlement = settled(outcome, receive_count)
    assert (settlement.delete, settlement.release_after, settlement.status) == (False, 0, "queued")
    assert (settlement.failed_notice is not None) is (receive_count == MAX_RECEIVES)


@pytest.mark.parametrize("another", [True, False])
def test_a_busy_request_waits_for_the_lease_and_is_never_reported(another: bool) -> None:
    outcome = Outcome("deferred", error="busy", retry_after=37, holder_is_another_message=another)
    assert settled(outcome, 1) == Settlement(delete=False, release_after=37)


def test_a_busy_duplicate_on_its_last_delivery_is_deleted_not_dead_lettered() -> None:
    """Another message for the request: the holder answers, so this one goes without a notice."""
    outcome = Outcome("deferred", error="busy", retry_after=37, holder_is_another_message=True)
    assert settled(outcome, MAX_RECEIVES) == Settlement(delete=True)


def test_the_holders_own_message_on_its_last_delivery_is_only_released() -> None:
    outcome = Outcome("deferred", error="busy", retry_after=37, holder_is_another_message=False)
    assert settled(outcome, MAX_RECEIVES) == Settlement(delete=False, release_after=37)


def test_a_deferral_stays_within_sqs_limit() -> None:
    outcome = Outcome("deferred", error="busy", retry_after=SQS_MAX_VISIBILITY * 2)
    assert settled(outcome).release_after == SQS_MAX_VISIBILITY


@pytest.mark.parametrize("receive_count", [1, MAX_RECEIVES])
def test_a_message_nobody_waits_on_is_deleted_once_done(receive_count: int) -> None:
    """A segment task whose work is over (built, nothing to do, or its failure recorded): deleted, with
    no notice and no status."""
    outcome = Outcome("done", answers_producer=False)
    assert settled(outcome, receive_count) == Settlement(delete=True)


@pytest.mark.parametrize("receive_count", [1, MAX_RECEIVES, MAX_RECEIVES + 1])
@pytest.mark.parametrize("abandoned", [False, True])
def test_a_released_message_nobody_waits_on_is_never_answered(receive_count: int, abandoned: bool) -> None:
    """A segment task that failed or was stopped comes back like a request, but gets no failed notice on
    its last delivery (its coordinator answers for the request) and writes no status."""
    outcome = Outcome(
        "released", error_code="internal", error="x", abandoned=abandoned, answers_producer=False
    )
    delay = 0 if abandoned else release_delay(receive_count, VISIBILITY)
    assert settled(outcome, receive_count) == Settlement(delete=False, release_after=delay)


def test_the_log_line_carries_only_what_applies() -> None:
    """The outcome's fields on `request.done`: sizes when built, code and message when not, the reason
    when deferred."""
    assert Outcome("completed", size=3, entries=1, copied_bytes=0, skipped=0, renamed=0).log_fields() == {
        "outcome": "completed",
        "size": 3,
        "entries": 1,
        "copied_bytes": 0,
        "skipped": 0,
        "renamed": 0,
    }
    assert Outcome("failed", error_code="too_large", error="x").log_fields() == {
        "outcome": "failed",
        "error_code": "too_large",
        "error": "x",
    }
    assert Outcome("deferred", error="busy", retry_after=3).log_fields() == {
        "outcome": "deferred",
        "reason": "busy",
    }
