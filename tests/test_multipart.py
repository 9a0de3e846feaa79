"""The multipart sink: parts sized within S3's limits, and an upload that completes or leaves nothing."""

from __future__ import annotations

import os
import random
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archiver import checksums
from archiver.assembly import LEAD_BYTES
from archiver.crc import to_base64
from archiver.errors import JobAbandoned, PermanentError, TransientError
from archiver.multipart import MAX_PARTS, MultipartUpload, choose_part_size, upload_part, upload_stream
from archiver.parts import RESERVE_GAP, Hole, PartLedger, PartSizes, parts_of
from archiver.settings import MIN_PART_SIZE, MiB
from tests.conftest import Stack


def test_part_size_grows_to_stay_under_10000_parts() -> None:
    """16 MiB parts cap an archive near 156 GiB; bigger archives get bigger (whole-MiB) parts."""
    assert choose_part_size(1024, 16 * MiB) == 16 * MiB
    big = 1024 * 1024 * MiB  # 1 TiB
    size = choose_part_size(big, 16 * MiB)
    assert size % MiB == 0 and size * MAX_PARTS >= big and size > 16 * MiB
    with pytest.raises(PermanentError):
        choose_part_size(60 * 1024**4, 16 * MiB)  # more than 5 GiB x 10,000 parts


def test_parts_are_exactly_part_size_except_the_last() -> None:
    """Chunks of any size regroup into equal parts; nothing is lost or reordered."""
    chunks = [os.urandom(n) for n in (10, 7000, 3, 65536, 1, 40000)]
    numbered = list(parts_of(iter(chunks), 4096, lambda: False, PartLedger()))
    assert [number for number, _ in numbered] == list(range(1, len(numbered) + 1))
    parts = [body for _, body in numbered]
    assert b"".join(parts) == b"".join(chunks)
    assert all(len(p) == 4096 for p in parts[:-1]) and 0 < len(parts[-1]) <= 4096


def test_parts_grow_past_the_first_gib_in_the_same_memory() -> None:
    """8 MiB parts, 4 in flight: 40 MiB. Past the first GiB, 13 MiB parts, 2 in flight and one filling
    (39 MiB); a part size that leaves no room for growth stays as it is."""
    sizes = PartSizes(8 * MiB, 4)
    assert sizes.grow_from == 1024 * MiB and sizes.budget == 40 * MiB
    assert sizes.at(0) == sizes.at(1024 * MiB - 1) == 8 * MiB
    assert sizes.at(1024 * MiB) == sizes.at(50 * 1024 * MiB) == 13 * MiB
    assert PartSizes(8 * MiB, 1).at(2048 * MiB) == 8 * MiB  # 16 MiB: three would not fit
    assert PartSizes(4096 * MiB, 4).at(2 << 40) == 5 * 1024 * MiB  # S3's largest part


def test_parts_are_sized_for_where_they_start() -> None:
    """Parts of `base` while they start before grow_from, grown after; every byte there, in order."""
    sizes = PartSizes(3 * MiB, 4, grow_from=7 * MiB)  # 15 MiB: grown parts of 5 MiB
    data = os.urandom(40 * MiB + 5)
    numbered = list(parts_of(split(data, 70000), 3 * MiB, lambda: False, PartLedger(), sizes=sizes))
    assert [len(body) for _, body in numbered] == [3 * MiB] * 3 + [5 * MiB] * 6 + [MiB + 5]
    assert [number for number, _ in numbered] == list(range(1, 11))
    assert b"".join(bytes(body) for _, body in numbered) == data


def test_a_copied_range_is_left_out_and_the_part_before_it_holds_the_head() -> None:
    """The part ending where a copy starts is cut there, even past part_size, so it holds the whole 5 MiB
    head and is never under S3's minimum; the copy's numbers are skipped; the stand-ins are dropped."""
    layout = PartLedger()
    prefix, head, tail = os.urandom(6 * MiB), os.urandom(LEAD_BYTES), os.urandom(MiB + 7)
    copied = 20 * MiB

    def stream() -> Iterator[bytes]:
        yield from split(prefix)
        first = layout.reserve(3)
        start = layout.position + LEAD_BYTES
        layout.add_hole(Hole(start=start, end=start + copied, first=first, last=first + 2))
        yield from split(head)
        yield from split(bytes(copied))
        yield from split(tail)

    numbered = [(number, bytes(body)) for number, body in parts_of(stream(), 8 * MiB, lambda: False, layout)]
    assert numbered[0] == (1, prefix + head)
    assert numbered[1:] == [(1 + RESERVE_GAP + 3, tail)]
    assert layout.position == len(prefix) + len(head) + copied + len(tail)
    assert not layout.holes


