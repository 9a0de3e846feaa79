"""Proof of what a consumer got (contract §4, notification): the archive's CRC-32 in its notification,
computed from the stream that made the archive, never by reading it back, equal to the CRC-32 of the
bytes downloaded; and its manifest.json, every entry's name, source, ETag, size and CRC-32, equal to
the archive's own entries. For an archive streamed, one with an entry copied inside S3, a fanned-out
one, and a re-sent duplicate."""

from __future__ import annotations

import base64
import io
import json
import os
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import Any

from awscrt import checksums as crt  # type: ignore[import-untyped]
from boto3.s3.transfer import TransferConfig

from archiver import worker
from archiver.settings import MiB
from tests.conftest import Stack
from tests.zipcheck import check_archive


def b64(crc: int) -> str:
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


def crc_of(data: bytes) -> str:
    return b64(zlib.crc32(data))


def crc64_of(data: bytes) -> str:
    return base64.b64encode(crt.crc64nvme(data).to_bytes(8, "big")).decode()


def check_manifest(stack: Stack, note: dict[str, Any], data: bytes, sources: dict[str, str]) -> None:
    """The manifest its link serves lists the archive's entries as zipfile reads them, each with the
    source it came from (`sources`: entry name -> key in the source bucket) and that object's ETag."""
    link = note["manifest"]
    with urllib.request.urlopen(link["url"], timeout=30) as response:
        document = json.loads(response.read())
    assert document["archive"] == {
        "bucket": note["archive"]["bucket"],
        "key": note["archive"]["key"],
        "size": len(data),
    }
    entries = zipfile.ZipFile(io.BytesIO(data)).infolist()
    assert link["entries"] == len(entries) == len(document["entries"])
    for info, row in zip(entries, document["entries"], strict=True):
        head = stack.clients.s3.head_object(Bucket=stack.source_bucket, Key=sources[info.filename])
        assert row == {
            "name": info.filename,
            "bucket": stack.source_bucket,
            "key": sources[info.filename],
            "etag": head["ETag"],
            "size": info.file_size,
            "crc32": b64(info.CRC),
        }


def check_s3_checksum(stack: Stack, note: dict[str, Any], data: bytes, algorithm: str = "CRC32") -> None:
    """The archive was completed with its checksum in `algorithm` as a FULL_OBJECT checksum, which S3
    checked against the bytes it got (the embedded stack checks it as S3 does: archiver.motofixes), and
    the notification gives it as S3 does, equal to the checksum of the bytes downloaded."""
    expected = {"CRC32": crc_of, "CRC64NVME": crc64_of}[algorithm](data)
    assert note["archive"]["checksum"] == {"algorithm": algorithm, "type": "FULL_OBJECT", "value": expected}
    head = stack.clients.s3.head_object(
        Bucket=note["archive"]["bucket"], Key=note["archive"]["key"], ChecksumMode="ENABLED"
    )
    assert (head["ChecksumType"], head.get(f"Checksum{algorithm}")) == ("FULL_OBJECT", expected)


def archive_and_note(
    stack: Stack, request: dict[str, object], **settings: object
) -> tuple[bytes, dict[str, Any]]:
    stack.send(request)
    assert worker.run(worker.connect(stack.settings(**settings)), burst=True) == 0
    (note,) = stack.notifications(1)
    assert note["status"] == "completed", note
    return stack.download(note["archive"]["key"]), note


def test_a_streamed_archive_carries_the_crc_of_its_bytes(stack: Stack, tmp_path: Path) -> None:
    """Small sources read whole, a big one streamed over several parts, and its duplicate re-sent."""
    files = {"a.txt": b"alpha" * 1000, "b.bin": os.urandom(12 * MiB), "c.json": b"{}"}
    for name, body in files.items():
        stack.put(name, body)
    request = {"request_id": "crc", "files": [{"source": name} for name in files]}
    data, note = archive_and_note(stack, request)
    check_archive(data, files, tmp_path)
    assert note["archive"]["crc32"] == crc_of(data)
    check_s3_checksum(stack, note, data)
    check_manifest(stack, note, data, {name: name for name in files})
    _, again = archive_and_note(stack, request)
    assert again["archive"]["crc32"] == crc_of(data)
    assert again["archive"]["checksum"] == note["archive"]["checksum"]
    assert again["manifest"]["key"] == note["manifest"]["key"]
    check_manifest(stack, again, data, {name: name for name in files})


