"""Byte chunks -> parts -> an S3 multipart upload that either completes or is aborted.

The archive appears whole or not at all: S3 shows nothing until CompleteMultipartUpload, and any failure
(including a cancelled job) aborts the upload so no parts linger and cost money.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import structlog

from archiver.assembly import Layout, UploadTarget
from archiver.aws import retry_transient
from archiver.errors import JobAbandoned, PermanentError
from archiver.settings import MAX_PART_SIZE, MAX_PARTS, MIN_PART_SIZE, MiB

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class UploadedObject:
    bucket: str
    key: str
    size: int
    parts: int
    etag: str
    copied_bytes: int = 0  # bytes S3 copied server-side, which never passed through the worker


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


def parts_of(
    chunks: Iterable[bytes], part_size: int, cancelled: Callable[[], bool], layout: Layout
) -> Iterator[tuple[int, bytes | bytearray]]:
    """Regroup chunks into numbered parts of `part_size` bytes (the last one shorter), leaving out the
    ranges S3 copies (`layout.holes`). Each part is filled in place and handed over as it is: joining and
    slicing would hold every part twice. A part that ends where a copy starts is cut there: it holds the
    copied object's head, so it is at least 5 MiB, and at most part_size + 5 MiB."""
    part = bytearray(part_size)
    filled = 0
    emitted = False
    for chunk in chunks:
        if cancelled():
            raise JobAbandoned("the job was stopped before its archive was complete")
        data = memoryview(chunk)
        while data:
            hole = layout.holes[0] if layout.holes else None
            if hole is not None and layout.position >= hole.start:
                skip = min(len(data), hole.end - layout.position)
                data = data[skip:]
                layout.position += skip
                if layout.position == hole.end:
                    layout.passed(hole)
                continue
            end = part_size
            if hole is not None and hole.start - (layout.position - filled) < part_size + MIN_PART_SIZE:
                end = hole.start - (layout.position - filled)
            take = min(len(data), end - filled)
            part[filled : filled + take] = data[:take]
            filled += take
            layout.position += take
            data = data[take:]
            if filled == end:
                del part[filled:]  # a part cut short where a copy starts
                yield layout.number_streamed(), part
                emitted = True
                part, filled = bytearray(part_size), 0
    if filled or not emitted:
        yield layout.number_streamed(), bytes(part[:filled])


@retry_transient
def _upload_part(
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
    s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)


def _never() -> bool:
    return False


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
    cancelled: Callable[[], bool] = _never,
    layout: Layout | None = None,
    confirm: Callable[[], None] = lambda: None,
) -> UploadedObject:
    """Upload `chunks` as one object. At most `concurrency` parts are in flight and one more is being
    filled, which bounds memory at (concurrency + 1) x part_size whatever the archive's size. With a
    `layout`, ranges that S3 copies server-side (archiver.assembly) are left out of the streamed parts.
    `confirm` runs right before the upload is completed, the one step that cannot be undone: if it
    raises, the upload is aborted instead."""
    layout = layout if layout is not None else Layout()
    extra = {"ContentDisposition": content_disposition} if content_disposition else {}
    upload_id = retry_transient(s3.create_multipart_upload)(
        Bucket=bucket,
        Key=key,
        ContentType="application/zip",
        Metadata=metadata,
        ChecksumAlgorithm="CRC32",
        **extra,  # type: ignore[arg-type]
    )["UploadId"]
    layout.upload = UploadTarget(bucket=bucket, key=key, upload_id=upload_id)
    try:
        streamed = _upload_parts(
            s3,
            parts_of(chunks, part_size, cancelled, layout),
            target=layout.upload,
            concurrency=concurrency,
        )
        parts = sorted([*streamed, *layout.copied_parts], key=lambda part: part["PartNumber"])
        confirm()
        etag = _complete(
            s3,
            bucket=bucket,
            key=key,
            upload_id=upload_id,
            parts=parts,
            size=layout.position,
            metadata=metadata,
        )
    except BaseException:
        try:
            _abort(s3, bucket=bucket, key=key, upload_id=upload_id)
        except Exception:
            # A bucket lifecycle rule (AbortIncompleteMultipartUpload) is the safety net for this.
            log.exception("upload.abort_failed", key=key, upload_id=upload_id)
        raise
    return UploadedObject(
        bucket=bucket,
        key=key,
        size=layout.position,
        parts=len(parts),
        etag=etag,
        copied_bytes=layout.copied_bytes,
    )


def _complete(
    s3: S3Client,
    *,
    bucket: str,
    key: str,
    upload_id: str,
    parts: list[CompletedPartTypeDef],
    size: int,
    metadata: dict[str, str],
) -> str:
    """Complete the upload; returns the object's ETag. When the answer to a Complete that worked is lost,
    botocore's retry finds the upload gone (NoSuchUpload on S3): the object itself says it is done."""
    try:
        return retry_transient(s3.complete_multipart_upload)(
            Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
        ).get("ETag", "")
    except Exception:
        try:
            head = s3.head_object(Bucket=bucket, Key=key)
        except Exception:
            head = None
        if head is not None and head["ContentLength"] == size and head.get("Metadata") == metadata:
            log.warning("upload.complete_answer_lost", key=key)
            return head["ETag"]
        raise


def _upload_parts(
    s3: S3Client,
    numbered_parts: Iterator[tuple[int, bytes | bytearray]],
    *,
    target: UploadTarget,
    concurrency: int,
) -> list[CompletedPartTypeDef]:
    # A buffer slot is taken before a part starts filling and given back when its upload is done, so
    # at most `concurrency` parts are uploading and one is filling: (concurrency + 1) x part_size.
    slots = threading.BoundedSemaphore(concurrency + 1)
    in_flight: set[Future[CompletedPartTypeDef]] = set()
    done: list[Future[CompletedPartTypeDef]] = []
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="part") as pool:
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
                future = pool.submit(
                    _upload_part,
                    s3,
                    bucket=target.bucket,
                    key=target.key,
                    upload_id=target.upload_id,
                    number=number,
                    body=body,
                )
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
    return [f.result() for f in done]
