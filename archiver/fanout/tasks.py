"""Segment tasks: the messages a coordinator sends to the source queue, one per segment, and what a
worker does with one. A task names only the request and the segment: everything else is read from the
plan a worker wrote, so a forged or repeated task can at most rebuild a segment the same way (same
bytes, same part numbers: re-uploading a part replaces it)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import structlog

from archiver import queue
from archiver.aws import AwsClients
from archiver.errors import JobAbandoned, PermanentError, clip
from archiver.fanout.building import build_and_record, record_failure
from archiver.fanout.claims import Claim
from archiver.fanout.store import Store, read_plan, record_name
from archiver.models import is_valid_request_id, request_dir
from archiver.settings import Settings

TASK_KIND = "segment"


@dataclass(frozen=True)
class SegmentTask:
    request_id: str
    segment: int

    def body(self) -> str:
        return json.dumps({"segment_task": {"request_id": self.request_id, "segment": self.segment}})


def parse_task(message: queue.Message) -> SegmentTask | None:
    """The segment task a message is, or None: it must carry the task attribute and be exactly a task's
    body, so no request is ever taken for one (and a task's body, sent without the attribute, fails as
    an invalid request)."""
    if message.task != TASK_KIND:
        return None
    try:
        document = json.loads(message.body)
    except ValueError:
        return None
    inner = document.get("segment_task") if isinstance(document, dict) and len(document) == 1 else None
    if not isinstance(inner, dict) or set(inner) != {"request_id", "segment"}:
        return None
    request_id, segment = inner["request_id"], inner["segment"]
    if not is_valid_request_id(request_id) or type(segment) is not int or segment < 0:
        return None
    return SegmentTask(request_id=request_id, segment=segment)


def send_tasks(clients: AwsClients, queue_url: str, request_id: str, indexes: Sequence[int]) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(
            pool.map(
                lambda i: queue.send_task(
                    clients.sqs, queue_url, SegmentTask(request_id, i).body(), kind=TASK_KIND
                ),
                indexes,
            )
        )


TaskOutcome = Literal["built", "dropped", "failed"]


@dataclass(frozen=True)
class TaskRun:
    """What one delivery of a segment task came to, for the worker's log line: built, dropped (nothing
    to do) or failed (recorded for the coordinator)."""

    outcome: TaskOutcome = "dropped"
    reason: str = ""


def run_task(
    clients: AwsClients,
    settings: Settings,
    task: SegmentTask,
    *,
    abandoned: Callable[[], bool],
    last_delivery: bool,
    hold: Callable[[Claim | None], None] = lambda _: None,
) -> TaskRun:
    """Build the task's segment unless there is nothing to do: no plan (completed, failed, or never
    written: a forged task), a segment done or being built, or one the coordinator builds itself. A
    failure is recorded for the coordinator when it is permanent, or on the task's last delivery; other
    failures are raised (the task comes back)."""
    store = Store(
        clients.s3, settings.s3_destination_bucket, request_dir(settings.s3_file_prefix, task.request_id)
    )
    plan = read_plan(store)
    if plan is None or plan.aborted:
        return TaskRun(reason="no live plan for this request")
    structlog.contextvars.bind_contextvars(archive_key=plan.document["key"])
    segments = plan.segments
    if task.segment >= len(segments):
        return TaskRun(reason="no such segment in the plan")
    segment = segments[task.segment]
    if plan.is_own(store.read(record_name(segment.index))):
        return TaskRun(reason="segment already recorded")
    if segment.base is None:
        return TaskRun(reason="a chained segment: its coordinator builds it")
    claim = Claim(store, segment.index, settings.visibility_timeout)
    if not claim.take():
        return TaskRun(reason="segment claimed by another worker")
    hold(claim)
    try:
        build_and_record(clients, settings, store, plan, segment, base=segment.base, abandoned=abandoned)
        return TaskRun(outcome="built")
    except PermanentError as exc:
        record_failure(store, plan, segment.index, exc.code, exc.message)
        return TaskRun(outcome="failed", reason=exc.message)
    except JobAbandoned:
        claim.release()
        raise
    except Exception as exc:
        claim.release()
        if not last_delivery:
            raise
        record_failure(store, plan, segment.index, "internal", clip(f"kept failing: {exc}"))
        return TaskRun(outcome="failed", reason=str(exc))
    finally:
        hold(None)
