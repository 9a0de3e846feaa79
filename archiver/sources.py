"""S3 source objects: what a HEAD or a GET says about them, and their bytes, read whole by one GET (small
ones, with obstore) or as a lazily opened, resuming byte iterator (big ones, with boto3)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING

import botocore.exceptions
import obstore
import obstore.exceptions
import structlog

from archiver import crc
from archiver.aws import error_code, http_status, is_transient, retry_transient
from archiver.errors import PermanentError, TransientError
from archiver.models import SourceRef

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from obstore import GetOptions, GetResult
    from obstore.store import S3Store

log = structlog.get_logger(__name__)

READ_CHUNK = 64 * 1024  # stream-zip is fastest fed 64 KiB chunks; botocore's default is 1 KiB
# A small body is held in pieces of at least 256 KiB: above glibc's mmap threshold (pinned at 128 KiB by
# the worker), each is its own mapping, returned to the system when freed, where 64 KiB pieces from 64
# reader threads fragmented the heap (+40-80 MiB of peak RSS on 400 x 3 MiB, measured).
BODY_CHUNK = 256 * 1024
MAX_RESUMES = 5


@dataclass(frozen=True)
class SourceObject:
    """What a HEAD (or, for a small source, its one GET) told us about one source; every later read must
    find the same ETag."""

    ref: SourceRef
    size: int
    etag: str
    last_modified: datetime
    content_type: str
    # S3's full-object CRC-32 when the object has one (not a composite checksum), or that of the bytes a
    # small source's GET returned, computed here.
    crc32: int | None
    crc_of_bytes: bool = False  # crc32 was computed here from the bytes held: nothing to check


def full_object_crc32(head: Mapping[str, object]) -> int | None:
    """S3's CRC-32 of the whole object, where S3 documents it as that. An object uploaded in parts (the
    AWS CLI and boto3 do so above 8 MiB) may carry a COMPOSITE checksum instead, a CRC of its parts'
    CRCs: S3 marks it with `ChecksumType` and a `-N` suffix, but moto sends it bare, so without a
    `ChecksumType` the value is trusted only on an object written in one piece (an ETag without a part
    count). Anything else is streamed as an object without a CRC would be."""
    value = head.get("ChecksumCRC32")
    if not isinstance(value, str) or "-" in value:  # "<b64>-<parts>": a checksum of part checksums
        return None
    kind = head.get("ChecksumType")
    if kind is None:
        etag = str(head.get("ETag") or "").strip('"')
        if not etag or "-" in etag:
            return None
    elif kind != "FULL_OBJECT":
        return None
    return crc.from_base64(value)


# Storage classes and Intelligent-Tiering tiers whose objects cannot be read until restored.
ARCHIVE_CLASSES = frozenset({"GLACIER", "DEEP_ARCHIVE"})
ARCHIVE_TIERS = frozenset({"ARCHIVE_ACCESS", "DEEP_ARCHIVE_ACCESS"})


def needs_restore(head: Mapping[str, object]) -> bool:
    """An object in an archive tier that has no finished restore: its GET would answer 403
    InvalidObjectState. (GLACIER_IR, Glacier Instant Retrieval, reads like any other class.)"""
    archived = head.get("StorageClass") in ARCHIVE_CLASSES or head.get("ArchiveStatus") in ARCHIVE_TIERS
    return archived and 'ongoing-request="false"' not in str(head.get("Restore") or "")


def archived_message(source: str) -> str:
    return f"{source} is in an archive storage class and must be restored before it can be archived"


def refused_read(exc: Exception, source: str) -> PermanentError | None:
    """The permanent error for a 403 on a source's GET or copy, which its HEAD did not foresee: an
    archived object (InvalidObjectState), or one whose KMS key this role may not use (AccessDenied).
    Retrying would get the same answer on every delivery."""
    if http_status(exc) != 403:
        return None
    if error_code(exc) == "InvalidObjectState":
        return PermanentError("source_archived", archived_message(source))
    return PermanentError("forbidden_source", f"access denied reading {source} ({error_code(exc) or 403})")


@retry_transient
def head_source(s3: S3Client, ref: SourceRef) -> SourceObject | None:
    """The object's metadata, or None if it does not exist."""
    try:
        head = s3.head_object(Bucket=ref.bucket, Key=ref.key, ChecksumMode="ENABLED")
    except botocore.exceptions.ClientError as exc:
        status = http_status(exc)
        if status == 404 or error_code(exc) in ("NoSuchKey", "NotFound", "NoSuchBucket"):
            return None
        if status == 403:
            # Without s3:ListBucket, S3 answers 403 for a missing key too: the role must list the bucket
            # for missing sources to be told apart from forbidden ones.
            raise PermanentError("forbidden_source", f"access denied to {ref.source}") from None
        raise
    if needs_restore(head):
        raise PermanentError("source_archived", archived_message(ref.source))
    return SourceObject(
        ref=ref,
        size=int(head["ContentLength"]),
        etag=str(head["ETag"]),
        last_modified=head["LastModified"],
        content_type=str(head.get("ContentType") or ""),
        crc32=full_object_crc32(head),
    )


