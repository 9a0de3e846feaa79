"""One segment built from the stored plan into the plan's upload, and its record (or its failure)
written for the coordinator: the step a segment task and the coordinator share."""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from archiver import checksums
from archiver.aws import AwsClients
from archiver.errors import TransientError
from archiver.fanout.layout import Segment
from archiver.fanout.segment import SegmentResult, SegmentWork, build_segment
from archiver.fanout.store import (
    Store,
    StoredPlan,
    entries_name,
    entry_of_row,
    head_name,
    record_name,
    tail_name,
)
from archiver.multipart import MultipartUpload
from archiver.settings import Settings
from archiver.status import WORKER_ID

log = structlog.get_logger(__name__)


def load_work(store: Store, plan: StoredPlan, segment: Segment, base: int) -> SegmentWork:
    """Everything one segment's build needs, from the plan and the segment's entries."""
    document = store.read(entries_name(segment.index))
    if document is None:
        raise TransientError(f"segment {segment.index}: its entries are missing from the plan")
    rows = [entry_of_row(row) for row in document["entries"]]
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
        algorithm=_algorithm(plan, segment),
        head_key=store.key(head_name(segment.index)),
        tail_key=store.key(tail_name(segment.index)),
    )


def _algorithm(plan: StoredPlan, segment: Segment) -> checksums.Algorithm | None:
    """The plan's checksum algorithm for the segment's bytes; None when this worker cannot compute it
    (CRC64NVME planned by a worker with awscrt, built by one without): the archive then has no checksum,
    which costs the notification its `checksum`, not the request."""
    algorithm = plan.algorithm
    if algorithm is not checksums.CRC32 and not checksums.awscrt_installed():
        log.warning("segment.checksum_unavailable", segment=segment.index, algorithm=algorithm.name)
        return None
    return algorithm


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
        record_name(segment.index), {"upload_id": plan.upload_id, "worker": WORKER_ID, **result.document()}
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
        record_name(index), {"upload_id": plan.upload_id, "failed": {"code": code, "message": message}}
    )