def test_upload_completes_with_parts_in_order(stack: Stack) -> None:
    """Bytes uploaded concurrently in 5 MiB parts come back identical and whole."""
    body = os.urandom(5 * MiB * 3 + 12345)
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
    result = upload_stream(
        stack.clients.s3,
        chunks,
        bucket=stack.destination_bucket,
        key="whole.zip",
        part_size=5 * MiB,
        concurrency=3,
        metadata={"request-id": "r"},
    )
    assert result.parts == 4 and result.size == len(body)
    assert stack.download("whole.zip") == body
    assert stack.incomplete_uploads() == []


def test_an_upload_past_grow_from_completes_with_bigger_parts(stack: Stack) -> None:
    """Parts grow where PartSizes says, S3 takes each with its CRC-32 computed by us, and the object
    completes whole, its full-object CRC-32 verified by the server."""
    body = os.urandom(40 * MiB + 5)
    s3 = stack.clients.s3
    with MultipartUpload.create(s3, bucket=stack.destination_bucket, key="grown.zip", metadata={}) as upload:
        upload.write(split(body), part_size=5 * MiB, concurrency=4, grow_from=10 * MiB)  # then 8 MiB
        listed = s3.list_parts(Bucket=upload.bucket, Key=upload.key, UploadId=upload.upload_id)["Parts"]
        recorded = sorted(upload.parts, key=lambda part: part["PartNumber"])
        uploaded = upload.complete(crc32=zlib.crc32(body))
    sizes = [5 * MiB] * 2 + [8 * MiB] * 3 + [6 * MiB + 5]
    assert [part["Size"] for part in listed] == sizes
    starts = [sum(sizes[:index]) for index in range(len(sizes))]
    for part, start, size in zip(recorded, starts, sizes, strict=True):
        assert part.get("ChecksumCRC32") == to_base64(zlib.crc32(body[start : start + size]))
    assert uploaded.parts == 6 and uploaded.size == len(body)
    assert stack.download("grown.zip") == body
    assert stack.incomplete_uploads() == []


def failing_after(nbytes: int) -> Iterator[bytes]:
    yield os.urandom(nbytes)
    raise ConnectionResetError("the source broke off")


def test_failure_part_way_aborts_the_upload(stack: Stack) -> None:
    """A stream that fails after parts were uploaded leaves no object and no incomplete upload."""
    with pytest.raises(ConnectionResetError):
        upload_stream(
            stack.clients.s3,
            failing_after(11 * MiB),
            bucket=stack.destination_bucket,
            key="broken.zip",
            part_size=5 * MiB,
            concurrency=2,
            metadata={},
        )
    assert stack.archive_keys() == []
    assert stack.incomplete_uploads() == []


def test_cancelled_job_aborts_the_upload(stack: Stack) -> None:
    """A job stopped from outside (shutdown, JOB_TIMEOUT) aborts its upload between chunks."""
    seen = []

    def chunks() -> Iterator[bytes]:
        for _ in range(200):
            seen.append(1)
            yield b"x" * 65536

    with pytest.raises(JobAbandoned):
        upload_stream(
            stack.clients.s3,
            chunks(),
            bucket=stack.destination_bucket,
            key="cancelled.zip",
            part_size=5 * MiB,
            concurrency=2,
            metadata={},
            abandoned=lambda: len(seen) > 100,
        )
    assert stack.archive_keys() == []
    assert stack.incomplete_uploads() == []


def test_a_complete_whose_answer_is_lost_counts_as_done(stack: Stack) -> None:
    """If every answer to CompleteMultipartUpload is lost although S3 did it, the object says it is done."""
    import botocore.exceptions

    from archiver.aws import make_clients

    s3 = make_clients().s3
    lost = []

    def lose_answer(**_: object) -> None:
        lost.append(1)
        raise botocore.exceptions.ConnectionClosedError(endpoint_url="lost after the server completed")

    s3.meta.events.register("after-call.s3.CompleteMultipartUpload", lose_answer)
    body = os.urandom(6 * MiB)
    result = upload_stream(
        s3,
        iter([body]),
        bucket=stack.destination_bucket,
        key="lost.zip",
        part_size=5 * MiB,
        concurrency=2,
        metadata={"request-id": "lost"},
    )
    assert lost, "the hook ran"
    assert result.size == len(body)
    assert stack.download("lost.zip") == body
    assert stack.incomplete_uploads() == []


