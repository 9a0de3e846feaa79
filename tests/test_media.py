"""The compression of each entry (docs/decisions.md, `compression: auto`): compressible content deflated at
level 1, media, told by its extension or its Content-Type, not compressed: STORED with S3's CRC-32, else
deflate level 0 (stored blocks). The sources here are all compressible, so the archive shows which level each
entry really got."""

from __future__ import annotations

import io
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from archiver import worker
from archiver.models import SourceRef
from archiver.sources import SourceObject
from archiver.zipping import Compression, ZipEntry, choose_level, is_uncompressed
from tests.conftest import Stack
from tests.zipcheck import check_archive

STORED = None
# (key, Content-Type, whether S3 holds the object's CRC-32, compression) -> deflate level, or STORED
CHOICES: list[tuple[str, str, bool, Compression, int | None]] = [
    ("photo.jpg", "binary/octet-stream", True, "auto", STORED),
    ("photo.jpg", "binary/octet-stream", False, "auto", 0),
    ("DSC_0001.JPG", "", False, "auto", 0),
    ("backup.tar.gz", "application/octet-stream", False, "auto", 0),
    # Media by Content-Type alone: a key without an extension, or with one that says nothing.
    ("scans/0001", "image/jpeg", True, "auto", STORED),
    ("scans/0001", "image/jpeg", False, "auto", 0),
    ("clip", "Video/MP4; codecs=avc1", False, "auto", 0),
    ("voice.dat", " audio/ogg ", False, "auto", 0),
    ("statement", "application/pdf", False, "auto", 0),
    ("bundle.bin", "application/x-7z-compressed", True, "auto", STORED),
    ("notes.txt", "application/zip", False, "auto", 0),
    # Images that compress well, whatever their type prefix says.
    ("drawing.svg", "image/svg+xml", True, "auto", 1),
    ("drawing", "image/svg+xml; charset=utf-8", False, "auto", 1),
    ("bitmap", "image/bmp", True, "auto", 1),
    ("notes.txt", "text/plain", True, "auto", 1),
    ("photo.jpg.txt", "text/plain", False, "auto", 1),
    ("album.jpg/readme", "text/plain", False, "auto", 1),
    ("jpg", "text/plain", False, "auto", 1),
    ("data", "", False, "auto", 1),
    # The request's own choice wins over the content.
    ("photo.jpg", "image/jpeg", True, "deflate", 1),
    ("notes.txt", "text/plain", True, "store", STORED),
    ("notes.txt", "text/plain", False, "store", 0),
]


def head(key: str, content_type: str, *, crc: bool) -> SourceObject:
    """What a HEAD of the object would tell the worker."""
    return SourceObject(
        ref=SourceRef(source=key, bucket="b", key=key),
        size=1000,
        etag='"x"',
        last_modified=datetime(2024, 1, 2, tzinfo=UTC),
        content_type=content_type,
        crc32=0x1234 if crc else None,
    )


@pytest.mark.parametrize(("key", "content_type", "crc", "compression", "level"), CHOICES)
def test_each_entry_gets_the_level_its_content_calls_for(
    key: str, content_type: str, crc: bool, compression: Compression, level: int | None
) -> None:
    entry = ZipEntry(path=key, source=head(key, content_type, crc=crc))
    assert choose_level(entry, compression) == level
    assert is_uncompressed(entry, compression) is (level in (STORED, 0))


def put_without_crc(stack: Stack, key: str, body: bytes, content_type: str) -> None:
    """As an older client writes an object: no checksum at all (boto3 now sends a CRC-32 by default)."""
    plain = boto3.session.Session().client("s3", config=Config(request_checksum_calculation="when_required"))
    plain.put_object(Bucket=stack.source_bucket, Key=key, Body=body, ContentType=content_type)
    found = plain.head_object(Bucket=stack.source_bucket, Key=key, ChecksumMode="ENABLED")
    assert "ChecksumCRC32" not in found


@pytest.mark.parametrize("small", [True, False], ids=["small-read-whole", "big-headed"])
def test_the_archive_holds_each_entry_at_its_level(stack: Stack, tmp_path: Path, small: bool) -> None:
    """Through the worker, with compressible bytes everywhere: deflate level 1 shrinks them, stored
    blocks (level 0) grow them a little, STORED keeps their size and needs no data descriptor. A small
    source's CRC-32 comes from the bytes held, so all its media are STORED; a big one (PREFETCH_BYTES of
    64 KiB makes these 150 kB sources big) is STORED only with S3's full-object CRC-32."""
    body = b"the same line again and again\n" * 5_000
    stack.put("notes.txt", body, ContentType="text/plain")
    stack.put("drawing.svg", body, ContentType="image/svg+xml")
    stack.put("photo.png", body, ContentType="image/png", ChecksumAlgorithm="CRC32")
    stack.put("scans/0001", body, ContentType="image/jpeg", ChecksumAlgorithm="CRC32")
    put_without_crc(stack, "film.mp4", body, "binary/octet-stream")
    put_without_crc(stack, "scans/0002", body, "application/pdf")
    keys = ["notes.txt", "drawing.svg", "photo.png", "scans/0001", "film.mp4", "scans/0002"]
    stack.send({"request_id": "levels", "files": [{"source": key} for key in keys]})
    prefetch = {} if small else {"prefetch_bytes": 64 * 1024}
    worker.run(worker.connect(stack.settings(**prefetch)), burst=True)

    (note,) = stack.notifications(1)
    assert note["status"] == "completed", note
    data = stack.download("download/levels/levels.zip")
    names = [key.rsplit("/", 1)[-1] for key in keys]
    check_archive(data, dict.fromkeys(names, body), tmp_path)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = {name: archive.getinfo(name) for name in names}
    for name in ("notes.txt", "drawing.svg"):
        assert info[name].compress_type == zipfile.ZIP_DEFLATED
        assert info[name].compress_size < len(body) // 20, name  # level 1 at work
    stored = ("photo.png", "0001", "film.mp4", "0002") if small else ("photo.png", "0001")
    for name in stored:
        assert info[name].compress_type == zipfile.ZIP_STORED, name
        assert info[name].compress_size == len(body), name
        assert not info[name].flag_bits & 0x08, f"{name}: STORED with a data descriptor"
    for name in () if small else ("film.mp4", "0002"):
        assert info[name].compress_type == zipfile.ZIP_DEFLATED, name
        assert len(body) < info[name].compress_size < len(body) * 1.01, name  # stored blocks: level 0
