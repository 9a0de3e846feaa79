"""Server-side assembly through the worker, over real HTTP to moto (behind the fault proxy, which records
every request): big STORED entries copied with UploadPartCopy, the archive byte for byte the one
streaming writes, and every way the copy can be refused falling back to streaming."""

from __future__ import annotations

import io
import itertools
import json
import random
import threading
import zipfile
import zlib
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import boto3
import boto3.s3.transfer
import pytest
from botocore.config import Config
from isal import isal_zlib

from archiver import checksums, crc, worker
from archiver.assembly import COPY_EXTRA_PARTS, LEAD_BYTES, CopiedEntry, copy_ranges, plan_copies
from archiver.logs import configure_logging
from archiver.parts import PartLedger, parts_of
from archiver.settings import MAX_PARTS, MIN_PART_SIZE, MiB
from archiver.sources import SourceObject
from archiver.zipping import CHUNK_SIZE, ZipEntry, zip_chunks
from bench import servers
from tests.conftest import Stack, wait_for
from tests.faultproxy import FaultProxy
from tests.synthetic import Synthetic
from tests.zipcheck import check_archive

COPY_MIN = 16 * MiB
PART_SIZE = 5 * MiB  # Stack.settings' part size
CONCURRENCY = 4  # the default UPLOAD_CONCURRENCY


def sources() -> dict[str, bytes]:
    """Deflated text, three big media objects (two of them adjacent), and a small media file between."""
    rng = random.Random(6)
    return {
        "notes.txt": b"a line of notes\n" * 20_000,
        "clip.mp4": rng.randbytes(COPY_MIN + 1),
        "scan.png": rng.randbytes(23 * MiB + 12_345),
        "thumb.png": rng.randbytes(300_000),
        "photo.jpg": rng.randbytes(17 * MiB + 7),
    }


BIG = ("clip.mp4", "scan.png", "photo.jpg")


def put_all(stack: Stack, files: dict[str, bytes], *, with_crc: bool) -> None:
    """With S3's full-object CRC-32 on each object, or with no checksum at all (as objects written by
    older clients have; on AWS, big ones uploaded in parts carry a composite checksum, no better)."""
    if with_crc:
        for name, body in files.items():
            stack.put(f"in/{name}", body, ChecksumAlgorithm="CRC32")
        return
    plain = boto3.session.Session().client("s3", config=Config(request_checksum_calculation="when_required"))
    for name, body in files.items():
        plain.put_object(Bucket=stack.source_bucket, Key=f"in/{name}", Body=body)
        head = plain.head_object(Bucket=stack.source_bucket, Key=f"in/{name}", ChecksumMode="ENABLED")
        assert "ChecksumCRC32" not in head


def archive(stack: Stack, request_id: str, files: dict[str, bytes], **settings: Any) -> bytes:
    """Run the worker on one request for `files`; its archive, after checking the notification."""
    stack.send({"request_id": request_id, "files": [{"source": f"in/{name}"} for name in files]})
    assert worker.run(worker.connect(stack.settings(**settings)), burst=True) == 0
    notes = stack.notifications(1)
    assert [note["status"] for note in notes] == ["completed"], notes
    data = stack.download(f"download/{request_id}/{request_id}.zip")
    assert notes[0]["archive"]["size"] == len(data)
    assert stack.incomplete_uploads() == []
    return data


def expected_copies(files: dict[str, bytes], name: str) -> list[tuple[int, int]]:
    return copy_ranges(len(files[name]), part_size=PART_SIZE, concurrency=CONCURRENCY)


