"""One archive, many workers: a big request cut into segments that any worker on the source queue builds.

The worker that receives the request is its coordinator. It HEADs every source and checks the request
as a single worker does, then plans the archive: contiguous runs of entries of about
FANOUT_SEGMENT_BYTES source bytes (segments), each with its own range of part numbers, and creates the
multipart upload. The plan (the part table) goes to the destination bucket next to status.json, under
`<prefix>/<request_id>/fanout/`: `plan.json`, each segment's entries, and, as segments are built, each
one's record (its parts' ETags, length, central directory). Then it sends one segment task per segment
to the source queue, so autoscaling on that queue's backlog scales for them too, and builds segments
itself while it waits. Once every segment is recorded it joins the segments' ends, writes the central
directory, completes the upload and lets the worker notify once and delete the request.

A segment task names only the request and the segment: everything else is read from the plan a worker
wrote, so a forged or repeated task can at most rebuild a segment the same way (same bytes, same part
numbers: re-uploading a part replaces it). A redelivered request finds the plan and resumes it, with the
same upload; it never starts a second one.

The bytes are those a single worker writes: a ZIP local header holds no offset, so a segment's entries do
not depend on where it lands, except that an entry starting past 4 GiB is written with zip64 fields. So
each segment is placed from bounds of what comes before it: entirely below 4 GiB whatever the earlier
entries compress to, or entirely past it; a segment that may straddle it is `chained` and built (by the
coordinator) only once the segments before it are done and its exact offset known.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import botocore.exceptions
import structlog

from archiver import queue
from archiver.assembly import COPY_EXTRA_PARTS, MAX_COPY_PIECE, plan_copies
from archiver.aws import AwsClients, http_status, retry_transient
from archiver.directory import end_records, needs_zip64, relocate
from archiver.errors import JobAbandoned, PermanentError, TransientError, clip
from archiver.job import PLAN_HEAD_CONCURRENCY, resolve_entries, small_limit
from archiver.models import ArchivePlan, SourceRef, is_valid_request_id, utc_timestamp
from archiver.multipart import MultipartUpload, UploadedObject, choose_part_size
from archiver.segments import SegmentResult, SegmentWork, build_segment
from archiver.settings import MAX_PART_SIZE, MAX_PARTS, MIN_PART_SIZE, Settings
from archiver.sources import SourceObject, head_sources
from archiver.status import WORKER_ID, LeaseLost, Progress
from archiver.zipping import ZIP32_LIMIT, Compression, ZipEntry, archive_size_bound, is_uncompressed

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

log = structlog.get_logger(__name__)

TASK_KIND = "segment"
PLAN_VERSION = 1
# About this many segments at most: each takes a few part numbers of S3's 10,000 and one task message, so
# past it segments grow (plan_layout grows them further to keep parts small: 5 TiB gets 4 GiB segments).
MAX_SEGMENTS = 2_000
# Between looks (a LIST) at the segment records while other workers build: from the first, doubling to
# the second while no record arrives.
POLL_SECONDS = (0.25, 4.0)


# ------------------------------------------------------------------------------------------- the layout


@dataclass(frozen=True)
class Segment:
    index: int
    first_entry: int  # in the plan's entries
    count: int
    first_part: int
    last_part: int
    # The offset the segment's own offsets are counted from when an entry's format is chosen; None when
    # it may straddle 4 GiB (chained: built once its exact offset is known).
    base: int | None
    source_bytes: int


@dataclass(frozen=True)
class Layout:
    segments: list[Segment]
    part_size: int
    copyable: frozenset[int]  # plan entry indexes that S3 may copy server-side
    final_part: int  # the last part: the end of the last segment and the central directory


def segment_runs(sizes: Sequence[int], segment_bytes: int) -> list[tuple[int, int]]:
    """(first, count) of contiguous runs of about `segment_bytes` source bytes each (an entry is never
    split; a big one is a segment of its own), at most MAX_SEGMENTS of them."""
    total = sum(sizes)
    target = max(segment_bytes, math.ceil(total / MAX_SEGMENTS))
    runs: list[tuple[int, int]] = []
    first, run = 0, 0
    for index, size in enumerate(sizes):
        if run and run + size > target:
            runs.append((first, index - first))
            first, run = index, 0
        run += size
    runs.append((first, len(sizes) - first))
    return runs


def plan_layout(
    entries: list[ZipEntry], settings: Settings, compression: Compression, segment_bytes: int
) -> Layout:
    """Segments, their part numbers and placement, and the part size that fits them in 10,000 parts.

    Each segment's range holds a few numbers more than its bytes need, so many segments make parts
    bigger than a single worker's (and memory is (UPLOAD_CONCURRENCY + 2) x part size): segments double
    in size until the part size is at most twice the one a single worker would use."""
    single = choose_part_size(archive_size_bound(entries), settings.part_size)
    while True:
        layout = _layout(entries, settings, compression, segment_bytes)
        if layout.part_size <= 2 * single or len(layout.segments) <= 2:
            return layout
        segment_bytes *= 2


def _layout(
    entries: list[ZipEntry], settings: Settings, compression: Compression, segment_bytes: int
) -> Layout:
    runs = segment_runs([entry.source.size for entry in entries], segment_bytes)
    copyable, _ = plan_copies(entries, settings, compression)
    bounds = [archive_size_bound(entries[first : first + count]) for first, count in runs]
    copies = [sum(1 for i in range(first, first + count) if i in copyable) for first, count in runs]
    # Beyond its bytes a segment's range holds its copies' spare numbers, one for its smaller first part,
    # and two for rounding (numbers are only ever left unused, which S3 allows).
    extras = [COPY_EXTRA_PARTS * n + 3 for n in copies]
    spare = sum(extras) + len(runs) + 1
    if copyable and (spare >= MAX_PARTS // 2 or _part_size(bounds, settings, spare) > MAX_COPY_PIECE):
        copyable, extras = frozenset(), [3] * len(runs)
        spare = sum(extras) + len(runs) + 1
    part_size = _part_size(bounds, settings, spare)
    segments: list[Segment] = []
    number, lower, upper = 1, 0, 0
    for index, ((first, count), bound, extra) in enumerate(zip(runs, bounds, extras, strict=True)):
        span = -(-bound // part_size) + extra
        below = upper + bound < ZIP32_LIMIT
        base = lower if below or lower >= ZIP32_LIMIT else None
        chunk = entries[first : first + count]
        segments.append(
            Segment(
                index=index,
                first_entry=first,
                count=count,
                first_part=number,
                last_part=number + span - 1,
                base=base,
                source_bytes=sum(entry.source.size for entry in chunk),
            )
        )
        number += span
        # Fewest bytes the segment can take: its uncompressed entries' data, which no format shrinks.
        lower += sum(entry.source.size for entry in chunk if is_uncompressed(entry, compression))
        upper += bound
    if number > MAX_PARTS:
        raise PermanentError("too_large", f"the archive needs more than {MAX_PARTS} parts")
    return Layout(segments=segments, part_size=part_size, copyable=copyable, final_part=number)


# ------------------------------------------------------------------------------------------- the store


def _part_size(bounds: list[int], settings: Settings, spare: int) -> int:
    if spare >= MAX_PARTS:
        return MAX_PART_SIZE + 1  # too many segments for their numbers: the caller makes them bigger
    try:
        return choose_part_size(sum(bounds), settings.part_size, extra_parts=spare)
    except PermanentError:
        return MAX_PART_SIZE + 1


def request_dir(prefix: str, request_id: str) -> str:
    return "/".join(part for part in (prefix, request_id) if part)


@dataclass(frozen=True)
class Store:
    """Where a fanned-out request's plan and records are: `<prefix>/<request_id>/fanout/`."""

    s3: S3Client
    bucket: str
    directory: str  # `<prefix>/<request_id>`

    @property
    def root(self) -> str:
        return f"{self.directory}/fanout"

    def key(self, name: str) -> str:
        return f"{self.root}/{name}"

    def read(self, name: str) -> dict[str, Any] | None:
        return self.read_versioned(name)[0]

    def read_versioned(self, name: str) -> tuple[dict[str, Any] | None, str | None]:
        """The JSON document (None if absent or unreadable) and the object's ETag (None if absent)."""
        try:
            body, etag = _get_versioned(self.s3, self.bucket, self.key(name))
        except botocore.exceptions.ClientError as exc:
            if http_status(exc) in (403, 404):
                return None, None
            raise
        try:
            document = json.loads(body)
        except ValueError:
            return None, etag
        return (document if isinstance(document, dict) else None), etag

    def write(self, name: str, document: dict[str, Any], **condition: str) -> str:
        return _put(self.s3, self.bucket, self.key(name), json.dumps(document).encode(), condition)

    def names(self, start: str = "") -> dict[str, datetime]:
        """The names under the fanout/ directory that begin with `start`, and when each was last written:
        one LIST per 1,000."""
        found: dict[str, datetime] = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.root}/{start}"
        ):
            found.update(
                (item["Key"][len(self.root) + 1 :], item["LastModified"]) for item in page.get("Contents", [])
            )
        return found

    def clear(self) -> None:
        """Delete the plan and everything beside it (best effort: a lifecycle rule is the safety net)."""
        keys = [self.key(name) for name in self.names()]
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            self.s3.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
            )


