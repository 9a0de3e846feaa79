"""One request's archive: its sources read (small ones by one GET each, big ones HEADed first) and
checked, zipped and uploaded, ending in the completed notification. The worker around it decides what
happens to the message."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from urllib.parse import quote

import structlog

from archiver import checksums, crc, manifest, notify
from archiver.assembly import CopiedEntry, Copier, PartBudget, Replan, copier_threads
from archiver.aws import AwsClients
from archiver.errors import ChecksumMismatch, PermanentError, archive_too_large
from archiver.models import ArchivePlan, SourceRef
from archiver.multipart import MultipartUpload, UploadedObject
from archiver.notices import (
    ArchiveChecksum,
    ArchiveInfo,
    CompletedNotification,
    ManifestInfo,
    SkippedSource,
)
from archiver.parts import upload_threads
from archiver.prefetch import Planned, Prefetcher
from archiver.prefetch import Resolved as Read
from archiver.settings import Settings
from archiver.sources import Fetched, SourceObject, fetch_small, head_source, head_sources, read_source
from archiver.status import Progress
from archiver.zipping import ZipEntry, zip_chunks

log = structlog.get_logger(__name__)

HEAD_CONCURRENCY = 8  # HEADs at once
# HEADs at once when a fan-out coordinator plans: every source is HEADed before anything else starts.
PLAN_HEAD_CONCURRENCY = 32
# GETs of sources in flight at once, ahead of the zip writer: against S3's tens of milliseconds to a
# first byte, 2,000 small objects took 6.1 s with 8, 2.2 s with 32, 1.9 s with 64 and 2.1 s with 128
# (bench/candidates.py, +20 ms, GETs alone). 32, not 64: each costs a thread and a few hundred KiB of
# buffers, and the worker on 2,000 x 100 KiB peaked at 151-155 MiB with 64 and 131-138 MiB with 32
# (make bench, 12 MiB window), for 3.7 s against 3.8 s at +20 ms.
SOURCE_GETS = 32
# S3 calls a worker makes outside the job's thread pools: the job's own, the heartbeat's lease renewals,
# status writes, and one spare.
OTHER_S3_CALLERS = 4


def s3_connections(settings: Settings) -> int:
    """Connections the boto3 S3 client's pool needs so no thread waits for one: part uploads, copies
    (and the lead read beside them), HEADs, and the rest. Source GETs have obstore's own pool."""
    return (
        upload_threads(settings.upload_concurrency)
        + copier_threads(settings.upload_concurrency)
        + (PLAN_HEAD_CONCURRENCY if settings.fanout_segment_bytes else HEAD_CONCURRENCY)
        + OTHER_S3_CALLERS
    )


def small_limit(settings: Settings) -> int:
    """Sources up to this size are read by one GET and no HEAD, whole into the read-ahead window: half
    of PREFETCH_BYTES (6 MiB by default: photos, the workload this is for, are 50 KiB-5 MiB), and below
    SERVER_SIDE_COPY_MIN_BYTES, since S3 copies what is bigger. 0 (PREFETCH_BYTES=0): every source is
    HEADed first, then streamed."""
    limit = settings.prefetch_bytes // 2
    if settings.server_side_copy_min_bytes:
        limit = min(limit, settings.server_side_copy_min_bytes - 1)
    return limit


@dataclass(frozen=True)
class Resolved:
    """A plan checked against what the HEADs found: the entries to archive and the sources skipped."""

    entries: list[ZipEntry]
    missing: list[str]
    total_bytes: int


def resolve_entries(
    plan: ArchivePlan, objects: Sequence[SourceObject | None], *, max_archive_bytes: int
) -> Resolved:
    """The plan's entries whose source exists, or the permanent failure a request gets before any
    upload: a missing source with `on_missing: fail`, no source at all, more bytes than allowed."""
    missing = [entry.ref.source for entry, obj in zip(plan.entries, objects, strict=True) if obj is None]
    if missing and plan.request.on_missing == "fail":
        raise sources_not_found(missing)
    entries = [
        ZipEntry(path=entry.path, source=obj) for entry, obj in zip(plan.entries, objects, strict=True) if obj
    ]
    if not entries:
        raise PermanentError("source_not_found", "none of the sources exists")
    total = sum(entry.source.size for entry in entries)
    if total > max_archive_bytes:
        raise archive_too_large(max_archive_bytes, total)
    return Resolved(entries=entries, missing=missing, total_bytes=total)


