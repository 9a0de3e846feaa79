"""A coordinator's first step: every source HEADed and checked as a single worker checks them, the
layout of segments, the multipart upload created, and the plan written beside status.json."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import structlog

from archiver.aws import AwsClients
from archiver.fanout.layout import Layout, plan_layout
from archiver.fanout.store import PLAN_NAME, PLAN_VERSION, Store, StoredPlan, entries_name, entry_row
from archiver.job import (
    PLAN_HEAD_CONCURRENCY,
    Resolved,
    archive_disposition,
    archive_metadata,
    resolve_entries,
    small_limit,
)
from archiver.models import ArchivePlan, utc_timestamp
from archiver.multipart import MultipartUpload
from archiver.settings import Settings
from archiver.sources import head_sources
from archiver.status import WORKER_ID

log = structlog.get_logger(__name__)


def write_plan(clients: AwsClients, settings: Settings, plan: ArchivePlan, store: Store) -> StoredPlan | None:
    """The request planned in segments and its upload created, or None when it is too small to fan
    out. Fails as a single worker would (missing sources, too many bytes) before any upload exists."""
    refs = [entry.ref for entry in plan.entries]
    objects = head_sources(
        clients.s3,
        refs,
        concurrency=PLAN_HEAD_CONCURRENCY,
        stores=clients.stores,
        small=small_limit(settings),
    )
    resolved = resolve_entries(plan, objects, max_archive_bytes=settings.max_archive_bytes)
    segment_bytes = settings.fanout_segment_bytes
    if resolved.total_bytes <= 2 * segment_bytes:
        return None
    compression = plan.request.compression
    layout = plan_layout(resolved.entries, settings, compression, segment_bytes)
    upload_id = MultipartUpload.start(
        clients.s3,
        bucket=plan.bucket,
        key=plan.key,
        metadata=archive_metadata(plan, len(resolved.entries)),
        content_disposition=archive_disposition(plan),
        # Segments leave unused part numbers between them, which S3 allows only without part checksums.
        checksummed=False,
    ).upload_id
    _write_entries(store, resolved, layout)
    document = {
        "version": PLAN_VERSION,
        "request_id": plan.request_id,
        "digest": plan.digest,
        "bucket": plan.bucket,
        "key": plan.key,
        "upload_id": upload_id,
        "part_size": layout.part_size,
        "small_limit": small_limit(settings),
        "compression": compression,
        # The segments' checksums are in this algorithm, whatever the ARCHIVE_CHECKSUM of their workers.
        "checksum": settings.archive_checksum,
        "final_part": layout.final_part,
        "entries": len(resolved.entries),
        "source_bytes": resolved.total_bytes,
        "missing": resolved.missing,
        "segments": [asdict(segment) for segment in layout.segments],
        "created_at": utc_timestamp(),
        "coordinator": WORKER_ID,
    }
    # Written last: a plan that exists is whole.
    store.write(PLAN_NAME, document)
    log.info(
        "fanout.planned",
        segments=len(layout.segments),
        part_size=layout.part_size,
        entries=len(resolved.entries),
        source_bytes=resolved.total_bytes,
        upload_id=upload_id,
    )
    return StoredPlan(document, resumed=False)


def _write_entries(store: Store, resolved: Resolved, layout: Layout) -> None:
    """Each segment's entries, the rows a segment task builds from."""
    entries = resolved.entries

    def write(first: int, count: int, index: int) -> None:
        rows = [entry_row(entries[i], i in layout.copyable) for i in range(first, first + count)]
        store.write(entries_name(index), {"entries": rows})

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda s: write(s.first_entry, s.count, s.index), layout.segments))