@st.composite
def archive_layouts(draw: st.DrawFn) -> list[tuple[int, int, bool]]:
    """Runs of streamed bytes, each maybe followed by a copied entry: (streamed, copied) lengths, and
    whether the server refuses that copy (the entry is then streamed after its numbers were reserved)."""
    count = draw(st.integers(min_value=1, max_value=4))
    return [
        (
            draw(st.integers(min_value=30, max_value=12 * MiB)),
            draw(st.sampled_from([0, 0, 5 * MiB, 5 * MiB + 1, 40 * MiB + 17])),
            draw(st.booleans()),
        )
        for _ in range(count)
    ]


# What may reach the assembler after the copier reserved numbers and before the copied range starts:
# output stream-zip still holds back (a block), the entry's local header (a long name), and the lead.
AFTER_RESERVE = 64 * 1024 + 1100 + LEAD_BYTES


@settings(max_examples=30, deadline=None)
@given(
    layout_runs=archive_layouts(),
    part_size=st.sampled_from([5 * MiB, 8 * MiB, 6 * MiB + 3]),
    chunk=st.sampled_from([1000, 65536, 3 * MiB]),
    lag=st.sampled_from([0, 31, 64 * 1024]),
    tail=st.integers(min_value=0, max_value=6 * MiB),
    segment=st.booleans(),
    grow_from=st.sampled_from([None, 0, 12 * MiB]),
)
def test_parts_around_copies_obey_s3s_rules(
    layout_runs: list[tuple[int, int, bool]],
    part_size: int,
    chunk: int,
    lag: int,
    tail: int,
    segment: bool,
    grow_from: int | None,
) -> None:
    """Streamed parts around any copies, some refused after their numbers were reserved: the numbers of
    the parts completed, streamed and copied, run 1, 2, 3... without a gap (what S3 requires of an upload
    with part checksums), every part but the last is between 5 MiB and part size + what may follow a
    reservation, and the streamed bytes are all there in order, the copied ones not. The same for a
    fan-out segment's stream (a small first part, a short last part joined to the one before), and
    for parts that grow past `grow_from` bytes of the archive."""
    layout = PartLedger()
    rng = random.Random(len(layout_runs) + part_size + chunk + tail + lag)
    streamed_bytes: list[bytes] = []
    copied_numbers: list[int] = []

    def literal(length: int) -> Iterator[bytes]:
        data = rng.randbytes(length)
        streamed_bytes.append(data)
        return split(data, chunk)

    def stream() -> Iterator[bytes]:
        held: list[bytes] = []  # the end of a copy's stand-ins, which stream-zip may hold back
        for streamed, copied, refused in layout_runs:
            if not copied:
                yield from held
                held = []
                yield from literal(streamed)
                continue
            run = rng.randbytes(streamed)
            streamed_bytes.append(run)
            # The copier reserves while stream-zip prepares the local header, the last `lag` bytes
            # before it (or the previous copy's end) not yet passed on.
            if len(run) <= lag:
                first = layout.reserve(2)
                yield from held
                yield from split(run, chunk)
            else:
                yield from held
                yield from split(run[:-lag] if lag else run, chunk)
                first = layout.reserve(2)
                yield from split(run[-lag:] if lag else b"", chunk)
            held = []
            yield from literal(rng.randrange(30, 1100))  # the local header
            if refused:
                layout.release()  # the copier gave up: the entry's bytes are streamed instead
                yield from literal(copied)
                continue
            start = layout.position + LEAD_BYTES
            layout.add_hole(Hole(start=start, end=start + copied, first=first, last=first + 1))
            copied_numbers.extend((first, first + 1))
            yield from literal(LEAD_BYTES)
            *stand_ins, last = split(bytes(copied), chunk)
            yield from stand_ins
            held = [last]
        yield from held
        yield from literal(tail)

    options: dict[str, Any] = {"join_short_last": True, "first_size": MIN_PART_SIZE} if segment else {}
    grown = None if grow_from is None else PartSizes(part_size, 4, grow_from)
    largest = part_size if grown is None else grown.at(grown.grow_from)
    numbered = [
        (number, bytes(body))
        for number, body in parts_of(stream(), part_size, lambda: False, layout, sizes=grown, **options)
    ]
    numbers = [number for number, _ in numbered]
    assert sorted(numbers + copied_numbers) == list(range(1, len(numbers) + len(copied_numbers) + 1))
    sizes = [len(body) for _, body in numbered]
    assert all(MIN_PART_SIZE <= size <= largest + AFTER_RESERVE for size in sizes[:-1])
    assert b"".join(body for _, body in numbered) == b"".join(streamed_bytes)
    copied_total = sum(copied for _, copied, refused in layout_runs if not refused)
    assert layout.position == len(b"".join(streamed_bytes)) + copied_total