def sources_not_found(missing: Sequence[str]) -> PermanentError:
    """`on_missing: fail` with missing sources: how many, and the first five."""
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return PermanentError(
        "source_not_found", f"{len(missing)} source(s) not found: {', '.join(missing[:5])}{more}"
    )


def build_archive(
    clients: AwsClients,
    settings: Settings,
    plan: ArchivePlan,
    *,
    progress: Progress,
    abandoned: Callable[[], bool],
    confirm: Callable[[], None] = lambda: None,
) -> CompletedNotification:
    """Read every source, check what must fail, stream the archive to S3 and describe it in the completed
    notification. Progress is counted as source bytes are written; `confirm` runs before the upload is
    completed and may stop it by raising.

    Small sources are read by one GET each, ahead of the zip writer, and learnt from its answer; a
    missing one (`on_missing: fail`), too many bytes or a forbidden source then fail the attempt with the
    upload aborted. When what is learnt does not fit the plan (a missing source under `skip`, an archive
    that outgrew its part size), the attempt starts over with every source HEADed first, as it does
    without read-ahead (PREFETCH_BYTES=0): then those checks come before any upload."""
    attempt = _Attempt(clients, settings, plan, progress=progress, abandoned=abandoned, confirm=confirm)
    head_first = small_limit(settings) == 0
    trust_crc = True
    while True:
        try:
            built = attempt.run(head_first=head_first, trust_crc=trust_crc)
            break
        except ChecksumMismatch as exc:
            # A CRC-32 S3 called the object's is not: this server's are not to be trusted, and the next
            # delivery would fail the same way. Start over in this attempt, computing every CRC here.
            if not trust_crc:
                raise
            log.warning("source.crc_mismatch", source=exc.source)
            trust_crc = False
        except Replan as exc:
            if head_first:
                raise
            log.info("archive.replan", reason=str(exc))
            head_first = True
        progress.files_done = progress.bytes_done = 0
    return completed_notification(
        clients, settings, plan, built.uploaded, paths=built.paths, missing=built.missing, rows=built.rows
    )


@dataclass
class _Built:
    uploaded: UploadedObject
    paths: list[str] = field(default_factory=list)  # of the archived entries, in order
    missing: list[str] = field(default_factory=list)  # sources skipped
    rows: list[manifest.Row] | None = None  # of the archived entries, for the manifest


def archive_metadata(plan: ArchivePlan, entries: int) -> dict[str, str]:
    """The archive's S3 metadata, set when its upload is created: the request id, which a duplicate
    request checks before it re-sends a stored notification, and the number of entries."""
    return {"request-id": plan.request_id, "entries": str(entries)}


def archive_disposition(plan: ArchivePlan) -> str:
    """The Content-Disposition a browser saves the archive under: its own name, in UTF-8 (RFC 6266)."""
    return f"attachment; filename*=UTF-8''{quote(plan.key.rsplit('/', 1)[-1])}"


def completed_notification(
    clients: AwsClients,
    settings: Settings,
    plan: ArchivePlan,
    uploaded: UploadedObject,
    *,
    paths: list[str],
    missing: list[str],
    rows: list[manifest.Row] | None,
) -> CompletedNotification:
    """The completed notification of an archive with these entries (`paths`) and skipped sources, once
    its manifest (`rows`) is written next to it; without rows, it has no manifest."""
    log.info(
        "archive.assembled",
        bytes=uploaded.size,
        copied_bytes=uploaded.apart_bytes,
        streamed_bytes=uploaded.size - uploaded.apart_bytes,
        parts=uploaded.parts,
    )
    kept = set(paths)
    return notify.completed(
        request_id=plan.request_id,
        archive=ArchiveInfo(
            bucket=uploaded.bucket,
            key=uploaded.key,
            url=notify.archive_url(clients.presign, settings, bucket=uploaded.bucket, key=uploaded.key),
            size=uploaded.size,
            entries=len(paths),
            crc32=None if uploaded.crc32 is None else crc.to_base64(uploaded.crc32),
            checksum=archive_checksum(uploaded),
        ),
        skipped=[SkippedSource(source=source, reason="not_found") for source in missing],
        renamed=[renamed for renamed in plan.renamed if renamed.name in kept],
        metadata=plan.request.metadata,
        manifest=None if rows is None else _manifest(clients, settings, plan, uploaded, rows),
    )