def head_sources(
    s3: S3Client,
    refs: Sequence[SourceRef],
    *,
    concurrency: int,
    stores: Callable[[str], S3Store] | None = None,
    small: int = 0,
) -> list[SourceObject | None]:
    """HEAD every source with bounded concurrency, in request order, so a request fails before upload.

    With `stores`, a source obstore can name is HEADed through obstore first, and again through boto3
    only if it is bigger than `small`: a source that is read whole needs neither S3's checksums nor its
    storage class (its GET answers for both, as a single worker's small source's does), and obstore's
    HEAD takes a third of boto3's CPU (0.4 against 1.4 ms here), which is most of what planning 100,000
    sources costs."""
    if not refs:
        return []

    def head(ref: SourceRef) -> SourceObject | None:
        if stores is not None and small and obstore_can_name(ref.key):
            seen = head_small(stores(ref.bucket), ref, otherwise=lambda: head_source(s3, ref))
            if seen is None or seen.size <= small:
                return seen
        return head_source(s3, ref)

    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(refs)))) as pool:
        return list(pool.map(head, refs))


def head_small(
    store: S3Store, ref: SourceRef, *, otherwise: Callable[[], SourceObject | None]
) -> SourceObject | None:
    """What obstore's HEAD tells (size, ETag, Last-Modified, Content-Type; no checksum, no storage
    class), or None if the source does not exist; `otherwise()` if obstore answered for another path."""
    with _obstore_errors(ref):
        result = _first_get(store, ref, None, head=True)
    if result is None:
        return None
    if result.meta["path"] != ref.key:
        return otherwise()
    return _seen(ref, result)


def _open(s3: S3Client, obj: SourceObject, start: int, end: int) -> Iterator[bytes]:
    try:
        if start or end < obj.size:
            last = str(end - 1) if end < obj.size else ""
            response = s3.get_object(
                Bucket=obj.ref.bucket, Key=obj.ref.key, IfMatch=obj.etag, Range=f"bytes={start}-{last}"
            )
        else:
            response = s3.get_object(Bucket=obj.ref.bucket, Key=obj.ref.key, IfMatch=obj.etag)
    except botocore.exceptions.ClientError as exc:
        if http_status(exc) in (404, 412) or error_code(exc) in ("NoSuchKey", "PreconditionFailed"):
            # Changed or deleted since its HEAD: this attempt cannot finish, but a redelivery that
            # HEADs it afresh can.
            raise TransientError(f"{obj.ref.source} changed while being archived") from None
        if (refused := refused_read(exc, obj.ref.source)) is not None:
            raise refused from None
        raise
    return response["Body"].iter_chunks(READ_CHUNK)


def read_source(
    s3: S3Client,
    obj: SourceObject,
    *,
    end: int | None = None,
    max_resumes: int = MAX_RESUMES,
) -> Iterator[bytes]:
    """Yield the object's bytes (up to `end` when given) in 64 KiB chunks. The GET is sent on the first
    `next()`, not before, so an early-opened connection never idles; a body that breaks off is resumed
    from the byte it stopped at."""
    stop = obj.size if end is None else end
    position = 0
    resumes = 0
    while True:
        try:
            for chunk in _open(s3, obj, position, stop):
                position += len(chunk)
                yield chunk
        except Exception as exc:
            if not is_transient(exc) or resumes >= max_resumes:
                raise
            resumes += 1
            log.warning("source.resume", source=obj.ref.source, at_byte=position, error=type(exc).__name__)
            continue
        if position == stop:
            return
        if position > stop or resumes >= max_resumes:
            raise TransientError(f"{obj.ref.source}: read {position} bytes, expected {stop}")
        resumes += 1  # the body ended early without an error: ask for the rest


# ------------------------------------------------------------------------------------------- small sources


@dataclass(frozen=True)
class Fetched:
    """A small source read whole by one GET: what its answer said, and its bytes."""

    obj: SourceObject
    chunks: list[bytes]


def _get(store: S3Store, ref: SourceRef, options: GetOptions | None, etag: str | None) -> GetResult:
    """One GET. With `etag` (the version first seen), a 404 or 412 means the source changed; without, a
    404 is raised as obstore's NotFoundError. A 403 is permanent, as on a HEAD."""
    try:
        return obstore.get(store, ref.key, options=options)
    except (FileNotFoundError, obstore.exceptions.NotFoundError, obstore.exceptions.PreconditionError):
        if etag is None:
            raise
        # Changed or deleted since it was first seen: this attempt cannot finish, a redelivery can.
        raise TransientError(f"{ref.source} changed while being archived") from None
    except (obstore.exceptions.PermissionDeniedError, obstore.exceptions.UnauthenticatedError) as exc:
        refused = refused_read(exc, ref.source) or PermanentError(
            "forbidden_source", f"access denied to {ref.source}"
        )
        raise refused from None


