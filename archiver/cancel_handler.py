"""A cancel message, `{"cancel": {"request_id": "…"}}`, from its receipt to its outcome: the cancel
decided in the request's decision.json (archiver.decision) unless the request completed first, and the
message deleted. A cancel stops nothing itself: the worker on the request sees it within a heartbeat,
a request still to come sees it when it is received, and that one answers `cancelled` (contract §5,
delivery semantics: Cancelling). A malformed cancel is answered `failed` (invalid_request) under its own
message id, never the id it names: that request did not fail."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from archiver import decision, queue, status
from archiver.attempt import Attempt, Handler, Worker, released
from archiver.errors import PermanentError
from archiver.models import is_valid_request_id, parse_cancel
from archiver.settle import Outcome

log = structlog.get_logger(__name__)

CancelOutcome = Literal["recorded", "ignored"]


def receive(message: queue.Message) -> Handler | None:
    """The handler of a cancel: a JSON object with a top-level `cancel` (a request has none: its model
    forbids unknown fields). None for anything else, found cheaply for a big request's body."""
    if message.task is not None or '"cancel"' not in message.body:
        return None
    try:
        document = json.loads(message.body)
    except ValueError:
        return None
    if not isinstance(document, dict) or "cancel" not in document:
        return None
    target = document["cancel"].get("request_id") if isinstance(document["cancel"], dict) else None
    handling = _Cancel(document)
    return Handler(
        name="cancel",
        # Its own id: what a malformed cancel's failed notice is sent under.
        request_id=message.message_id,
        log_context={"request_id": target if is_valid_request_id(target) else message.message_id},
        work=handling.work,
        report=handling.report,
    )


@dataclass
class _Cancel:
    document: dict[str, Any]
    outcome: CancelOutcome | None = None
    reason: str = ""

    def work(self, worker: Worker, attempt: Attempt) -> Outcome:
        try:
            request_id = parse_cancel(self.document).cancel.request_id
        except PermanentError as exc:
            return Outcome("failed", error_code=exc.code, error=exc.message)
        try:
            self.outcome, self.reason = decide_cancel(worker, request_id)
        except Exception as exc:
            log.error("cancel.error", exc_info=exc)
            return released(attempt, exc)
        return Outcome("done", answers_producer=False)

    def report(self, worker: Worker, attempt: Attempt, outcome: Outcome, started: float) -> None:
        level = log.info if outcome.kind == "done" else log.warning
        level(
            "cancel.done",
            outcome=self.outcome or outcome.kind,
            reason=self.reason or outcome.error,
            receive_count=attempt.message.receive_count,
            duration_s=round(time.monotonic() - started, 3),
        )


def decide_cancel(worker: Worker, request_id: str) -> tuple[CancelOutcome, str]:
    """Decide `cancelled` for the request unless it completed first; what came of it, and why."""
    s3, settings = worker.clients.s3, worker.settings
    bucket = settings.s3_destination_bucket
    # A request completed before decision.json existed (an archiver older than cancels) has none.
    stored, _ = status.read_document(
        s3, bucket, status.request_status_key(settings.s3_file_prefix, request_id)
    )
    state = (stored or {}).get("status") or "not received yet"
    if state == "completed":
        return "ignored", "the request completed before the cancel arrived"
    place = decision.place_of(s3, settings, request_id)
    decided = decision.take(place, "cancelled", keep_seconds=settings.cancel_retention)
    if decided.verdict == "completed":
        return "ignored", "the request's completion was decided before the cancel"
    return "recorded", f"the request was {state}; cancels it until {decided.expires_at}"
