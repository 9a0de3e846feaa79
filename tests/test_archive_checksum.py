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

import pytest
from awscrt import checksums as crt  # type: ignore[import-untyped]
from boto3.s3.transfer import TransferConfig

from archiver import checksums, worker
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


def checksum_document(algorithm: str, value: str, *, s3_verified: bool) -> dict[str, Any]:
    """A notification's `archive.checksum` as the contract gives it (§4, notification)."""
    return {"algorithm": algorithm, "type": "FULL_OBJECT", "value": value, "s3_verified": s3_verified}


def check_s3_checksum(stack: Stack, note: dict[str, Any], data: bytes, algorithm: str = "CRC32") -> None:
    """The archive was completed with its checksum in `algorithm` as a FULL_OBJECT checksum, which S3
    checked against the bytes it got (the embedded stack checks it as S3 does: archiver.motofixes), and
    the notification gives it as S3 does, equal to the checksum of the bytes downloaded."""
    expected = {"CRC32": crc_of, "CRC64NVME": crc64_of}[algorithm](data)
    assert note["archive"]["checksum"] == checksum_document(algorithm, expected, s3_verified=True)
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
    # Its part numbers have gaps, which S3 allows only without part checksums: the workers' join.
    assert note["archive"]["checksum"] == checksum_document("CRC32", crc_of(data), s3_verified=False)
    check_manifest(stack, note, data, {name: f"album/{name}" for name in files})


def fanned_out_request(stack: Stack, request_id: str) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Photos in segments of 5 MiB, and a video above SERVER_SIDE_COPY_MIN_BYTES with its own CRC-32,
    which a CRC-32 archive would copy inside S3."""
    files = {f"p{index}.jpg": os.urandom(2 * MiB) for index in range(6)}
    files["clip.mp4"] = os.urandom(17 * MiB)
    for name, body in files.items():
        stack.put(f"album/{name}", body, **({"ChecksumAlgorithm": "CRC32"} if name == "clip.mp4" else {}))
    return files, {"request_id": request_id, "files": [{"source": f"album/{name}"} for name in files]}


FANNED_OUT = {"fanout_segment_bytes": 5 * MiB, "server_side_copy_min_bytes": 16 * MiB}


def copied_bytes(capsys: pytest.CaptureFixture[str]) -> int:
    """The CopiedBytes of the one request the worker finished (its metrics line on stdout)."""
    (line,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    return int(line["CopiedBytes"])


def test_a_fanned_out_crc64nvme_archive_carries_its_segments_checksums_joined(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ARCHIVE_CHECKSUM=CRC64NVME fanned out: each segment's CRC64NVME counted over its own stream,
    joined with the directory's; the video is streamed, not copied (a copy's stand-in has only the
    copied bytes' CRC-32)."""
    files, request = fanned_out_request(stack, "fanned64")
    data, note = archive_and_note(stack, request, archive_checksum="CRC64NVME", **FANNED_OUT)
    check_archive(data, files, tmp_path)
    assert stack.status("fanned64")["segments_total"] > 1
    assert copied_bytes(capsys) == 0
    assert note["archive"]["crc32"] == crc_of(data)
    assert note["archive"]["checksum"] == checksum_document("CRC64NVME", crc64_of(data), s3_verified=False)


def test_a_fanned_out_crc32_archive_copies_and_still_carries_its_checksum(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same request under CRC-32: the video is copied inside S3, its stand-in carrying its CRC."""
    files, request = fanned_out_request(stack, "fanned32")
    data, note = archive_and_note(stack, request, **FANNED_OUT)
    check_archive(data, files, tmp_path)
    assert copied_bytes(capsys) > 0  # whole parts of it: the rest is streamed around them
    assert note["archive"]["checksum"] == checksum_document("CRC32", crc_of(data), s3_verified=False)


def test_a_segment_built_without_awscrt_costs_the_checksum_not_the_request(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CRC64NVME plan whose segments a worker without awscrt builds (a fleet mid-deploy): the archive
    completes, its CRC-32 known, its `checksum` null."""
    files, request = fanned_out_request(stack, "nocrt")
    stack.send(request)
    settings = stack.settings(archive_checksum="CRC64NVME", **FANNED_OUT)
    monkeypatch.setattr(checksums, "awscrt_installed", lambda: False)
    assert worker.run(worker.connect(settings), burst=True) == 0
    (note,) = stack.notifications(1)
    assert note["status"] == "completed", note
    data = stack.download(note["archive"]["key"])
    check_archive(data, files, tmp_path)
    assert note["archive"]["crc32"] == crc_of(data)
    assert note["archive"]["checksum"] is None


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
