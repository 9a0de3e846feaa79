"""Byte chunks -> parts -> an S3 multipart upload that either completes or is aborted.

The archive appears whole or not at all: S3 shows nothing until CompleteMultipartUpload, and any failure
(including an abandoned job) aborts the upload so no parts linger and cost money.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import botocore.exceptions
import structlog

from archiver import checksums
from archiver.aws import error_code, http_status, retry_transient
from archiver.errors import PermanentError, TransientError
from archiver.parts import GROW_FROM, PartLedger, PartSizes, parts_of, upload_parts
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
    # The object's FULL_OBJECT checksum (base64, as S3 writes it) and its algorithm (ARCHIVE_CHECKSUM);
    # None when it is not known. S3 verified it at completion, unless `s3_verified` is False (a fan-out's,
    # joined from its segments' after an upload without part checksums).
    checksum: str | None = None
    checksum_algorithm: checksums.AlgorithmName | None = None
    s3_verified: bool = True


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
    algorithm: checksums.Algorithm = checksums.CRC32,
    value: int | None = None,
) -> CompletedPartTypeDef:
    """`value`: the part's checksum in `algorithm`, if the caller has it already."""
    # botocore sends any bytes-like body as it is; its stubs only name bytes, and a bytes() copy of a
    # 16 MiB part is what parts_of avoids.
    payload = cast(bytes, body)
    # The part's checksum computed here (isal's CRC-32 runs at 4x the zlib.crc32 botocore would run),
    # sent on every part so S3 checks it in transit, even on an upload created without one.
    value = algorithm.of(payload) if value is None else value
    extra: dict[str, str] = {"ChecksumAlgorithm": algorithm.name} if checksummed else {}
    extra[algorithm.field] = algorithm.encode(value)
    response = s3.upload_part(
        Bucket=bucket,
        Key=key,
        UploadId=upload_id,
        PartNumber=number,
        Body=payload,
        **extra,  # type: ignore[arg-type]
    )
    return completed_part(number, response, checksummed=checksummed, field=algorithm.field)