def test_an_archive_with_an_entry_copied_inside_s3_carries_the_crc_of_its_bytes(
    stack: Stack, tmp_path: Path
) -> None:
    """The copied range never passes through the worker: its stand-in has the same CRC and length."""
    video = os.urandom(17 * MiB)
    stack.put("clip.mp4", video, ChecksumAlgorithm="CRC32")
    stack.put("note.txt", b"hello")
    request = {"request_id": "copied", "files": [{"source": "note.txt"}, {"source": "clip.mp4"}]}
    data, note = archive_and_note(stack, request, server_side_copy_min_bytes=16 * MiB)
    check_archive(data, {"note.txt": b"hello", "clip.mp4": video}, tmp_path)
    assert note["archive"]["crc32"] == crc_of(data)
    check_s3_checksum(stack, note, data)
    check_manifest(stack, note, data, {"note.txt": "note.txt", "clip.mp4": "clip.mp4"})


def test_a_fanned_out_archive_carries_the_crc_of_its_bytes(stack: Stack, tmp_path: Path) -> None:
    """Segments built apart, each recording its own stream's CRC, joined with the directory's."""
    files = {f"p{index}.jpg": os.urandom(2 * MiB) for index in range(8)}
    for name, body in files.items():
        stack.put(f"album/{name}", body)
    request = {"request_id": "fanned", "files": [{"source": f"album/{name}"} for name in files]}
    data, note = archive_and_note(stack, request, fanout_segment_bytes=5 * MiB)
    check_archive(data, files, tmp_path)
    assert stack.status("fanned")["segments_total"] > 1
    assert note["archive"]["crc32"] == crc_of(data)
    assert note["archive"]["checksum"] is None  # its part numbers have gaps: S3 did not verify it
    check_manifest(stack, note, data, {name: f"album/{name}" for name in files})


def test_a_crc64nvme_archive_is_verified_by_s3_with_its_parts_checksums_joined(
    stack: Stack, tmp_path: Path
) -> None:
    """ARCHIVE_CHECKSUM=CRC64NVME: S3's default algorithm, joined from the parts' as they are uploaded,
    over parts of 5 MiB and a source uploaded in parts; the entries' CRC-32s are still the zip's."""
    files = {"a.txt": b"alpha" * 1000, "b.bin": os.urandom(12 * MiB), "c.json": b"{}"}
    for name, body in files.items():
        stack.put(name, body)
    parted = os.urandom(9 * MiB)
    in_parts = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    stack.clients.s3.upload_fileobj(io.BytesIO(parted), stack.source_bucket, "parted.bin", Config=in_parts)
    files["parted.bin"] = parted
    request = {"request_id": "crc64", "files": [{"source": name} for name in files]}
    data, note = archive_and_note(stack, request, archive_checksum="CRC64NVME", part_size=5 * MiB)
    check_archive(data, files, tmp_path)
    assert note["archive"]["crc32"] == crc_of(data)
    check_s3_checksum(stack, note, data, "CRC64NVME")
    check_manifest(stack, note, data, {name: name for name in files})


def test_a_crc64nvme_archive_streams_a_copy_whose_parts_came_back_without_their_checksums(
    stack: Stack, tmp_path: Path
) -> None:
    """moto answers UploadPartCopy without the part's checksum, which S3 documents it sends on an upload
    created with one: the archive's CRC64NVME cannot be joined without it, so the entry is streamed
    instead, and so is every later one that would be copied."""
    videos = {f"clip{index}.mp4": os.urandom(17 * MiB) for index in range(2)}
    for name, body in videos.items():
        stack.put(name, body, ChecksumAlgorithm="CRC32")
    request = {"request_id": "copied64", "files": [{"source": name} for name in videos]}
    data, note = archive_and_note(
        stack, request, archive_checksum="CRC64NVME", server_side_copy_min_bytes=16 * MiB
    )
    check_archive(data, videos, tmp_path)
    check_s3_checksum(stack, note, data, "CRC64NVME")
    assert note["archive"]["crc32"] == crc_of(data)
