"""Byte chunks -> parts -> an S3 multipart upload that either completes or is aborted.

The archive appears whole or not at all: S3 shows nothing until CompleteMultipartUpload, and any failure
(including an abandoned job) aborts the upload so no parts linger and cost money.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import botocore.exceptions
import structlog

from archiver.aws import http_status, retry_transient
from archiver.errors import JobAbandoned, PermanentError
from archiver.settings import MAX_PART_SIZE, MAX_PARTS, MIN_PART_SIZE, MiB

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef, CopyPartResultTypeDef, CopySourceTypeDef

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class UploadedObject:
    bucket: str
    key: str
    size: int
    parts: int
    apart_bytes: int = 0  # bytes uploaded apart from the stream (copied inside S3), never through here
    # The CRC-32 of the whole object, from the stream that made it (a copied range's stand-in has the
    # same length and CRC as the bytes copied: assembly.stand_in); None when it is not known.
    crc32: int | None = None


def choose_part_size(size_bound: int, minimum: int, *, extra_parts: int = 0) -> int:
    """The smallest part size >= `minimum` (whole MiB) that keeps an archive of `size_bound` bytes within
    S3's 10,000 parts, `extra_parts` of them set aside (server-side copies can take a few more numbers
    than streaming the same bytes); PART_SIZE alone would cap a 16 MiB-part archive at ~156 GiB."""
    needed = -(-size_bound // (MAX_PARTS - extra_parts))
    needed = -(-needed // MiB) * MiB
    part_size = max(minimum, needed)
    if part_size > MAX_PART_SIZE:
        raise PermanentError("too_large", f"an archive of up to {size_bound} bytes exceeds S3's object limit")
    return part_size


# Streamed parts that may still be numbered before parts uploaded apart from the stream once their
# numbers are reserved: the one being filled, one the next bytes may complete, and the one that ends
# where the apart range starts (parts_of cuts it there).
RESERVE_GAP = 3


@dataclass(frozen=True)
class Hole:
    """Stream bytes [start, end) that parts first..last fill, uploaded apart from the stream (copied
    inside S3): the stream carries stand-ins there, which parts_of drops."""

    start: int
    end: int
    first: int
    last: int


@dataclass
class PartLedger:
    """Which part numbers an upload has given out and which stream ranges other parts fill. Used by one
    thread: the zip writer reserves numbers and marks holes while the part assembler, pulled by the same
    loop, numbers the streamed parts around them."""

    position: int = 0  # stream bytes the assembler has taken, holes included
    last_number: int = 0  # the highest part number the stream has passed, streamed or apart
    reserved_last: int = 0  # the highest number reserved for parts uploaded apart
    holes: deque[Hole] = field(default_factory=deque)
    # A fan-out segment's last part, under 5 MiB, that could not be joined to the one before (parts_of)
    short_last: int = 0

    def reserve(self, count: int) -> int:
        """The first of `count` numbers for parts uploaded apart from the stream. The writer may reserve
        while the end of what it wrote before is still on its way to the assembler: RESERVE_GAP numbers
        are left for the streamed parts that can still come first; unused ones are gaps, which S3 allows."""
        taken = max([self.last_number, self.reserved_last, *(hole.last for hole in self.holes)])
        first = taken + RESERVE_GAP + 1
        self.reserved_last = first + count - 1
        return first

    def add_hole(self, hole: Hole) -> None:
        self.holes.append(hole)

    def number_streamed(self) -> int:
        number = self.last_number + 1
        if self.holes and number >= self.holes[0].first:
            raise RuntimeError(f"streamed part {number} would overwrite part {self.holes[0].first}")
        self.last_number = number
        return number

    def passed(self, hole: Hole) -> None:
        if self.holes[0] is not hole:
            raise RuntimeError(f"passed {hole}, but the next hole is {self.holes[0]}")
        self.holes.popleft()
        self.last_number = hole.last


def parts_of(
    chunks: Iterable[bytes],
    part_size: int,
    abandoned: Callable[[], bool],
    ledger: PartLedger,
    *,
    join_short_last: bool = False,
    first_size: int = 0,
    at_least: int = 0,
) -> Iterator[tuple[int, bytes | bytearray]]:
    """Regroup chunks into numbered parts of `part_size` bytes (the last one shorter), leaving out the
    ranges other parts fill (`ledger.holes`). Each part is filled in place and handed over as it is:
    joining and slicing would hold every part twice. A part that ends where a hole starts is cut there:
    it holds the copied object's lead, so it is at least 5 MiB, and at most part_size + 5 MiB.

    For a fan-out segment, whose end is not the archive's: `join_short_last` holds a full part back until
    5 MiB more are written after it, so that a last part under S3's minimum is joined to it (one that
    cannot be, a copy having come between, is numbered in `ledger.short_last`), unless the stream is
    known to be at least `at_least` bytes long and that many follow anyway; `first_size` makes the first
    part smaller, so that its upload starts sooner."""
    size = first_size or part_size
    part = bytearray(size)
    filled = 0
    emitted = False
    held: tuple[int, bytearray] | None = None
    for chunk in chunks:
        if abandoned():
            raise JobAbandoned("the job was stopped before its archive was complete")
        data = memoryview(chunk)
        while data:
            hole = ledger.holes[0] if ledger.holes else None
            if hole is not None and ledger.position >= hole.start:
                skip = min(len(data), hole.end - ledger.position)
                data = data[skip:]
                ledger.position += skip
                if ledger.position == hole.end:
                    ledger.passed(hole)
                continue
            end = size
            if hole is not None and hole.start - (ledger.position - filled) < size + MIN_PART_SIZE:
                end = hole.start - (ledger.position - filled)
            take = min(len(data), end - filled)
            part[filled : filled + take] = data[:take]
            filled += take
            ledger.position += take
            data = data[take:]
            if held is not None and filled >= MIN_PART_SIZE:
                yield held
                held = None
            if filled == end:
                del part[filled:]  # a part cut short where a hole starts
                more_follow = ledger.position + MIN_PART_SIZE <= at_least
                if join_short_last and end == size and not more_follow:
                    held = (ledger.number_streamed(), part)
                else:
                    yield ledger.number_streamed(), part
                emitted = True
                size = part_size
                part, filled = bytearray(size), 0
    yield from _last_part(held, part[:filled], ledger, emitted=emitted, join_short_last=join_short_last)


def _last_part(
    held: tuple[int, bytearray] | None,
    rest: bytearray,
    ledger: PartLedger,
    *,
    emitted: bool,
    join_short_last: bool,
) -> Iterator[tuple[int, bytes | bytearray]]:
    """The stream's end: what is left joined to a held part (it is under 5 MiB, or the part would have
    been handed over), else a part of its own; at least one part, for an empty stream."""
    if held is not None:
        held[1].extend(rest)
        yield held
    elif rest or not emitted:
        number = ledger.number_streamed()
        if join_short_last and emitted and len(rest) < MIN_PART_SIZE:
            ledger.short_last = number
        yield number, bytes(rest)


@retry_transient
def upload_part(
    s3: S3Client, *, bucket: str, key: str, upload_id: str, number: int, body: bytes | bytearray
) -> CompletedPartTypeDef:
    # botocore sends any bytes-like body as it is; its stubs only name bytes, and a bytes() copy of a
    # 16 MiB part is what parts_of avoids.
    payload = cast(bytes, body)
    response = s3.upload_part(
        Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=payload, ChecksumAlgorithm="CRC32"
    )
    part: CompletedPartTypeDef = {"PartNumber": number, "ETag": response["ETag"]}
    if "ChecksumCRC32" in response:
        part["ChecksumCRC32"] = response["ChecksumCRC32"]
    return part


@retry_transient
def _abort(s3: S3Client, *, bucket: str, key: str, upload_id: str) -> None:
    try:
        s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
    except botocore.exceptions.ClientError as exc:
        # NoSuchUpload: aborted already (by a coordinator that ended a cancelled fan-out, or by an abort
        # whose answer was lost), which is what an abort is for.
        if http_status(exc) != 404:
            raise


def _never() -> bool:
    return False


def _nothing() -> None:
    return None


class MultipartUpload:
    """One object's multipart upload, the only owner of its state: its id, the ledger of part numbers
    (streamed parts, and parts uploaded apart from the stream, such as server-side copies or, later,
    parts another process uploaded), the parts to complete it with, and its end. `create` is a context
    manager that registers the abort as soon as the upload id exists: leaving it any way but through
    `complete` aborts the upload, so no parts linger and cost money."""

    def __init__(self, s3: S3Client, *, bucket: str, key: str, upload_id: str, metadata: dict[str, str]):
        self.s3, self.bucket, self.key, self.upload_id = s3, bucket, key, upload_id
        self.metadata = metadata
        self.ledger = PartLedger()
        self._parts: list[CompletedPartTypeDef] = []
        self.apart_bytes = 0
        self.completed = False

    @classmethod
    def start(
        cls,
        s3: S3Client,
        *,
        bucket: str,
        key: str,
        metadata: dict[str, str],
        content_disposition: str | None = None,
    ) -> MultipartUpload:
        """A new upload, which its caller must complete or abort (`create` does that for it)."""
        extra = {"ContentDisposition": content_disposition} if content_disposition else {}
        upload_id = retry_transient(s3.create_multipart_upload)(
            Bucket=bucket,
            Key=key,
            ContentType="application/zip",
            Metadata=metadata,
            ChecksumAlgorithm="CRC32",
            **extra,  # type: ignore[arg-type]
        )["UploadId"]
        return cls(s3, bucket=bucket, key=key, upload_id=upload_id, metadata=metadata)

    @classmethod
    @contextlib.contextmanager
    def create(
        cls,
        s3: S3Client,
        *,
        bucket: str,
        key: str,
        metadata: dict[str, str],
        content_disposition: str | None = None,
    ) -> Iterator[MultipartUpload]:
        upload = cls.start(
            s3, bucket=bucket, key=key, metadata=metadata, content_disposition=content_disposition
        )
        try:
            yield upload
        finally:
            if not upload.completed:
                upload.abort()

    def upload_part(self, number: int, body: bytes | bytearray) -> CompletedPartTypeDef:
        return upload_part(
            self.s3, bucket=self.bucket, key=self.key, upload_id=self.upload_id, number=number, body=body
        )

    def copy_part(self, number: int, source: CopySourceTypeDef, **conditions: str) -> CopyPartResultTypeDef:
        """UploadPartCopy of `source` (a `Bucket`, `Key` mapping) into part `number`: one try, the
        callers decide what a refusal means."""
        response = self.s3.upload_part_copy(
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            PartNumber=number,
            CopySource=source,
            **conditions,  # type: ignore[arg-type]
        )
        return response["CopyPartResult"]

    @property
    def parts(self) -> list[CompletedPartTypeDef]:
        """The parts recorded so far (those uploaded apart from the stream, until `write` returns)."""
        return list(self._parts)

    def add_parts(self, parts: Iterable[CompletedPartTypeDef], *, apart_bytes: int = 0) -> None:
        """Parts uploaded apart from the stream, under numbers reserved from the ledger."""
        self._parts.extend(parts)
        self.apart_bytes += apart_bytes

    def write(
        self,
        chunks: Iterable[bytes],
        *,
        part_size: int,
        concurrency: int,
        abandoned: Callable[[], bool] = _never,
    ) -> None:
        """Upload `chunks` as the stream's parts. At most `concurrency` parts are in flight and one more
        is being filled, which bounds memory at (concurrency + 1) x part_size whatever the size."""
        parts = parts_of(chunks, part_size, abandoned, self.ledger)
        self._parts.extend(upload_parts(self, parts, concurrency=concurrency))

    def complete(self, *, confirm: Callable[[], None] = _nothing) -> UploadedObject:
        """Complete the upload with every part. `confirm` runs right before, the one step that cannot be
        undone: if it raises, the upload is aborted instead."""
        parts = sorted(self._parts, key=lambda part: part["PartNumber"])
        confirm()
        _complete(self, parts)
        self.completed = True
        return UploadedObject(
            bucket=self.bucket,
            key=self.key,
            size=self.ledger.position,
            parts=len(parts),
            apart_bytes=self.apart_bytes,
        )

    def abort(self) -> None:
        try:
            _abort(self.s3, bucket=self.bucket, key=self.key, upload_id=self.upload_id)
        except Exception as exc:
            # A bucket lifecycle rule (AbortIncompleteMultipartUpload) is the safety net for this.
            log.error("upload.abort_failed", key=self.key, upload_id=self.upload_id, error=repr(exc))


def upload_stream(
    s3: S3Client,
    chunks: Iterable[bytes],
    *,
    bucket: str,
    key: str,
    part_size: int,
    concurrency: int,
    metadata: dict[str, str],
    content_disposition: str | None = None,
    abandoned: Callable[[], bool] = _never,
) -> UploadedObject:
    """Upload `chunks` as one object, streamed only: completed, or aborted on any failure."""
    with MultipartUpload.create(
        s3, bucket=bucket, key=key, metadata=metadata, content_disposition=content_disposition
    ) as upload:
        upload.write(chunks, part_size=part_size, concurrency=concurrency, abandoned=abandoned)
        return upload.complete()


def _complete(upload: MultipartUpload, parts: list[CompletedPartTypeDef]) -> None:
    """When the answer to a Complete that worked is lost, botocore's retry finds the upload gone
    (NoSuchUpload on S3): the object itself says it is done."""
    s3 = upload.s3
    try:
        retry_transient(s3.complete_multipart_upload)(
            Bucket=upload.bucket, Key=upload.key, UploadId=upload.upload_id, MultipartUpload={"Parts": parts}
        )
    except Exception:
        try:
            head = s3.head_object(Bucket=upload.bucket, Key=upload.key)
        except Exception:
            head = None
        size_matches = head is not None and head["ContentLength"] == upload.ledger.position
        if not (size_matches and head is not None and head.get("Metadata") == upload.metadata):
            raise
        log.warning("upload.complete_answer_lost", key=upload.key)


def upload_threads(concurrency: int) -> int:
    return concurrency


PartSender = Callable[[int, "bytes | bytearray"], "CompletedPartTypeDef | None"]


def upload_parts(
    upload: MultipartUpload,
    numbered_parts: Iterator[tuple[int, bytes | bytearray]],
    *,
    concurrency: int,
    send: PartSender | None = None,
) -> list[CompletedPartTypeDef]:
    """Upload the parts, `concurrency` at a time; `send` may put a part elsewhere (a fan-out segment
    keeps its first part apart), returning None for a part that is not one of the upload's."""
    send = send or upload.upload_part

    # A buffer slot is taken before a part starts filling and given back when its upload is done, so
    # at most `concurrency` parts are uploading and one is filling: (concurrency + 1) x part_size.
    slots = threading.BoundedSemaphore(concurrency + 1)
    in_flight: set[Future[CompletedPartTypeDef | None]] = set()
    done: list[Future[CompletedPartTypeDef | None]] = []
    with ThreadPoolExecutor(max_workers=upload_threads(concurrency), thread_name_prefix="part") as pool:
        try:
            while True:
                slots.acquire()
                numbered = next(numbered_parts, None)
                if numbered is None:
                    slots.release()
                    break
                number, body = numbered
                if number > MAX_PARTS:
                    raise PermanentError("too_large", f"the archive needs more than {MAX_PARTS} parts")
                future = pool.submit(send, number, body)
                future.add_done_callback(lambda _: slots.release())
                in_flight.add(future)
                del body, numbered
                finished = {f for f in in_flight if f.done()}
                for f in finished:
                    f.result()  # raises the first failed part's error now, not after the whole stream
                done.extend(finished)
                in_flight -= finished
            finished_all, _ = wait(in_flight, return_when=FIRST_EXCEPTION)
            for f in finished_all:
                f.result()
            done.extend(in_flight)
        finally:
            for f in in_flight:
                f.cancel()
    return [part for part in (f.result() for f in done) if part is not None]
