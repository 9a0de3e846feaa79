"""The multipart sink: parts sized within S3's limits, and an upload that completes or leaves nothing."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from archiver.assembly import HEAD_BYTES, NUMBERING_SLACK, Hole, Layout
from archiver.errors import JobAbandoned, PermanentError
from archiver.multipart import MAX_PARTS, choose_part_size, parts_of, upload_stream
from archiver.settings import MiB
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
    numbered = list(parts_of(iter(chunks), 4096, lambda: False, Layout()))
    assert [number for number, _ in numbered] == list(range(1, len(numbered) + 1))
    parts = [body for _, body in numbered]
    assert b"".join(parts) == b"".join(chunks)
    assert all(len(p) == 4096 for p in parts[:-1]) and 0 < len(parts[-1]) <= 4096


def test_a_copied_range_is_left_out_and_the_part_before_it_holds_the_head() -> None:
    """The part ending where a copy starts is cut there, even past part_size, so it holds the whole 5 MiB
    head and is never under S3's minimum; the copy's numbers are skipped; the stand-ins are dropped."""
    layout = Layout()
    prefix, head, tail = os.urandom(6 * MiB), os.urandom(HEAD_BYTES), os.urandom(MiB + 7)
    copied = 20 * MiB

    def stream() -> Iterator[bytes]:
        yield from split(prefix)
        first = layout.reserve()
        start = layout.position + HEAD_BYTES
        layout.holes.append(Hole(start=start, end=start + copied, first=first, last=first + 2))
        yield from split(head)
        yield from split(bytes(copied))
        yield from split(tail)

    numbered = [(number, bytes(body)) for number, body in parts_of(stream(), 8 * MiB, lambda: False, layout)]
    assert numbered[0] == (1, prefix + head)
    assert numbered[1:] == [(1 + NUMBERING_SLACK + 3, tail)]
    assert layout.position == len(prefix) + len(head) + copied + len(tail)
    assert not layout.holes


def split(data: bytes) -> Iterator[bytes]:
    return (data[start : start + 65536] for start in range(0, len(data), 65536))


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
            cancelled=lambda: len(seen) > 100,
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