@retry_transient
def _first_get(
    store: S3Store, ref: SourceRef, known: SourceObject | None, *, head: bool = False
) -> GetResult | None:
    """The source's GET, or HEAD (If-Match when a HEAD saw it first); None if it does not exist."""
    etag = known.etag if known is not None else None
    options: GetOptions = {"if_match": etag} if etag else {}
    if head:
        options["head"] = True
    try:
        return _get(store, ref, options or None, etag)
    except (FileNotFoundError, obstore.exceptions.NotFoundError):
        return None


def _seen(ref: SourceRef, result: GetResult) -> SourceObject:
    """The source as a GET's or HEAD's answer through obstore describes it (no checksum)."""
    meta = result.meta
    return SourceObject(
        ref=ref,
        size=int(meta["size"]),
        etag=str(meta["e_tag"] or ""),
        last_modified=meta["last_modified"],
        content_type=str(result.attributes.get("Content-Type") or ""),
        crc32=None,
    )


@contextlib.contextmanager
def _obstore_errors(ref: SourceRef) -> Iterator[None]:
    """What obstore's retries did not cure, as a transient error; its message holds the whole answer
    and a debug dump, cut to the status and code."""
    try:
        yield
    except obstore.exceptions.BaseError as exc:
        raise TransientError(f"reading {ref.source} failed: {_brief(exc)}") from None


def _body(store: S3Store, obj: SourceObject, first: GetResult, max_resumes: int) -> list[bytes]:
    """The whole body, in chunks of at least BODY_CHUNK bytes. A body that breaks off is resumed from
    where it stopped with a Range GET carrying If-Match, as a big source's stream is."""
    chunks: list[bytes] = []
    position, resumes, result = 0, 0, first
    while True:
        try:
            for chunk in result.stream(min_chunk_size=BODY_CHUNK):
                chunks.append(chunk)
                position += len(chunk)
        except Exception as exc:
            if not is_transient(exc) or resumes >= max_resumes:
                raise
            log.warning("source.resume", source=obj.ref.source, at_byte=position, error=type(exc).__name__)
        if position == obj.size:
            return chunks
        if position > obj.size or resumes >= max_resumes:
            raise TransientError(f"{obj.ref.source}: read {position} bytes, expected {obj.size}")
        resumes += 1
        options: GetOptions = {"if_match": obj.etag, "range": (position, obj.size)}
        result = retry_transient(_get)(store, obj.ref, options, obj.etag)


def fetch_small(
    store: S3Store,
    ref: SourceRef,
    *,
    limit: int,
    admit: Callable[[int], None],
    head: Callable[[], SourceObject | None],
    known: SourceObject | None = None,
    max_resumes: int = MAX_RESUMES,
) -> Fetched | SourceObject | None:
    """One GET for a source, with no HEAD before it: its answer carries size, ETag, Last-Modified and
    Content-Type. Up to `limit` bytes, the body is read whole once `admit(size)` returns (it waits for
    room in the read-ahead window), and its CRC-32 computed here. None: the source does not exist.
    A bigger source is not read: the GET is dropped unread and the object's metadata returned, from
    `head()` (a HEAD: S3's checksums, which a GET answer does not carry) unless `known` has it already."""
    with _obstore_errors(ref):
        return _fetch(store, ref, limit, admit, head, known, max_resumes)


def _brief(exc: BaseException) -> str:
    status, code = http_status(exc), error_code(exc)
    if status:
        return f"HTTP {status}" + (f" {code}" if code else "")
    return str(exc).split("\n", 1)[0][:200]


def obstore_can_name(key: str) -> bool:
    """Whether object_store addresses exactly this key. Its paths drop a leading or trailing `/` (so
    `dir/` would read `dir`) and refuse empty, `.` and `..` segments and control characters: such keys
    are read with boto3, HEAD then GET, like big sources."""
    segments = key.split("/")
    return all(segment not in ("", ".", "..") for segment in segments) and not any(
        ord(char) < 0x20 or ord(char) == 0x7F for char in key
    )


def _fetch(
    store: S3Store,
    ref: SourceRef,
    limit: int,
    admit: Callable[[int], None],
    head: Callable[[], SourceObject | None],
    known: SourceObject | None,
    max_resumes: int,
) -> Fetched | SourceObject | None:
    if not obstore_can_name(ref.key):
        return known if known is not None else head()
    first = _first_get(store, ref, known)
    if first is None:
        return None
    meta = first.meta
    size = int(meta["size"])
    if size > limit or meta["path"] != ref.key:
        del first  # closes its connection: the body is not wanted
        return known if known is not None else head()
    admit(size)
    seen = _seen(ref, first)
    chunks = _body(store, seen, first, max_resumes)
    return Fetched(obj=replace(seen, crc32=crc.of(chunks), crc_of_bytes=True), chunks=chunks)
