"""Byte chunks -> parts -> an S3 multipart upload that either completes or is aborted.

The archive appears whole or not at all: S3 shows nothing until CompleteMultipartUpload, and any failure
(including an abandoned job) aborts the upload so no parts linger and cost money.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import botocore.exceptions
import structlog

from archiver import crc
from archiver.aws import error_code, http_status, retry_transient
from archiver.errors import PermanentError, TransientError
from archiver.parts import GROW_FROM, PartLedger, PartSizes, parts_of
from archiver.settings import MAX_PART_SIZE, MAX_PARTS, MiB

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


@retry_transient
def upload_part(
    s3: S3Client,
    *,
    bucket: str,
    key: str,
    upload_id: str,
    number: int,
    body: bytes | bytearray,
    checksummed: bool = True,
) -> CompletedPartTypeDef:
    # botocore sends any bytes-like body as it is; its stubs only name bytes, and a bytes() copy of a
    # 16 MiB part is what parts_of avoids.
    payload = cast(bytes, body)
    # The part's CRC-32 computed here with isal, at 4x the zlib.crc32 botocore would otherwise run.
    extra = {"ChecksumAlgorithm": "CRC32"} if checksummed else {}
    extra["ChecksumCRC32"] = crc.to_base64(crc.of([payload]))
    response = s3.upload_part(
        Bucket=bucket,
        Key=key,
        UploadId=upload_id,
        PartNumber=number,
        Body=payload,
        **extra,  # type: ignore[arg-type]
    )
    return completed_part(number, response, checksummed=checksummed)


def completed_part(number: int, answer: Mapping[str, Any], *, checksummed: bool) -> CompletedPartTypeDef:
    """A part as CompleteMultipartUpload lists it, from the answer to its UploadPart or UploadPartCopy:
    its CRC-32 only on an upload created with part checksums. botocore sends a CRC-32 of every part
    anyway and S3 may answer with it, but a completion that lists one for an upload without them is
    refused (InvalidPart)."""
    part: CompletedPartTypeDef = {"PartNumber": number, "ETag": answer["ETag"]}
    if checksummed and "ChecksumCRC32" in answer:
        part["ChecksumCRC32"] = answer["ChecksumCRC32"]
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

    def __init__(
        self,
        s3: S3Client,
        *,
        bucket: str,
        key: str,
        upload_id: str,
        metadata: dict[str, str],
        checksummed: bool = False,
    ):
        self.s3, self.bucket, self.key, self.upload_id = s3, bucket, key, upload_id
        self.metadata = metadata
        # Created with a full-object CRC-32 (`start`): every part carries its checksum, the numbers run
        # 1, 2, 3... without gaps (S3 refuses the completion otherwise), and S3 checks the object's CRC.
        self.checksummed = checksummed
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
        checksummed: bool = True,
    ) -> MultipartUpload:
        """A new upload, which its caller must complete or abort (`create` does that for it).
        `checksummed`: a FULL_OBJECT CRC-32 upload, whose part numbers must then be consecutive; a fan-out
        upload, whose segments leave unused numbers between them, is created without one."""
        extra: dict[str, str] = {"ContentDisposition": content_disposition} if content_disposition else {}
        if checksummed:
            extra |= {"ChecksumAlgorithm": "CRC32", "ChecksumType": "FULL_OBJECT"}
        upload_id = retry_transient(s3.create_multipart_upload)(
            Bucket=bucket,
            Key=key,
            ContentType="application/zip",
            Metadata=metadata,
            **extra,  # type: ignore[arg-type]
        )["UploadId"]
        return cls(
            s3, bucket=bucket, key=key, upload_id=upload_id, metadata=metadata, checksummed=checksummed
        )

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
            self.s3,
            bucket=self.bucket,
            key=self.key,
            upload_id=self.upload_id,
            number=number,
            body=body,
            checksummed=self.checksummed,
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
        grow_from: int = GROW_FROM,
    ) -> None:
        """Upload `chunks` as the stream's parts. At most `concurrency` parts are in flight and one more
        is being filled, which bounds memory at (concurrency + 1) x part_size whatever the size; past
        its first GiB, parts grow and fewer are in flight, in the same memory (parts.PartSizes)."""
        sizes = PartSizes(part_size, concurrency, grow_from)
        parts = parts_of(chunks, part_size, abandoned, self.ledger, sizes=sizes)
        self._parts.extend(upload_parts(self, parts, concurrency=concurrency, sizes=sizes))

    def complete(self, *, confirm: Callable[[], None] = _nothing, crc32: int | None = None) -> UploadedObject:
        """Complete the upload with every part. `confirm` runs right before, the one step that cannot be
        undone: if it raises, the upload is aborted instead. `crc32`, the object's CRC-32 as the stream
        that made it computed it, is handed to S3 on a checksummed upload, which then refuses to complete
        an object whose bytes have another."""
        parts = sorted(self._parts, key=lambda part: part["PartNumber"])
        confirm()
        _complete(self, parts, crc32 if self.checksummed else None)
        self.completed = True
        return UploadedObject(
            bucket=self.bucket,
            key=self.key,
            size=self.ledger.position,
            parts=len(parts),
            apart_bytes=self.apart_bytes,
            crc32=crc32,
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
    stream = crc.Running()
    with MultipartUpload.create(
        s3, bucket=bucket, key=key, metadata=metadata, content_disposition=content_disposition
    ) as upload:
        upload.write(stream.over(chunks), part_size=part_size, concurrency=concurrency, abandoned=abandoned)
        return upload.complete(crc32=stream.value)


def _complete(upload: MultipartUpload, parts: list[CompletedPartTypeDef], crc32: int | None) -> None:
    """When the answer to a Complete that worked is lost, botocore's retry finds the upload gone
    (NoSuchUpload on S3): the object itself says it is done. S3 refusing the object's CRC-32 (its
    bytes changed on the way) fails the attempt, to be tried again."""
    s3 = upload.s3
    checks: dict[str, Any] = {"MpuObjectSize": upload.ledger.position}
    if upload.checksummed:
        checks["ChecksumType"] = "FULL_OBJECT"
    if crc32 is not None:
        checks["ChecksumCRC32"] = crc.to_base64(crc32)
    try:
        retry_transient(s3.complete_multipart_upload)(
            Bucket=upload.bucket,
            Key=upload.key,
            UploadId=upload.upload_id,
            MultipartUpload={"Parts": parts},
            **checks,
        )
    except botocore.exceptions.ClientError as exc:
        if error_code(exc) in CHECKSUM_REFUSALS:
            raise TransientError(f"S3 refused the archive's checksum: {exc}") from exc
        _raise_unless_completed(upload, exc)
    except Exception as exc:
        _raise_unless_completed(upload, exc)


# What S3 answers a completion whose full-object checksum or size is not its parts'.
CHECKSUM_REFUSALS = frozenset({"BadDigest", "InvalidDigest"})


def _raise_unless_completed(upload: MultipartUpload, error: Exception) -> None:
    try:
        head = upload.s3.head_object(Bucket=upload.bucket, Key=upload.key)
    except Exception:
        head = None
    size_matches = head is not None and head["ContentLength"] == upload.ledger.position
    if not (size_matches and head is not None and head.get("Metadata") == upload.metadata):
        raise error
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
    sizes: PartSizes | None = None,
) -> list[CompletedPartTypeDef]:
    """Upload the parts, `concurrency` at a time; `send` may put a part elsewhere (a fan-out segment
    keeps its first part apart), returning None for a part that is not one of the upload's. `sizes`
    says how big the next part is (parts_of's own), else every part counts as one of concurrency + 1."""
    send = send or upload.upload_part

    # Room for a part is taken before it starts filling and given back when its upload is done, so the
    # parts uploading and the one filling hold at most (concurrency + 1) x part_size, and at most
    # `concurrency` upload at once whatever their size.
    room = _Room(sizes.budget if sizes else concurrency + 1)
    in_flight: set[Future[CompletedPartTypeDef | None]] = set()
    done: list[Future[CompletedPartTypeDef | None]] = []
    with ThreadPoolExecutor(max_workers=upload_threads(concurrency), thread_name_prefix="part") as pool:
        try:
            while True:
                taken = room.take(sizes.at(upload.ledger.position) if sizes else 1)
                numbered = next(numbered_parts, None)
                if numbered is None:
                    room.give(taken)
                    break
                number, body = numbered
                if number > MAX_PARTS:
                    raise PermanentError("too_large", f"the archive needs more than {MAX_PARTS} parts")
                future = pool.submit(send, number, body)
                room.give_when_done(future, taken)
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


class _Room:
    """Units of memory for parts (bytes, or one per part), taken before a part fills, given back once it
    is uploaded. A taker asking for more than all of it waits until all of it is free, then takes it."""

    def __init__(self, total: int) -> None:
        self._total, self._free = total, total
        self._changed = threading.Condition()

    def take(self, amount: int) -> int:
        amount = min(amount, self._total)
        with self._changed:
            self._changed.wait_for(lambda: self._free >= amount)
            self._free -= amount
        return amount

    def give_when_done(self, future: Future[Any], amount: int) -> None:
        future.add_done_callback(lambda _: self.give(amount))

    def give(self, amount: int) -> None:
        with self._changed:
            self._free += amount
            self._changed.notify_all()