def split(data: bytes, size: int = 65536) -> Iterator[bytes]:
    return (data[start : start + size] for start in range(0, len(data), size))


def test_the_embedded_stack_refuses_completions_as_s3_documents(stack: Stack) -> None:
    """moto completes what S3 refuses; archiver.motofixes makes it refuse it too, so that every archive the
    suite builds is checked as S3 would: gaps in the part numbers of an upload with part checksums
    (InvalidPartOrder; allowed without them), a full-object CRC-32 or CRC64NVME or object size not the
    parts'."""
    import botocore.exceptions

    s3, bucket = stack.clients.s3, stack.destination_bucket
    body = os.urandom(MIN_PART_SIZE)

    def complete(
        key: str,
        numbers: list[int],
        *,
        checksummed: bool,
        algorithm: checksums.Algorithm = checksums.CRC32,
        **checks: object,
    ) -> str:
        extra: dict[str, str] = (
            {"ChecksumAlgorithm": algorithm.name, "ChecksumType": "FULL_OBJECT"} if checksummed else {}
        )
        upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key, **extra)["UploadId"]  # type: ignore[arg-type]
        parts = [
            upload_part(
                s3,
                bucket=bucket,
                key=key,
                upload_id=upload_id,
                number=number,
                body=body,
                checksummed=checksummed,
                algorithm=algorithm,
            )
            for number in numbers
        ]
        try:
            s3.complete_multipart_upload(
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                **checks,  # type: ignore[arg-type]
            )
        except botocore.exceptions.ClientError as exc:
            s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            return str(exc.response["Error"]["Code"])
        return "completed"

    whole = zlib.crc32(body * 2)
    assert complete("gap.zip", [1, 3], checksummed=True) == "InvalidPartOrder"
    assert complete("late.zip", [2, 3], checksummed=True) == "InvalidPartOrder"
    assert complete("plain-gap.zip", [1, 3], checksummed=False) == "completed"
    right = {"ChecksumType": "FULL_OBJECT", "ChecksumCRC32": to_base64(whole)}
    assert complete("right.zip", [1, 2], checksummed=True, **right) == "completed"
    wrong = {"ChecksumType": "FULL_OBJECT", "ChecksumCRC32": to_base64(whole ^ 1)}
    assert complete("wrong.zip", [1, 2], checksummed=True, **wrong) == "BadDigest"
    assert complete("short.zip", [1, 2], checksummed=False, MpuObjectSize=len(body)) == "InvalidRequest"
    crc64 = checksums.CRC64NVME
    whole64 = crc64.of(body * 2)
    right64 = {"ChecksumType": "FULL_OBJECT", "ChecksumCRC64NVME": crc64.encode(whole64)}
    assert complete("right64.zip", [1, 2], checksummed=True, algorithm=crc64, **right64) == "completed"
    wrong64 = {"ChecksumType": "FULL_OBJECT", "ChecksumCRC64NVME": crc64.encode(whole64 ^ 1)}
    assert complete("wrong64.zip", [1, 2], checksummed=True, algorithm=crc64, **wrong64) == "BadDigest"
    assert complete("gap64.zip", [1, 3], checksummed=True, algorithm=crc64) == "InvalidPartOrder"
    assert stack.archive_keys() == ["plain-gap.zip", "right.zip", "right64.zip"]


def test_an_archive_s3_finds_a_different_crc_for_is_tried_again_and_leaves_nothing(stack: Stack) -> None:
    """The CRC-32 handed to S3 at completion is the stream's: if S3 finds the bytes it got have another
    (changed on the way), the attempt fails as a transient error (the request is tried again) and the
    upload is aborted."""
    body = os.urandom(6 * MiB)
    with MultipartUpload.create(
        stack.clients.s3, bucket=stack.destination_bucket, key="changed.zip", metadata={}
    ) as upload:
        upload.write(iter([body]), part_size=5 * MiB, concurrency=2)
        with pytest.raises(TransientError, match="checksum"):
            upload.complete(crc32=zlib.crc32(body) ^ 0x80)
    assert stack.archive_keys() == []
    assert stack.incomplete_uploads() == []
    result = upload_stream(
        stack.clients.s3,
        iter([body]),
        bucket=stack.destination_bucket,
        key="changed.zip",
        part_size=5 * MiB,
        concurrency=2,
        metadata={},
    )
    assert result.crc32 == zlib.crc32(body)
    head = stack.clients.s3.head_object(
        Bucket=stack.destination_bucket, Key="changed.zip", ChecksumMode="ENABLED"
    )
    assert (head["ChecksumType"], head["ChecksumCRC32"]) == ("FULL_OBJECT", to_base64(zlib.crc32(body)))
