"""A fan-out segment task, from its receipt to its outcome: the segment built into its request's upload
(or nothing to do: built already, being built, a chained one, no live plan, the request cancelled), and
the task deleted; on an error it is released for another try, and its last try records the failure for
the coordinator. Nobody waits on a task: it never gets a notification."""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog

from archiver import decision, queue
from archiver.attempt import Attempt, Handler, Worker, released
from archiver.errors import JobAbandoned
from archiver.fanout.tasks import SegmentTask, TaskRun, parse_task, run_task
from archiver.models import request_dir
from archiver.settle import Outcome

log = structlog.get_logger(__name__)


def receive(message: queue.Message) -> Handler | None:
    """The handler of a segment task, or None if the message is not one (archiver.fanout.tasks)."""
    task = parse_task(message)
    if task is None:
        return None
    handling = _SegmentTask(task)
    return Handler(
        name="segment_task",
        request_id=task.request_id,
        log_context={"request_id": task.request_id, "segment": task.segment},
        work=handling.work,
        report=handling.report,
        answers_producer=False,
    )


@dataclass
class _SegmentTask:
    task: SegmentTask
    run: TaskRun | None = None  # how it went, once it went anywhere but back to the queue

    def work(self, worker: Worker, attempt: Attempt) -> Outcome:
        settings = worker.settings
        directory = request_dir(settings.s3_file_prefix, self.task.request_id)
        structlog.contextvars.bind_contextvars(archive_dir=directory)
        # The heartbeat looks for a cancel of the request from now on; one already there drops the task.
        attempt.decision_place = decision.place_of(worker.clients.s3, settings, self.task.request_id)
        if attempt.cancel_seen():
            self.run = TaskRun(reason="the request was cancelled")
            return Outcome("done", answers_producer=False)
        try:
            self.run = run_task(
                worker.clients,
                settings,
                self.task,
                abandoned=attempt.abandoned,
                last_delivery=attempt.last_delivery,
                hold=attempt.hold,
            )
        except Exception as exc:
            # Stopped by the cancel, or failed because its coordinator aborted the upload for it.
            if attempt.abandon_reason == "cancelled" or attempt.cancel_seen():
                self.run = TaskRun(reason="the request was cancelled")
                return Outcome("done", answers_producer=False)
            shutdown = isinstance(exc, JobAbandoned) and worker.shutdown.requested.is_set()
            if shutdown:
                log.warning("segment_task.released", reason=str(exc))
            else:
                log.error("segment_task.error", exc_info=exc)
            return released(attempt, exc, abandoned=shutdown, answers_producer=False)
        return Outcome("done", answers_producer=False)

    def report(self, worker: Worker, attempt: Attempt, outcome: Outcome, started: float) -> None:
        run = self.run if outcome.kind == "done" else None
        log.info(
            "segment_task.done",
            outcome=run.outcome if run else "released",
            reason=(run.reason if run else outcome.error) or None,
            receive_count=attempt.message.receive_count,
            duration_s=round(time.monotonic() - started, 3),
        )