def test_copied_archive_is_the_streamed_archive(
    stack: Stack, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """With S3's CRCs: big entries are copied (after a 5 MiB head each), nothing else of them is read,
    CopySourceIfMatch holds their ETags, and the archive equals the streamed one byte for byte."""
    files = sources()
    put_all(stack, files, with_crc=True)
    streamed = archive(stack, "streamed", files, server_side_copy_min_bytes=0)
    assert fault_proxy.requests_matching(operation="UploadPartCopy") == []

    since = fault_proxy.mark()
    logs = io.StringIO()
    configure_logging(debug=False, dev_mode=False, stream=logs)
    copied = archive(stack, "copied", files, server_side_copy_min_bytes=COPY_MIN)
    assert copied == streamed
    check_archive(copied, files, tmp_path)
    (assembled,) = [
        event
        for event in map(json.loads, logs.getvalue().splitlines())
        if event["event"] == "archive.assembled"
    ]
    copied_bytes = sum(len(files[name]) - LEAD_BYTES for name in BIG)
    assert assembled["request_id"] == "copied"
    assert assembled["archive_key"] == "download/copied/copied.zip"
    assert (assembled["bytes"], assembled["copied_bytes"]) == (len(copied), copied_bytes)
    assert assembled["streamed_bytes"] == len(copied) - copied_bytes
    done = stack.clients.s3.head_object(Bucket=stack.destination_bucket, Key="download/copied/copied.zip")
    assert assembled["parts"] == int(done["ETag"].strip('"').rsplit("-", 1)[1])  # S3's count of parts

    for name in BIG:
        etag = stack.clients.s3.head_object(Bucket=stack.source_bucket, Key=f"in/{name}")["ETag"]
        copies = fault_proxy.requests_matching(
            operation="UploadPartCopy", since=since, path_contains="copied"
        )
        mine = [c for c in copies if c.headers["x-amz-copy-source"].endswith(f"/in/{name}")]
        ranges = sorted(c.headers["x-amz-copy-source-range"] for c in mine)
        assert ranges == sorted(f"bytes={start}-{end - 1}" for start, end in expected_copies(files, name))
        assert {c.headers["x-amz-copy-source-if-match"] for c in mine} == {etag}
        gets = fault_proxy.requests_matching(operation="GetObject", since=since, path_contains=f"/in/{name}")
        # The first GET, whose answer showed a big object, was dropped unread; then the lead.
        assert [g.headers.get("range") for g in gets] == [None, f"bytes=0-{LEAD_BYTES - 1}"]
        assert [g.headers.get("if-match") for g in gets] == [None, etag]

    # What passed through the worker: every uploaded part, against the archive's size.
    uploads = fault_proxy.requests_matching(operation="UploadPart", since=since)
    assert sum(int(u.headers["content-length"]) for u in uploads) == len(copied) - copied_bytes


def test_sources_without_crc_stream_when_copies_bring_no_checksums(
    stack: Stack, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """moto answers UploadPartCopy without the part's CRC, so an object without its own CRC-32 cannot be
    laid out from a copy: that entry is streamed, and the job streams the others without trying."""
    files = sources()
    put_all(stack, files, with_crc=False)
    streamed = archive(stack, "streamed", files, server_side_copy_min_bytes=0)
    since = fault_proxy.mark()
    copied = archive(stack, "copied", files, server_side_copy_min_bytes=COPY_MIN)
    assert copied == streamed
    check_archive(copied, files, tmp_path)
    copies = fault_proxy.requests_matching(operation="UploadPartCopy", since=since)
    assert {c.headers["x-amz-copy-source"].rpartition("/")[2] for c in copies} == {"clip.mp4"}


def test_a_server_refusing_uploadpartcopy_gets_every_entry_streamed(
    stack: Stack, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """An S3-compatible server without UploadPartCopy (501 NotImplemented): the request still succeeds,
    streamed, after one refused entry; the refused parts leave nothing behind."""
    files = sources()
    put_all(stack, files, with_crc=True)
    streamed = archive(stack, "streamed", files, server_side_copy_min_bytes=0)
    fault_proxy.configure(rate=1.0, kinds=("501",), match=lambda seen: seen.operation == "UploadPartCopy")
    since = fault_proxy.mark()
    copied = archive(stack, "refused", files, server_side_copy_min_bytes=COPY_MIN)
    assert copied == streamed
    check_archive(copied, files, tmp_path)
    copies = fault_proxy.requests_matching(operation="UploadPartCopy", since=since)
    assert copies and all(c.fault == "501" for c in copies)  # no retry of a refusal
    assert {c.headers["x-amz-copy-source"].rpartition("/")[2] for c in copies} == {"clip.mp4"}


def test_a_source_changed_before_its_copy_fails_the_attempt_without_an_archive(
    stack: Stack, fault_proxy: FaultProxy
) -> None:
    """CopySourceIfMatch refused (412): the source changed since its HEAD, so this attempt stops, its
    upload is aborted and the message goes back for a redelivery that HEADs afresh."""
    files = {"clip.mp4": random.Random(2).randbytes(COPY_MIN + 1)}
    put_all(stack, files, with_crc=True)
    fault_proxy.configure(rate=1.0, kinds=("412",), match=lambda seen: seen.operation == "UploadPartCopy")
    stack.send({"request_id": "changed", "files": [{"source": "in/clip.mp4"}]})
    assert worker.run(worker.connect(stack.settings(server_side_copy_min_bytes=COPY_MIN)), burst=True) == 0
    assert stack.queue_depth(stack.destination_url) == 0
    assert stack.queue_depth() == 1  # released, not deleted
    assert stack.archive_keys() == []
    assert stack.incomplete_uploads() == []
    assert fault_proxy.requests_matching(operation="AbortMultipartUpload")


@pytest.fixture
def seaweedfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """SeaweedFS, a real S3 that returns the CRC-32 of each copied part, behind the recording proxy; the
    worker's S3 calls go there (its SQS calls still to moto, which takes any credentials)."""
    with servers.seaweedfs(tmp_path) as (s3_url, _), FaultProxy(s3_url) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", servers.ACCESS_KEY)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", servers.SECRET_KEY)
        yield proxy


@pytest.mark.slow
def test_crc_from_copied_parts_on_a_server_that_returns_them(
    stack: Stack, seaweedfs: FaultProxy, tmp_path: Path
) -> None:
    """Sources uploaded in parts carry a composite checksum, no full-object CRC-32: SeaweedFS returns each
    copied part's CRC-32, the worker combines them with the head's, and writes the entries STORED with
    that CRC, which every reader verifies against the bytes. A source with a full-object CRC-32 is
    checked against its copied parts'."""
    files = sources()
    s3 = boto3.session.Session().client("s3", endpoint_url=seaweedfs.url)
    for bucket in (stack.source_bucket, stack.destination_bucket):
        s3.create_bucket(Bucket=bucket)
    for name, body in files.items():
        key = f"in/{name}"
        if name == "photo.jpg":  # one PUT: a full-object CRC-32
            s3.put_object(Bucket=stack.source_bucket, Key=key, Body=body, ChecksumAlgorithm="CRC32")
            continue
        upload = s3.create_multipart_upload(Bucket=stack.source_bucket, Key=key, ChecksumAlgorithm="CRC32")
        parts = []
        for number, start in enumerate(range(0, len(body), 8 * MiB), 1):
            answer = s3.upload_part(
                Bucket=stack.source_bucket,
                Key=key,
                UploadId=upload["UploadId"],
                PartNumber=number,
                Body=body[start : start + 8 * MiB],
                ChecksumAlgorithm="CRC32",
            )
            parts.append(
                {"PartNumber": number, "ETag": answer["ETag"], "ChecksumCRC32": answer["ChecksumCRC32"]}
            )
        s3.complete_multipart_upload(
            Bucket=stack.source_bucket, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
        )

    stack.send({"request_id": "seaweed", "files": [{"source": f"in/{name}"} for name in files]})
    assert worker.run(worker.connect(stack.settings(server_side_copy_min_bytes=COPY_MIN)), burst=True) == 0
    notes = stack.notifications(1)
    assert [note["status"] for note in notes] == ["completed"], notes
    data = s3.get_object(Bucket=stack.destination_bucket, Key="download/seaweed/seaweed.zip")["Body"].read()
    check_archive(data, files, tmp_path)
    with zipfile.ZipFile(BytesIO(data)) as archive:
        methods = {info.filename: info.compress_type for info in archive.infolist()}
    assert {name: methods[name] for name in BIG} == dict.fromkeys(BIG, zipfile.ZIP_STORED)

    copies = seaweedfs.requests_matching(operation="UploadPartCopy")
    assert {c.headers["x-amz-copy-source"].rpartition("/")[2] for c in copies} == set(BIG)
    for name in BIG:
        gets = seaweedfs.requests_matching(operation="GetObject", path_contains=f"/in/{name}")
        # The first GET, whose answer showed a big object, was dropped unread; then the lead.
        assert [g.headers.get("range") for g in gets] == [None, f"bytes=0-{LEAD_BYTES - 1}"]


@pytest.mark.slow
def test_copied_parts_overrule_a_full_object_crc_that_is_not_the_bytes(
    stack: Stack, seaweedfs: FaultProxy, tmp_path: Path
) -> None:
    """A HEAD whose FULL_OBJECT CRC-32 is not the object's (here forged at the proxy): the copied parts'
    checksums, taken under CopySourceIfMatch, are the bytes', so the entry gets theirs and the request
    completes on its first delivery instead of failing every delivery the same way."""
    files = {"photo.jpg": random.Random(3).randbytes(COPY_MIN + 99), "a.txt": b"alpha\n" * 100}
    s3 = boto3.session.Session().client("s3", endpoint_url=seaweedfs.url)
    for bucket in (stack.source_bucket, stack.destination_bucket):
        s3.create_bucket(Bucket=bucket)
    for name, body in files.items():
        s3.put_object(Bucket=stack.source_bucket, Key=f"in/{name}", Body=body, ChecksumAlgorithm="CRC32")
    seaweedfs.configure(
        match=lambda seen: seen.operation == "HeadObject" and seen.path.endswith("/in/photo.jpg"),
        response_headers=(("x-amz-checksum-crc32", "AAAAAA=="), ("x-amz-checksum-type", "FULL_OBJECT")),
    )
    stack.send({"request_id": "forged", "files": [{"source": f"in/{name}"} for name in files]})
    assert worker.run(worker.connect(stack.settings(server_side_copy_min_bytes=COPY_MIN)), burst=True) == 0
    assert [note["status"] for note in stack.notifications(1)] == ["completed"]
    assert stack.queue_depth() == 0
    data = s3.get_object(Bucket=stack.destination_bucket, Key="download/forged/forged.zip")["Body"].read()
    check_archive(data, files, tmp_path)
    assert {
        c.headers["x-amz-copy-source"].rpartition("/")[2]
        for c in seaweedfs.requests_matching(operation="UploadPartCopy")
    } == {"photo.jpg"}


@pytest.mark.slow
def test_a_crc64nvme_archive_joins_its_copied_parts_checksums_on_a_server_that_returns_them(
    stack: Stack, seaweedfs: FaultProxy, tmp_path: Path
) -> None:
    """ARCHIVE_CHECKSUM=CRC64NVME: SeaweedFS answers each UploadPartCopy with the part's CRC64NVME, which
    joins the streamed parts' into the archive's, handed to the server at completion. The copied parts'
    checksums are not CRC-32s, so only a source with its own full-object CRC-32 is copied; one uploaded
    in parts (a composite checksum) is streamed."""
    rng = random.Random(64)
    files = {"one-put.mp4": rng.randbytes(COPY_MIN + 3), "in-parts.mp4": rng.randbytes(COPY_MIN + 5)}
    files["notes.txt"] = b"a line of notes\n" * 20_000
    s3 = boto3.session.Session().client("s3", endpoint_url=seaweedfs.url)
    for bucket in (stack.source_bucket, stack.destination_bucket):
        s3.create_bucket(Bucket=bucket)
    s3.put_object(
        Bucket=stack.source_bucket, Key="in/one-put.mp4", Body=files["one-put.mp4"], ChecksumAlgorithm="CRC32"
    )
    s3.put_object(Bucket=stack.source_bucket, Key="in/notes.txt", Body=files["notes.txt"])
    in_parts = boto3.s3.transfer.TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB)
    s3.upload_fileobj(BytesIO(files["in-parts.mp4"]), stack.source_bucket, "in/in-parts.mp4", Config=in_parts)

    stack.send({"request_id": "crc64", "files": [{"source": f"in/{name}"} for name in files]})
    settings = stack.settings(server_side_copy_min_bytes=COPY_MIN, archive_checksum="CRC64NVME")
    assert worker.run(worker.connect(settings), burst=True) == 0
    (note,) = stack.notifications(1)
    assert note["status"] == "completed", note
    key = note["archive"]["key"]
    data = s3.get_object(Bucket=stack.destination_bucket, Key=key)["Body"].read()
    check_archive(data, files, tmp_path)
    expected = checksums.CRC64NVME.encode(checksums.CRC64NVME.of(data))
    assert note["archive"]["checksum"] == {
        "algorithm": "CRC64NVME",
        "type": "FULL_OBJECT",
        "value": expected,
        "s3_verified": True,
    }
    head = s3.head_object(Bucket=stack.destination_bucket, Key=key, ChecksumMode="ENABLED")
    assert (head["ChecksumType"], head["ChecksumCRC64NVME"]) == ("FULL_OBJECT", expected)
    (complete,) = seaweedfs.requests_matching(operation="CompleteMultipartUpload", path_contains=key)
    assert complete.headers["x-amz-checksum-crc64nvme"] == expected
    copies = seaweedfs.requests_matching(operation="UploadPartCopy")
    assert copies and {c.headers["x-amz-copy-source"].rpartition("/")[2] for c in copies} == {"one-put.mp4"}


# ---------------------------------------------------------------------- the layout past 4 GiB, in memory


@pytest.mark.slow
def test_layout_past_4_gib_is_the_streamed_one() -> None:
    """Copied entries before, across and past the 4 GiB mark (zip64 where streaming uses it), with small
    entries around them: the streamed parts and the copied ranges, joined in part-number order, are the
    streamed archive, compared by length and CRC-32 (no S3: the copies are the bytes they stand for)."""
    GiB = 1024 * MiB
    specs = [
        Synthetic("a.mp4", "video/mp4", size=17 * MiB + 5, known_crc=True),
        Synthetic("b.mp4", "video/mp4", size=3 * GiB + 12_345, known_crc=True),
        # Starts before 4 GiB, ends past it.
        Synthetic("c.mp4", "video/mp4", size=1536 * MiB + 1, known_crc=True),
        Synthetic("small.mp4", "video/mp4", size=100_000, known_crc=True),
        Synthetic("d.mp4", "video/mp4", size=40 * MiB + 3, known_crc=True),  # starts past 4 GiB: zip64
    ]
    entries = [ZipEntry(spec.path, spec.source(index)) for index, spec in enumerate(specs)]

    def open_source(index: int, obj: SourceObject) -> Iterator[bytes]:
        return specs[index].chunks(index)

    streamed_crc, streamed_length = 0, 0
    for chunk in zip_chunks(entries, open_source=open_source, compression="auto"):
        streamed_crc, streamed_length = isal_zlib.crc32(chunk, streamed_crc), streamed_length + len(chunk)

    layout = PartLedger()
    pieces: dict[int, tuple[int, int]] = {}  # part number -> (crc, length)

    def copy(index: int, obj: SourceObject) -> CopiedEntry | None:
        spec = specs[index]
        if obj.size < COPY_MIN:
            return None
        first = layout.reserve(1)
        pieces[first] = (spec.crc32(index, skip_chunks=LEAD_BYTES // CHUNK_SIZE), spec.size - LEAD_BYTES)
        lead = list(itertools.islice(spec.chunks(index), LEAD_BYTES // CHUNK_SIZE))
        assert obj.crc32 is not None
        return CopiedEntry(
            crc32=obj.crc32,
            lead=lead,
            lead_crc32=crc.joined((zlib.crc32(chunk), len(chunk)) for chunk in lead),
            size=spec.size,
            first=first,
            last=first,
            ledger=layout,
            position=lambda: layout.position,
        )

    chunks = zip_chunks(entries, open_source=open_source, compression="auto", copy=copy)
    for number, body in parts_of(chunks, 8 * MiB, lambda: False, layout):
        assert number not in pieces
        pieces[number] = (isal_zlib.crc32(body), len(body))
    assert len([spec for spec in specs if spec.size >= COPY_MIN]) == 4
    assert layout.position == streamed_length
    assembled = [pieces[number] for number in sorted(pieces)]
    assert all(length >= MIN_PART_SIZE for _, length in assembled[:-1])
    assert sum(length for _, length in assembled) == streamed_length
    assert crc.joined(assembled) == streamed_crc


def test_a_shutdown_during_copies_does_not_wait_for_them(stack: Stack, fault_proxy: FaultProxy) -> None:
    """SIGTERM's grace running out while S3 copies an entry: the job stops without waiting for the
    copies (held at the proxy, never forwarded), its upload is aborted, its message handed back at once."""
    files = {"clip.mp4": random.Random(3).randbytes(COPY_MIN + 1)}
    put_all(stack, files, with_crc=True)
    hold = threading.Event()
    fault_proxy.configure(match=lambda seen: seen.operation == "UploadPartCopy", hold=hold)
    stack.send({"request_id": "stopped", "files": [{"source": "in/clip.mp4"}]})
    work = worker.connect(stack.settings(server_side_copy_min_bytes=COPY_MIN))

    def stop_while_copying() -> None:
        wait_for(lambda: fault_proxy.requests_matching(operation="UploadPartCopy"), timeout=60)
        work.shutdown.requested.set()  # what the SIGTERM handler and its grace timer do
        work.shutdown.overdue.set()

    stopper = threading.Thread(target=stop_while_copying)
    stopper.start()
    try:
        assert worker.run(work, burst=True) == 0
        stopper.join()
        assert fault_proxy.requests_forwarded("UploadPartCopy") == []
        assert fault_proxy.requests_forwarded("AbortMultipartUpload")
        assert stack.queue_depth(stack.destination_url) == 0
        assert stack.queue_depth() == 1
        assert stack.archive_keys() == []
    finally:
        hold.set()


def test_plan_copies_picks_big_uncompressed_entries_within_s3s_limits(stack: Stack) -> None:
    """Big media (or anything under `store`) is copied; text, small files, a threshold of 0, thousands
    of big entries, or parts over 2.5 GiB mean streaming."""

    def entry(name: str, size: int) -> ZipEntry:
        kind = "text/plain" if name.endswith(".txt") else "video/mp4"
        return ZipEntry(name, Synthetic(name, kind, size=size).source(0))

    entries = [entry("a.mp4", COPY_MIN), entry("b.txt", COPY_MIN), entry("c.mp4", COPY_MIN - 1)]
    on = stack.settings(server_side_copy_min_bytes=COPY_MIN)
    assert plan_copies(entries, on, "auto")[0] == {0}
    assert plan_copies(entries, on, "store")[0] == {0, 1}
    assert plan_copies(entries, on, "deflate")[0] == set()
    assert plan_copies(entries, stack.settings(server_side_copy_min_bytes=0), "auto")[0] == set()
    many = [entry(f"{index}.mp4", COPY_MIN) for index in range(MAX_PARTS // 2 // COPY_EXTRA_PARTS + 1)]
    assert plan_copies(many, on, "auto")[0] == set()
    assert plan_copies(many[:-1], on, "auto")[0] == set(range(len(many) - 1))
    huge_parts = stack.settings(server_side_copy_min_bytes=COPY_MIN, part_size=3 * 1024 * MiB)
    assert plan_copies(entries, huge_parts, "auto") == (set(), 3 * 1024 * MiB)
