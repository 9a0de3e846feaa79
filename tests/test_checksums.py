"""Sources as users upload them: objects over 8 MiB go up in parts (`aws s3 cp`, boto3's `upload_file`),
and their checksum is then a composite one, a CRC of the parts' CRCs, not the CRC a ZIP entry needs.

moto reports that composite as a plain `ChecksumCRC32` with no `ChecksumType` (its ETag has the `-N` part
count); archiver may trust an S3 CRC-32 only where S3 documents it as the whole object's."""

from __future__ import annotations

import io
import json
import random
import zipfile
from pathlib import Path
from typing import Any

import pytest
from boto3.s3.transfer import TransferConfig

from archiver import worker
from archiver.logs import configure_logging
from archiver.settings import MiB
from archiver.sources import full_object_crc32
from tests.conftest import Stack
from tests.faultproxy import FaultProxy, Seen
from tests.zipcheck import check_archive

# What the AWS CLI and boto3 use: parts of 8 MiB for anything over 8 MiB.
IN_PARTS = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB)
COPY_MIN = 16 * MiB


def upload_in_parts(stack: Stack, key: str, body: bytes) -> None:
    """As `aws s3 cp` would: in 8 MiB parts, each with its CRC-32 (boto3's default integrity checks)."""
    stack.clients.s3.upload_fileobj(io.BytesIO(body), stack.source_bucket, key, Config=IN_PARTS)
    head = stack.clients.s3.head_object(Bucket=stack.source_bucket, Key=key, ChecksumMode="ENABLED")
    assert head["ETag"].rstrip('"').rpartition("-")[2].isdigit(), head["ETag"]  # really in parts


def user_files() -> dict[str, bytes]:
    rng = random.Random(10)
    return {
        "clip.mp4": rng.randbytes(20 * MiB + 5),  # copied server-side when copies are on
        "photo.jpg": rng.randbytes(9 * MiB + 3),  # STORED media, below the copy threshold
        "notes.txt": b"a line of notes that compresses well\n" * 260_000,  # ~9.2 MiB, deflated
        "thumb.png": rng.randbytes(40_000),  # one PUT: a true full-object CRC-32
    }


def run_once(stack: Stack, request_id: str, files: dict[str, bytes], **settings: Any) -> bytes:
    """One request through one worker: it must complete on its first delivery."""
    stack.send({"request_id": request_id, "files": [{"source": f"in/{name}"} for name in files]})
    assert worker.run(worker.connect(stack.settings(**settings)), burst=True) == 0
    notes = stack.notifications(1)
    assert [note["status"] for note in notes] == ["completed"], notes
    assert stack.queue_depth() == 0 and stack.queue_depth(stack.dlq_url) == 0
    assert stack.incomplete_uploads() == []
    return stack.download(f"download/{request_id}/{request_id}.zip")


@pytest.mark.slow
@pytest.mark.parametrize("copy_min", [COPY_MIN, 0], ids=["copies-on", "copies-off"])
def test_sources_uploaded_in_parts_make_a_correct_archive(
    stack: Stack, tmp_path: Path, copy_min: int
) -> None:
    """Media above and below SERVER_SIDE_COPY_MIN_BYTES and a text file, each uploaded in 8 MiB parts,
    come out byte for byte with the right CRC in every reader, on the first delivery."""
    files = user_files()
    for name, body in files.items():
        if name == "thumb.png":
            stack.put(f"in/{name}", body, ChecksumAlgorithm="CRC32")
        else:
            upload_in_parts(stack, f"in/{name}", body)
    data = run_once(stack, "in-parts", files, server_side_copy_min_bytes=copy_min)
    check_archive(data, files, tmp_path)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        methods = {info.filename: info.compress_type for info in archive.infolist()}
    # Only the single-PUT object's CRC is the object's: it alone may be STORED from S3's CRC.
    assert methods["thumb.png"] == zipfile.ZIP_STORED
    assert methods["notes.txt"] == zipfile.ZIP_DEFLATED


CASES: list[tuple[dict[str, Any], bool]] = [
    ({"ChecksumCRC32": "NhCmhg==", "ChecksumType": "FULL_OBJECT", "ETag": '"abc-3"'}, True),
    ({"ChecksumCRC32": "NhCmhg==", "ChecksumType": "COMPOSITE", "ETag": '"abc-3"'}, False),
    ({"ChecksumCRC32": "NhCmhg==", "ETag": '"5d41402abc4b2a76b9719d911017c592"'}, True),
    ({"ChecksumCRC32": "NhCmhg==", "ETag": '"2da7dfbc83f12c8e9774718d779b4cbb-3"'}, False),  # moto
    ({"ChecksumCRC32": "NhCmhg==-3", "ETag": '"abc"'}, False),
    ({"ChecksumCRC32": "NhCmhg==", "ChecksumType": "FULL_OBJECT"}, True),
    ({"ChecksumCRC32": "NhCmhg=="}, False),  # no type and no ETag to tell: not documented as whole
    ({"ETag": '"abc"'}, False),
    ({"ChecksumCRC32": "not base64", "ETag": '"abc"'}, False),
]


@pytest.mark.parametrize(("head", "trusted"), CASES)
def test_an_s3_crc_is_the_objects_only_where_s3_says_so(head: dict[str, Any], trusted: bool) -> None:
    """FULL_OBJECT, or no ChecksumType on an object written in one piece (its ETag has no part count)."""
    assert (full_object_crc32(head) == 0x3610A686) is trusted


def lying_head(key: str, value: str) -> tuple[Any, tuple[tuple[str, str | None], ...]]:
    def match(seen: Seen) -> bool:
        return seen.operation == "HeadObject" and seen.path.endswith(f"/{key}")

    return match, (("x-amz-checksum-crc32", value), ("x-amz-checksum-type", "FULL_OBJECT"))


def test_a_crc_that_is_not_the_objects_is_not_a_retry_loop(
    stack: Stack, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """A server whose FULL_OBJECT CRC-32 is not the bytes' (stream-zip notices once the entry is written):
    the attempt starts over without S3's CRCs, and the request completes on its first delivery. Only big
    sources take S3's CRC (from their HEAD): PREFETCH_BYTES=256 KiB makes the 300 kB photo one."""
    files = {"photo.jpg": random.Random(1).randbytes(300_000), "a.txt": b"alpha" * 100}
    for name, body in files.items():
        stack.put(f"in/{name}", body, ChecksumAlgorithm="CRC32")
    match, headers = lying_head("in/photo.jpg", "AAAAAA==")
    fault_proxy.configure(match=match, response_headers=headers)
    logs = io.StringIO()
    configure_logging(debug=False, dev_mode=False, stream=logs)

    data = run_once(stack, "lying", files, prefetch_bytes=256 * 1024)
    check_archive(data, files, tmp_path)
    events = [json.loads(line) for line in logs.getvalue().splitlines()]
    assert [e["source"] for e in events if e["event"] == "source.crc_mismatch"] == ["in/photo.jpg"]
    assert len(fault_proxy.requests_matching(operation="CreateMultipartUpload")) == 2
    assert len(fault_proxy.requests_matching(operation="AbortMultipartUpload")) == 1