@retry_transient
def _get(s3: S3Client, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


@retry_transient
def _get_versioned(s3: S3Client, bucket: str, key: str) -> tuple[bytes, str]:
    response = s3.get_object(Bucket=bucket, Key=key)
    return response["Body"].read(), str(response["ETag"])


@retry_transient
def _put(s3: S3Client, bucket: str, key: str, body: bytes, condition: dict[str, str]) -> str:
    response = s3.put_object(
        Bucket=bucket,
        Key=key,
        Body=body,
        ContentType="application/json",
        **condition,  # type: ignore[arg-type]
    )
    return str(response["ETag"])


def _record_name(index: int) -> str:
    return f"segment-{index:05d}.json"


def _claim_name(index: int) -> str:
    return f"segment-{index:05d}.claim"


def _head_name(index: int) -> str:
    return f"segment-{index:05d}.head"


def _tail_name(index: int) -> str:
    return f"segment-{index:05d}.tail"


def _entries_name(index: int) -> str:
    return f"entries-{index:05d}.json"


def _object_row(entry: ZipEntry, copy: bool) -> list[Any]:
    obj = entry.source
    return [
        obj.ref.source,
        obj.ref.bucket,
        obj.ref.key,
        entry.path,
        obj.size,
        obj.etag,
        utc_timestamp(obj.last_modified),
        obj.content_type,
        obj.crc32,
        copy,
    ]


def _entry_of(row: list[Any]) -> tuple[ZipEntry, bool]:
    source, bucket, key, path, size, etag, modified, content_type, crc32, copy = row
    obj = SourceObject(
        ref=SourceRef(source=source, bucket=bucket, key=key),
        size=int(size),
        etag=str(etag),
        last_modified=datetime.strptime(modified, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC),
        content_type=str(content_type),
        crc32=None if crc32 is None else int(crc32),
    )
    return ZipEntry(path=str(path), source=obj), bool(copy)


@dataclass(frozen=True)
class StoredPlan:
    document: dict[str, Any]
    resumed: bool = True  # read back, not just written

    @property
    def upload_id(self) -> str:
        return str(self.document["upload_id"])

    @property
    def segments(self) -> list[Segment]:
        return [Segment(**row) for row in self.document["segments"]]

    @property
    def aborted(self) -> bool:
        return bool(self.document.get("aborted"))


def read_plan(store: Store, digest: str | None = None) -> StoredPlan | None:
    """The stored plan (of the request with this digest, when given), if there is one."""
    document = store.read("plan.json")
    if document is None or document.get("version") != PLAN_VERSION:
        return None
    if digest is not None and document.get("digest") != digest:
        return None
    return StoredPlan(document)


# ------------------------------------------------------------------------------------------- claims


@dataclass
class Claim:
    """A worker's hold on building one segment, so two workers do not build it at once: a document
    written only if absent, or if the one there has expired. Renewed by the heartbeat. Losing a race
    costs nothing worse than a segment built twice the same way."""

    store: Store
    index: int
    seconds: int
    etag: str | None = None

    def _document(self) -> dict[str, Any]:
        expires = datetime.now(UTC) + timedelta(seconds=self.seconds)
        return {"worker": WORKER_ID, "expires_at": utc_timestamp(expires)}

    def take(self) -> bool:
        name = _claim_name(self.index)
        try:
            held, current = self.store.read_versioned(name)
            if current is not None:
                held = held or {}
                if held.get("worker") != WORKER_ID and _remaining(held) > 0:
                    return False
                self.etag = self.store.write(name, self._document(), IfMatch=current)
            else:
                self.etag = self.store.write(name, self._document(), IfNoneMatch="*")
        except botocore.exceptions.ClientError as exc:
            if http_status(exc) == 501:  # no conditional writes here: duplicates are only wasted work
                self.etag = self.store.write(name, self._document())
                return True
            if http_status(exc) in (409, 412):
                return False
            raise
        return True

    def renew(self) -> None:
        self.etag = self.store.write(_claim_name(self.index), self._document())

    def release(self) -> None:
        try:
            self.store.s3.delete_object(Bucket=self.store.bucket, Key=self.store.key(_claim_name(self.index)))
        except Exception as exc:  # it expires by itself
            log.warning("segment.claim_release_failed", error=repr(exc))


def _remaining(claim: dict[str, Any]) -> float:
    try:
        expires = datetime.strptime(str(claim.get("expires_at")), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return 0.0
    return (expires - datetime.now(UTC)).total_seconds()


# ------------------------------------------------------------------------------------------- building


def load_work(store: Store, plan: StoredPlan, segment: Segment, base: int) -> SegmentWork:
    """Everything one segment's build needs, from the plan and the segment's entries."""
    document = store.read(_entries_name(segment.index))
    if document is None:
        raise TransientError(f"segment {segment.index}: its entries are missing from the plan")
    rows = [_entry_of(row) for row in document["entries"]]
    return SegmentWork(
        index=segment.index,
        entries=[entry for entry, _ in rows],
        copyable=frozenset(position for position, (_, copy) in enumerate(rows) if copy),
        first_part=segment.first_part,
        last_part=segment.last_part,
        base_offset=base,
        part_size=int(plan.document["part_size"]),
        small_limit=int(plan.document["small_limit"]),
        compression=plan.document["compression"],
        head_key=store.key(_head_name(segment.index)),
        tail_key=store.key(_tail_name(segment.index)),
    )


def build_and_record(
    clients: AwsClients,
    settings: Settings,
    store: Store,
    plan: StoredPlan,
    segment: Segment,
    *,
    base: int,
    abandoned: Callable[[], bool],
) -> SegmentResult:
    """Build one segment into the plan's upload and write its record."""
    work = load_work(store, plan, segment, base)
    upload = MultipartUpload(
        clients.s3,
        bucket=plan.document["bucket"],
        key=plan.document["key"],
        upload_id=plan.upload_id,
        metadata={},
    )
    started = time.monotonic()
    result = build_segment(
        clients,
        upload,
        work,
        concurrency=settings.upload_concurrency,
        # Room for the largest body the plan reads whole, whatever this worker's own window.
        prefetch_bytes=max(settings.prefetch_bytes, 2 * work.small_limit),
        abandoned=abandoned,
    )
    store.write(
        _record_name(segment.index), {"upload_id": plan.upload_id, "worker": WORKER_ID, **result.document()}
    )
    log.info(
        "segment.built",
        segment=segment.index,
        entries=result.count,
        bytes=result.length,
        parts=len(result.parts),
        head_bytes=result.head_size,
        tail_bytes=result.tail_size,
        duration_s=round(time.monotonic() - started, 3),
    )
    return result


def record_failure(store: Store, plan: StoredPlan, index: int, code: str, message: str) -> None:
    store.write(
        _record_name(index), {"upload_id": plan.upload_id, "failed": {"code": code, "message": message}}
    )


# ------------------------------------------------------------------------------------------- tasks


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


@dataclass
class TaskRun:
    """One delivery of a segment task; what became of it, for the worker's log line."""

    outcome: str = "dropped"  # built, dropped (nothing to do), failed (recorded), released
    reason: str = ""


def run_task(
    clients: AwsClients,
    settings: Settings,
    task: SegmentTask,
    run: TaskRun,
    *,
    abandoned: Callable[[], bool],
    last_delivery: bool,
    hold: Callable[[Claim | None], None] = lambda _: None,
) -> None:
    """Build the task's segment unless there is nothing to do: no plan (completed, failed, or never
    written: a forged task), a segment done or being built, or one the coordinator builds itself. A
    failure is recorded for the coordinator when it is permanent, or on the task's last delivery; other
    failures are raised (the task comes back)."""
    store = Store(
        clients.s3, settings.s3_destination_bucket, request_dir(settings.s3_file_prefix, task.request_id)
    )
    plan = read_plan(store)
    if plan is None or plan.aborted:
        run.reason = "no live plan for this request"
        return
    structlog.contextvars.bind_contextvars(archive_key=plan.document["key"])
    segments = plan.segments
    if task.segment >= len(segments):
        run.reason = "no such segment in the plan"
        return
    segment = segments[task.segment]
    record = store.read(_record_name(segment.index))
    if record is not None and record.get("upload_id") == plan.upload_id:
        run.reason = "segment already recorded"
        return
    if segment.base is None:
        run.reason = "a chained segment: its coordinator builds it"
        return
    claim = Claim(store, segment.index, settings.visibility_timeout)
    if not claim.take():
        run.reason = "segment claimed by another worker"
        return
    hold(claim)
    try:
        build_and_record(clients, settings, store, plan, segment, base=segment.base, abandoned=abandoned)
        run.outcome = "built"
    except PermanentError as exc:
        record_failure(store, plan, segment.index, exc.code, exc.message)
        run.outcome, run.reason = "failed", exc.message
    except JobAbandoned:
        claim.release()
        raise
    except Exception as exc:
        claim.release()
        if not last_delivery:
            raise
        record_failure(store, plan, segment.index, "internal", clip(f"kept failing: {exc}"))
        run.outcome, run.reason = "failed", str(exc)
    finally:
        hold(None)


# ------------------------------------------------------------------------------------------- the coordinator


@dataclass
class Fanned:
    """What the coordinator built: for the notification."""

    uploaded: UploadedObject
    paths: list[str]
    missing: list[str]


@dataclass
class Coordinator:
    """The worker that received a fanned-out request: plans it (or resumes its plan), sends its segment
    tasks, builds segments while it waits, and joins them into the archive."""

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
    hold: Callable[[Claim | None], None] = lambda _: None
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
            return self._run(stored)
        except Exception as exc:
            # Not when stopped (a redelivery resumes the plan), nor when another worker took the lease
            # (it completes this very upload).
            final = isinstance(exc, PermanentError) or (
                self.last_delivery and not isinstance(exc, JobAbandoned | LeaseLost)
            )
            if final:
                self._abort(stored)
            raise

    def _plan(self) -> StoredPlan | None:
        refs = [entry.ref for entry in self.plan.entries]
        objects = head_sources(self.clients.s3, refs, concurrency=PLAN_HEAD_CONCURRENCY)
        resolved = resolve_entries(self.plan, objects, max_archive_bytes=self.settings.max_archive_bytes)
        segment_bytes = self.settings.fanout_segment_bytes
        if resolved.total_bytes <= 2 * segment_bytes:
            return None
        compression = self.plan.request.compression
        layout = plan_layout(resolved.entries, self.settings, compression, segment_bytes)
        upload_id = _create_upload(self.clients.s3, self.plan, entries=len(resolved.entries))
        entries = resolved.entries
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(
                pool.map(
                    lambda segment: self.store.write(
                        _entries_name(segment.index),
                        {
                            "entries": [
                                _object_row(entries[i], i in layout.copyable)
                                for i in range(segment.first_entry, segment.first_entry + segment.count)
                            ]
                        },
                    ),
                    layout.segments,
                )
            )
        document = {
            "version": PLAN_VERSION,
            "request_id": self.plan.request_id,
            "digest": self.plan.digest,
            "bucket": self.plan.bucket,
            "key": self.plan.key,
            "upload_id": upload_id,
            "part_size": layout.part_size,
            "small_limit": small_limit(self.settings),
            "compression": compression,
            "final_part": layout.final_part,
            "entries": len(entries),
            "source_bytes": resolved.total_bytes,
            "missing": resolved.missing,
            "segments": [asdict(segment) for segment in layout.segments],
            "created_at": utc_timestamp(),
            "coordinator": WORKER_ID,
        }
        # Written last: a plan that exists is whole.
        self.store.write("plan.json", document)
        log.info(
            "fanout.planned",
            segments=len(layout.segments),
            part_size=layout.part_size,
            entries=len(entries),
            source_bytes=resolved.total_bytes,
            upload_id=upload_id,
        )
        return StoredPlan(document, resumed=False)

    def _run(self, stored: StoredPlan) -> Fanned:
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
        return self._complete(stored, segments, results)

    def _recorded(self, stored: StoredPlan, segments: list[Segment]) -> dict[int, SegmentResult]:
        """The segments recorded so far: one LIST, and a GET of each record not read before."""
        names = self._listing = self.store.names("segment-")
        results = self._results
        for segment in segments:
            if segment.index in results or _record_name(segment.index) not in names:
                continue
            record = self.store.read(_record_name(segment.index))
            if record is None or record.get("upload_id") != stored.upload_id:
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
        for segment in reversed(segments):
            if segment.index in results:
                continue
            base = segment.base
            if base is None:
                if segment.index != first_missing:
                    continue
                base = sum(results[s.index].length for s in segments[: segment.index])
            # A claim written (or renewed, every few seconds) within its term is live: not even read.
            claimed = self._listing.get(_claim_name(segment.index))
            if claimed is not None and (now - claimed).total_seconds() < self.settings.visibility_timeout:
                continue
            claim = Claim(self.store, segment.index, self.settings.visibility_timeout)
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

    def _complete(
        self, stored: StoredPlan, segments: list[Segment], results: dict[int, SegmentResult]
    ) -> Fanned:
        """Join the segments' ends into parts, append the central directory, complete the upload."""
        upload = MultipartUpload(
            self.clients.s3,
            bucket=self.plan.bucket,
            key=self.plan.key,
            upload_id=stored.upload_id,
            metadata=_metadata(self.plan, int(stored.document["entries"])),
        )
        ordered = [results[segment.index] for segment in segments]
        parts, pending = self._joined(upload, segments, ordered)
        directory, offset, zip64 = bytearray(), 0, False
        for result in ordered:
            directory += relocate(result.directory, offset)
            zip64 = zip64 or needs_zip64(result.directory)
            offset += result.length
        ends = end_records(
            count=sum(r.count for r in ordered), size=len(directory), start=offset, zip64=zip64
        )
        pending += directory + ends
        parts.append(upload.upload_part(int(stored.document["final_part"]), pending))
        copied = sum(result.copied_bytes for result in ordered)
        upload.add_parts(parts, apart_bytes=copied)
        upload.ledger.position = offset + len(directory) + len(ends)
        uploaded = upload.complete(confirm=self.confirm)
        self.progress.bytes_copied = copied
        log.info("fanout.completed", segments=len(segments), parts=len(parts), bytes=uploaded.size)
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
        )

    def _joined(
        self, upload: MultipartUpload, segments: list[Segment], ordered: list[SegmentResult]
    ) -> tuple[list[CompletedPartTypeDef], bytearray]:
        """Every segment's parts, its head copied in (in parallel) or joined to what precedes it (a
        previous tail, small segments) into a part of at least 5 MiB; and what is left for the last part."""
        s3, bucket = self.clients.s3, self.plan.bucket
        parts: list[CompletedPartTypeDef] = []
        pending = bytearray()
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="join") as pool:
            copies = []
            for segment, result in zip(segments, ordered, strict=True):
                head_key = self.store.key(_head_name(segment.index))
                if not pending and result.head_size >= MIN_PART_SIZE:
                    copies.append(pool.submit(_copy_in, upload, segment.first_part, head_key))
                else:
                    pending += _get(s3, bucket, head_key)
                    if len(pending) >= MIN_PART_SIZE:
                        parts.append(upload.upload_part(segment.first_part, pending))
                        pending = bytearray()
                    elif result.parts or result.tail_size:
                        raise RuntimeError(f"segment {segment.index}: a head under 5 MiB with parts after it")
                parts.extend(result.parts)
                if result.tail_size:
                    pending += _get(s3, bucket, self.store.key(_tail_name(segment.index)))
            parts.extend(future.result() for future in copies)
        return parts, pending

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
            self.store.write("plan.json", {**stored.document, "aborted": True})
            self.store.clear()
        except Exception as exc:
            log.warning("fanout.cleanup_failed", error=repr(exc))