def _manifest(
    clients: AwsClients,
    settings: Settings,
    plan: ArchivePlan,
    uploaded: UploadedObject,
    rows: list[manifest.Row],
) -> ManifestInfo:
    key = manifest.manifest_key(uploaded.key)
    body = manifest.document(
        plan.request_id, bucket=uploaded.bucket, key=uploaded.key, size=uploaded.size, rows=rows
    )
    manifest.write(clients.s3, bucket=uploaded.bucket, key=key, body=body)
    url = notify.archive_url(clients.presign, settings, bucket=uploaded.bucket, key=key)
    return ManifestInfo(bucket=uploaded.bucket, key=key, url=url, entries=len(rows))


def archive_checksum(uploaded: UploadedObject) -> ArchiveChecksum | None:
    """The archive's checksum as the notification gives it: the one S3 verified when the upload completed,
    or a fan-out's, joined from its segments'."""
    if uploaded.checksum is None or uploaded.checksum_algorithm is None:
        return None
    return ArchiveChecksum(
        algorithm=uploaded.checksum_algorithm, value=uploaded.checksum, s3_verified=uploaded.s3_verified
    )


def _untrusted(obj: SourceObject | None, trust_crc: bool) -> SourceObject | None:
    return obj if trust_crc or obj is None else replace(obj, crc32=None)


