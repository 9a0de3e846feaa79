"""The coordinator: the worker that received a fanned-out request. Its steps, each a function of its
own: plan the request (archiver.fanout.planning) or resume its stored plan; send the segment tasks and
wait for every segment's record, building segments itself meanwhile (here); join them and complete the
upload (archiver.fanout.joining); or, when the request fails for good or is cancelled, abort it all."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from archiver.aws import AwsClients
from archiver.errors import Cancelled, JobAbandoned, PermanentError
from archiver.fanout import claims, joining, planning
from archiver.fanout.building import build_and_record
from archiver.fanout.layout import Segment
from archiver.fanout.segment import SegmentResult
from archiver.fanout.store import PLAN_NAME, Store, StoredPlan, claim_name, read_plan, record_name
from archiver.fanout.tasks import send_tasks
from archiver.manifest import Row
from archiver.models import ArchivePlan
from archiver.multipart import MultipartUpload, UploadedObject
from archiver.settings import Settings
from archiver.status import LeaseLost, Progress

log = structlog.get_logger(__name__)

# Between looks (a LIST) at the segment records while other workers build: from the first, doubling to
# the second while no record arrives.
POLL_SECONDS = (0.25, 4.0)


@dataclass
class Fanned:
    """What the coordinator built: for the notification."""

    uploaded: UploadedObject
    paths: list[str]
    missing: list[str]
    rows: list[Row] | None  # the manifest's, from the segments' records in order


@dataclass
class Coordinator:
    """Plans a fanned-out request (or resumes its plan), sends its segment tasks, builds segments while
    it waits, and joins them into the archive."""

    clients: AwsClients
    settings: Settings
    plan: ArchivePlan
    source_url: str
    progress: Progress
    abandoned: Callable[[], bool]
    confirm: Callable[[], None]
    last_delivery: bool
    # Called with the claim on the segment the coordinator is building (None when done): the worker's
    # heartbeat renews it.
    hold: Callable[[claims.Claim | None], None] = lambda _: None
    # Whether the job was stopped by a cancel: then the fan-out ends for good, as on a permanent error.
    cancelled: Callable[[], bool] = lambda: False
    store: Store = field(init=False)
    # This request's live stored plan, read once when the coordinator is made: the worker keeps its
    # upload from the stale ones it aborts, and `build` resumes it.
    resumed: StoredPlan | None = field(init=False)
    _results: dict[int, SegmentResult] = field(init=False, default_factory=dict)
    _listing: dict[str, datetime] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.store = Store(self.clients.s3, self.plan.bucket, self.plan.key.rsplit("/", 1)[0])
        stored = read_plan(self.store, self.plan.digest)
        self.resumed = None if stored is None or stored.aborted else stored

    def build(self) -> Fanned | None:
        """The archive built by segments, or None when the request is too small to fan out."""
        stored = self.resumed
        if stored is None:
            stored = self._plan()
            if stored is None:
                return None
        else:
            log.info("fanout.resumed", upload_id=stored.upload_id)
        try:
            results = self._wait(stored)
            uploaded = joining.complete(
                self.clients, self.plan, self.store, stored, results, confirm=self.confirm
            )
        except Exception as exc:
            # Not when stopped (a redelivery resumes the plan), nor when another worker took the lease
            # (it completes this very upload); but a cancel ends it.
            final = (
                isinstance(exc, PermanentError | Cancelled)
                or (isinstance(exc, JobAbandoned) and self.cancelled())
                or (self.last_delivery and not isinstance(exc, JobAbandoned | LeaseLost))
            )
            if final:
                self._abort(stored)
            raise
        self.progress.bytes_copied = uploaded.apart_bytes
        return self._finished(stored, uploaded, results)

    def _plan(self) -> StoredPlan | None:
        return planning.write_plan(self.clients, self.settings, self.plan, self.store)

    def _wait(self, stored: StoredPlan) -> list[SegmentResult]:
        """Every segment's record, in the plan's order: the tasks sent for what is left, then records
        looked for until all are in, a segment nobody builds built here in between."""
        segments = stored.segments
        self.progress.segments_total = len(segments)
        self.progress.files_total = int(stored.document["entries"])
        self.progress.bytes_total = int(stored.document["source_bytes"])
        # A plan just written has no records to look for.
        results = self._recorded(stored, segments) if stored.resumed else {}
        # Tasks for what is left, the chained ones aside; on a resume some may be sent twice, which costs a
        # dropped message.
        send_tasks(
            self.clients,
            self.source_url,
            self.plan.request_id,
            [s.index for s in segments if s.index not in results and s.base is not None],
        )
        pause = POLL_SECONDS[0]
        while len(results) < len(segments):
            if self.abandoned():
                raise JobAbandoned("the job was stopped while its segments were being built")
            if self._next_to_build(stored, segments, results) is None:
                time.sleep(pause)
            done = len(results)
            results = self._recorded(stored, segments)
            # Quick while records arrive (the end is near), slower while none does: LISTs cost money.
            pause = POLL_SECONDS[0] if len(results) > done else min(2 * pause, POLL_SECONDS[1])
        return [results[segment.index] for segment in segments]

    def _recorded(self, stored: StoredPlan, segments: list[Segment]) -> dict[int, SegmentResult]:
        """The segments recorded so far: one LIST, and a GET of each record not read before."""
        names = self._listing = self.store.names("segment-")
        results = self._results
        for segment in segments:
            if segment.index in results or record_name(segment.index) not in names:
                continue
            record = self.store.read(record_name(segment.index))
            if record is None or not stored.is_own(record):
                continue
            if "failed" in record:
                failed = record["failed"]
                raise PermanentError(
                    failed.get("code", "internal"), f"segment {segment.index}: {failed.get('message', '')}"
                )
            results[segment.index] = SegmentResult.from_document(record)
        self.progress.segments_done = len(results)
        self.progress.bytes_done = sum(s.source_bytes for s in segments if s.index in results)
        self.progress.files_done = sum(s.count for s in segments if s.index in results)
        return results

    def _next_to_build(
        self, stored: StoredPlan, segments: list[Segment], results: dict[int, SegmentResult]
    ) -> Segment | None:
        """Claim and build one segment nobody is building, from the end (workers take tasks from about
        the start); a chained one once the segments before it are done. None: nothing to take now."""
        first_missing = min(s.index for s in segments if s.index not in results)
        now = datetime.now(UTC)
        seconds = self.settings.visibility_timeout
        for segment in reversed(segments):
            if segment.index in results:
                continue
            base = segment.base
            if base is None:
                if segment.index != first_missing:
                    continue
                base = sum(results[s.index].length for s in segments[: segment.index])
            if claims.is_live(self._listing.get(claim_name(segment.index)), seconds=seconds, now=now):
                continue
            claim = claims.Claim(self.store, segment.index, seconds)
            if not claim.take():
                continue
            self.hold(claim)
            try:
                build_and_record(
                    self.clients,
                    self.settings,
                    self.store,
                    stored,
                    segment,
                    base=base,
                    abandoned=self.abandoned,
                )
            finally:
                self.hold(None)
                claim.release()
            return segment
        return None

    def _finished(self, stored: StoredPlan, uploaded: UploadedObject, results: list[SegmentResult]) -> Fanned:
        try:
            self.store.clear()
        except Exception as exc:
            log.warning("fanout.cleanup_failed", error=repr(exc))
        missing = list(stored.document.get("missing", []))
        gone = set(missing)
        return Fanned(
            uploaded=uploaded,
            paths=[entry.path for entry in self.plan.entries if entry.ref.source not in gone],
            missing=missing,
            rows=_manifest_rows(results),
        )

    def end(self) -> None:
        """End a stored plan from an earlier delivery for good (the request was cancelled meanwhile)."""
        if self.resumed is not None:
            self._abort(self.resumed)

    def _abort(self, stored: StoredPlan) -> None:
        """End the fan-out for good: the upload aborted, the plan marked so segment tasks are dropped."""
        log.warning("fanout.aborted", upload_id=stored.upload_id)
        MultipartUpload(
            self.clients.s3,
            bucket=self.plan.bucket,
            key=self.plan.key,
            upload_id=stored.upload_id,
            metadata={},
        ).abort()
        try:
            # Marked first: a worker that reads the plan meanwhile drops its task.
            self.store.write(PLAN_NAME, {**stored.document, "aborted": True})
            self.store.clear()
        except Exception as exc:
            log.warning("fanout.cleanup_failed", error=repr(exc))


def _manifest_rows(results: list[SegmentResult]) -> list[Row] | None:
    """The archive's manifest rows, the segments' in order; None if a record has none (written by an
    older archiver)."""
    per_segment = [result.rows for result in results if result.rows is not None]
    if len(per_segment) < len(results):
        return None
    return [row for rows in per_segment for row in rows]