def _metadata(plan: ArchivePlan, entries: int) -> dict[str, str]:
    return {"request-id": plan.request_id, "entries": str(entries)}


def _create_upload(s3: S3Client, plan: ArchivePlan, *, entries: int) -> str:
    name = plan.key.rsplit("/", 1)[-1]
    return str(
        retry_transient(s3.create_multipart_upload)(
            Bucket=plan.bucket,
            Key=plan.key,
            ContentType="application/zip",
            Metadata=_metadata(plan, entries),
            ChecksumAlgorithm="CRC32",
            ContentDisposition=f"attachment; filename*=UTF-8''{quote(name)}",
        )["UploadId"]
    )


@retry_transient
def _copy_in(upload: MultipartUpload, number: int, key: str) -> CompletedPartTypeDef:
    """A segment's head, a temporary object, copied into the upload as its part inside S3; fetched and
    uploaded where the server does not copy (501)."""
    try:
        result = upload.copy_part(number, {"Bucket": upload.bucket, "Key": key})
    except botocore.exceptions.ClientError as exc:
        if http_status(exc) != 501:
            raise
        return upload.upload_part(number, _get(upload.s3, upload.bucket, key))
    part: CompletedPartTypeDef = {"PartNumber": number, "ETag": result["ETag"]}
    if "ChecksumCRC32" in result:
        part["ChecksumCRC32"] = result["ChecksumCRC32"]
    return part