def completed_part(
    number: int, answer: Mapping[str, Any], *, checksummed: bool, field: str = checksums.CRC32.field
) -> CompletedPartTypeDef:
    """A part as CompleteMultipartUpload lists it, from the answer to its UploadPart or UploadPartCopy:
    its checksum (`field`, the upload's algorithm's) only on an upload created with part checksums. Every
    part is sent with one and S3 may answer with it, but a completion that lists one for an upload
    without them is refused (InvalidPart)."""
    part: CompletedPartTypeDef = {"PartNumber": number, "ETag": answer["ETag"]}
    if checksummed and field in answer:
        part[field] = answer[field]  # type: ignore[literal-required]  # one of the Checksum* keys
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
        algorithm: checksums.Algorithm = checksums.CRC32,
    ):
        self.s3, self.bucket, self.key, self.upload_id = s3, bucket, key, upload_id
        self.metadata = metadata
        # Created with a full-object checksum in `algorithm` (`start`): every part carries its checksum,
        # the numbers run 1, 2, 3... without gaps (S3 refuses the completion otherwise), and S3 checks
        # the object's.
        self.checksummed, self.algorithm = checksummed, algorithm
        self.ledger = PartLedger()
        self._parts: list[CompletedPartTypeDef] = []
        # Each part's checksum in `algorithm` (None: the server did not say) and length, by number: the
        # object's, joined from them, is what a completion hands S3 for any algorithm but CRC-32.
        self._sums: dict[int, tuple[int | None, int]] = {}
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
        algorithm: checksums.Algorithm = checksums.CRC32,
    ) -> MultipartUpload:
        """A new upload, which its caller must complete or abort (`create` does that for it).
        `checksummed`: a FULL_OBJECT upload in `algorithm`, whose part numbers must then be consecutive;
        a fan-out upload, whose segments leave unused numbers between them, is created without one."""
        extra: dict[str, str] = {"ContentDisposition": content_disposition} if content_disposition else {}
        if checksummed:
            extra |= {"ChecksumAlgorithm": algorithm.name, "ChecksumType": "FULL_OBJECT"}
        upload_id = retry_transient(s3.create_multipart_upload)(
            Bucket=bucket,
            Key=key,
            ContentType="application/zip",
            Metadata=metadata,
            **extra,  # type: ignore[arg-type]
        )["UploadId"]
        return cls(
            s3,
            bucket=bucket,
            key=key,
            upload_id=upload_id,
            metadata=metadata,
            checksummed=checksummed,
            algorithm=algorithm,
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
        algorithm: checksums.Algorithm = checksums.CRC32,
    ) -> Iterator[MultipartUpload]:
        upload = cls.start(
            s3,
            bucket=bucket,
            key=key,
            metadata=metadata,
            content_disposition=content_disposition,
            algorithm=algorithm,
        )
        try:
            yield upload
        finally:
            if not upload.completed:
                upload.abort()

    def upload_part(self, number: int, body: bytes | bytearray) -> CompletedPartTypeDef:
        value = self.algorithm.of(body)
        part = upload_part(
            self.s3,
            bucket=self.bucket,
            key=self.key,
            upload_id=self.upload_id,
            number=number,
            body=body,
            checksummed=self.checksummed,
            algorithm=self.algorithm,
            value=value,
        )
        self._sums[number] = (value, len(body))
        return part

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

    def add_parts(
        self, parts: Iterable[CompletedPartTypeDef], *, apart_bytes: int = 0, lengths: Iterable[int] = ()
    ) -> None:
        """Parts uploaded apart from the stream, under numbers reserved from the ledger; `lengths`, where
        given, are theirs, so their checksums (as the server answered them) join the object's."""
        parts = list(parts)
        self._parts.extend(parts)
        self.apart_bytes += apart_bytes
        for part, length in zip(parts, lengths, strict=False):
            self._sums[part["PartNumber"]] = (self.algorithm.decode(part.get(self.algorithm.field)), length)

    def _checksum(self, parts: list[CompletedPartTypeDef], crc32: int | None) -> int | None:
        """The object's checksum for S3 to verify: none without one at creation; for CRC-32, the stream's
        (whose stand-ins count copied ranges unread); else joined from every part's, if all are known."""
        if not self.checksummed:
            return None
        if self.algorithm is checksums.CRC32:
            return crc32
        pieces = [self._sums.get(part["PartNumber"], (None, 0)) for part in parts]
        if any(value is None for value, _ in pieces):
            return None
        return self.algorithm.joined((value or 0, length) for value, length in pieces)

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
        undone: if it raises, the upload is aborted instead. The object's checksum (`crc32`, as the stream
        that made it computed it, or one joined from the parts': `_checksum`) is handed to S3 on a
        checksummed upload, which then refuses to complete an object whose bytes have another."""
        parts = sorted(self._parts, key=lambda part: part["PartNumber"])
        checksum = self._checksum(parts, crc32)
        confirm()
        _complete(self, parts, checksum)
        self.completed = True
        return UploadedObject(
            bucket=self.bucket,
            key=self.key,
            size=self.ledger.position,
            parts=len(parts),
            apart_bytes=self.apart_bytes,
            crc32=crc32,
            checksum=None if checksum is None else self.algorithm.encode(checksum),
            checksum_algorithm=None if checksum is None else self.algorithm.name,
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
    algorithm: checksums.Algorithm = checksums.CRC32,
) -> UploadedObject:
    """Upload `chunks` as one object, streamed only: completed, or aborted on any failure."""
    stream = checksums.Running(checksums.CRC32)
    with MultipartUpload.create(
        s3,
        bucket=bucket,
        key=key,
        metadata=metadata,
        content_disposition=content_disposition,
        algorithm=algorithm,
    ) as upload:
        upload.write(stream.over(chunks), part_size=part_size, concurrency=concurrency, abandoned=abandoned)
        return upload.complete(crc32=stream.value)


def _complete(upload: MultipartUpload, parts: list[CompletedPartTypeDef], checksum: int | None) -> None:
    """When the answer to a Complete that worked is lost, botocore's retry finds the upload gone
    (NoSuchUpload on S3): the object itself says it is done. S3 refusing the object's checksum (its
    bytes changed on the way) fails the attempt, to be tried again."""
    s3 = upload.s3
    checks: dict[str, Any] = {"MpuObjectSize": upload.ledger.position}
    if upload.checksummed:
        checks["ChecksumType"] = "FULL_OBJECT"
    if checksum is not None:
        checks[upload.algorithm.field] = upload.algorithm.encode(checksum)
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