@dataclass
class _Attempt:
    """One pass at the archive: its sources read, zipped into a multipart upload that completes or is
    aborted."""

    clients: AwsClients
    settings: Settings
    plan: ArchivePlan
    progress: Progress
    abandoned: Callable[[], bool]
    confirm: Callable[[], None]
    heads: threading.BoundedSemaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(HEAD_CONCURRENCY)
    )

    def run(self, *, head_first: bool, trust_crc: bool) -> _Built:
        plan, progress = self.plan, self.progress
        compression = plan.request.compression
        if head_first:
            refs = [entry.ref for entry in plan.entries]
            objects = head_sources(self.clients.s3, refs, concurrency=HEAD_CONCURRENCY)
            objects = [_untrusted(obj, trust_crc) for obj in objects]
            resolved = resolve_entries(plan, objects, max_archive_bytes=self.settings.max_archive_bytes)
            budget = PartBudget.known(resolved.entries, self.settings, compression)
            planned: list[Planned] = list(objects)
            missing = resolved.missing
            progress.files_total, progress.bytes_total = len(resolved.entries), resolved.total_bytes
        else:
            paths = [entry.path for entry in plan.entries]
            budget = PartBudget.unknown(
                paths, self.settings, compression, small_limit=small_limit(self.settings)
            )
            planned, missing = [entry.ref for entry in plan.entries], []
            progress.files_total, progress.bytes_total = len(plan.entries), 0
        built = self._upload(planned, budget, trust_crc=trust_crc, head_first=head_first)
        built.missing = missing
        return built

    def _fetch(self, trust_crc: bool) -> Callable[[Planned, Callable[[int], None]], Read]:
        s3, limit = self.clients.s3, small_limit(self.settings)

        def head(ref: SourceRef) -> SourceObject | None:
            with self.heads:
                return _untrusted(head_source(s3, ref), trust_crc)

        def fetch(planned: Planned, admit: Callable[[int], None]) -> Read:
            known = planned if isinstance(planned, SourceObject) else None
            ref = known.ref if known is not None else planned
            assert isinstance(ref, SourceRef)
            store = self.clients.source_store(ref.bucket)
            return fetch_small(store, ref, limit=limit, admit=admit, head=lambda: head(ref), known=known)

        return fetch

    def _entries(
        self, prefetcher: Prefetcher, budget: PartBudget, indexes: list[int], *, head_first: bool
    ) -> Iterator[ZipEntry]:
        """The archive's entries in order, each once its source has been seen; missing ones skipped, or
        (read without HEADs) the failure or the replan they mean."""
        plan = self.plan
        for index, planned in enumerate(plan.entries):
            resolved = prefetcher.resolve(index)
            if resolved is None:
                if head_first:
                    continue  # resolve_entries allowed it: skipped
                self._missing(prefetcher, index)
            obj = resolved.obj if isinstance(resolved, Fetched) else resolved
            assert obj is not None
            entry = ZipEntry(path=planned.path, source=obj)
            budget.admit(index, len(indexes), entry)
            self.progress.bytes_total = max(self.progress.bytes_total, budget.known_bytes)
            indexes.append(index)
            yield entry

    def _missing(self, prefetcher: Prefetcher, index: int) -> None:
        """A source found missing by its GET: the permanent failure `on_missing: fail` asks for, counting
        and naming the others found so far; under `skip`, a replan, so that the upload's `entries`
        metadata, set when it was created, is the number of entries the archive has."""
        found = sorted({index, *prefetcher.missing(len(self.plan.entries))})
        sources = [self.plan.entries[i].ref.source for i in found]
        if self.plan.request.on_missing == "fail":
            raise sources_not_found(sources)
        raise Replan(f"source(s) not found, to be skipped: {', '.join(sources[:5])}")

    def _upload(
        self, planned: list[Planned], budget: PartBudget, *, trust_crc: bool, head_first: bool
    ) -> _Built:
        """Zip the entries into the archive's multipart upload, copying big uncompressed ones inside S3."""
        s3, settings, plan, progress = self.clients.s3, self.settings, self.plan, self.progress
        with MultipartUpload.create(
            s3,
            bucket=plan.bucket,
            key=plan.key,
            metadata=archive_metadata(plan, progress.files_total),
            content_disposition=archive_disposition(plan),
            algorithm=checksums.ALGORITHMS[settings.archive_checksum],
        ) as upload:
            copier = Copier(
                upload,
                part_size=budget.part_size,
                concurrency=settings.upload_concurrency,
                abandoned=self.abandoned,
            )
            prefetcher = Prefetcher(
                planned,
                fetch=self._fetch(trust_crc),
                stream=lambda obj: read_source(s3, obj),
                window_bytes=settings.prefetch_bytes,
                small_limit=small_limit(settings),
                workers=SOURCE_GETS,
            )
            indexes: list[int] = []  # plan index of each archived entry, by position in the archive
            stream, rows = checksums.Running(checksums.CRC32), manifest.Rows()
            try:
                chunks = zip_chunks(
                    self._entries(prefetcher, budget, indexes, head_first=head_first),
                    open_source=lambda position, obj: rows.over(
                        position,
                        plan.entries[indexes[position]].path,
                        obj,
                        self._counted(prefetcher.open(indexes[position])),
                    ),
                    compression=plan.request.compression,
                    copy=lambda position, obj: self._copy(
                        copier, budget, indexes[position], obj, rows, position
                    ),
                )
                upload.write(
                    stream.over(chunks),
                    part_size=budget.part_size,
                    concurrency=settings.upload_concurrency,
                    abandoned=self.abandoned,
                )
            finally:
                prefetcher.close()
                copier.close()
            whole = stream.length == upload.ledger.position
            uploaded = upload.complete(confirm=self.confirm, crc32=stream.value if whole else None)
        progress.bytes_copied = uploaded.apart_bytes
        paths = [plan.entries[i].path for i in indexes]
        return _Built(uploaded=uploaded, paths=paths, rows=rows.listed(len(indexes)))

    def _copy(
        self,
        copier: Copier,
        budget: PartBudget,
        index: int,
        obj: SourceObject,
        rows: manifest.Rows,
        position: int,
    ) -> CopiedEntry | None:
        copied = copier.copy(obj) if index in budget.copyable else None
        if copied is not None:
            rows.copied(position, self.plan.entries[index].path, obj)
            self._count(obj.size)
            self.progress.files_done += 1
        return copied

    def _counted(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self._count(len(chunk))
            yield chunk
        self.progress.files_done += 1

    def _count(self, size: int) -> None:
        """Source bytes written: MAX_ARCHIVE_BYTES holds for what is read, too."""
        self.progress.bytes_done += size
        if self.progress.bytes_done > self.settings.max_archive_bytes:
            raise archive_too_large(self.settings.max_archive_bytes)
