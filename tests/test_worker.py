"""The daemon end to end over real HTTP: request on the queue -> archive in S3 -> notification -> delete."""

from __future__ import annotations

import io
import json
import os
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest

from archiver import worker
from archiver.settings import Settings
from tests.conftest import Stack
from tests.zipcheck import check_archive


def run_burst(settings: Settings) -> None:
    assert worker.run(worker.connect(settings), burst=True) == 0


def only_notification(stack: Stack) -> dict[str, Any]:
    notifications = stack.notifications(1)
    assert len(notifications) == 1, notifications
    return notifications[0]


def test_contract_example_end_to_end(stack: Stack, tmp_path: Path) -> None:
    """The contract's example becomes one valid archive, a completed notification, and no message left."""
    images = {name: os.urandom(50_000 + i) for i, name in enumerate(["uuid1.png", "uuid2.png", "uuid3.png"])}
    readme = b"hello archive\n" * 1000
    stack.put("example-directory/uuid1.png", images["uuid1.png"])
    stack.put("example-directory/uuid2.png", images["uuid2.png"], bucket=stack.other_bucket)
    stack.put("example-directory/uuid3.png", images["uuid3.png"])
    stack.put("example-directory/readme.txt", readme)
    message_id = stack.send(
        {
            "files": [
                {"source": "example-directory/uuid1.png", "destination": "album_1"},
                {
                    "source": f"s3://{stack.other_bucket}/example-directory/uuid2.png",
                    "destination": "album_1",
                },
                {"source": "example-directory/uuid3.png", "destination": "album_2", "name": "cover.png"},
                {"source": "example-directory/readme.txt"},
            ],
            "metadata": {"user_email": "someone@example.com", "nested": {"n": [1, 2]}},
        }
    )
    run_burst(stack.settings())

    note = only_notification(stack)
    key = f"download/{message_id}/{message_id}.zip"
    assert note["status"] == "completed"
    assert note["request_id"] == message_id
    assert note["metadata"] == {"user_email": "someone@example.com", "nested": {"n": [1, 2]}}
    assert note["archive"]["bucket"] == stack.destination_bucket
    assert note["archive"]["key"] == key
    assert note["archive"]["entries"] == 4
    assert note["skipped"] == [] and note["renamed"] == []
    assert note["created_at"].endswith("Z")

    with urllib.request.urlopen(note["archive"]["url"], timeout=30) as response:  # the presigned link works
        data = response.read()
    assert data == stack.download(key)
    assert note["archive"]["size"] == len(data)
    check_archive(
        data,
        {
            "album_1/uuid1.png": images["uuid1.png"],
            "album_1/uuid2.png": images["uuid2.png"],
            "album_2/cover.png": images["uuid3.png"],
            "readme.txt": readme,
        },
        tmp_path,
    )
    head = stack.clients.s3.head_object(Bucket=stack.destination_bucket, Key=key)
    assert head["Metadata"] == {"request-id": message_id, "entries": "4"}
    assert head["ContentType"] == "application/zip"
    assert stack.queue_depth() == 0
    assert stack.incomplete_uploads() == []


def test_names_folders_duplicates_and_timestamps(stack: Stack, tmp_path: Path) -> None:
    """Non-ASCII names, folders and renamed duplicates pass every reader; mtimes are LastModified."""
    bodies = {
        "voyages/café.txt": "crème brûlée\n".encode() * 300,
        "東京/夜景.jpg": os.urandom(20_000),
        "x/photo.jpg": os.urandom(10_000),
        "y/Photo.jpg": os.urandom(10_001),
    }
    for key, body in bodies.items():
        stack.put(key, body)
    stack.send(
        {
            "request_id": "names-1",
            "archive_name": "été 2026.zip",
            "files": [
                {"source": "voyages/café.txt", "destination": "notes/été"},
                {"source": "東京/夜景.jpg", "destination": "写真"},
                {"source": "x/photo.jpg"},
                {"source": "y/Photo.jpg"},
            ],
        }
    )
    run_burst(stack.settings())

    note = only_notification(stack)
    assert note["status"] == "completed", note
    assert note["renamed"] == [{"source": "y/Photo.jpg", "name": "Photo (1).jpg"}]
    data = stack.download("download/names-1/été 2026.zip")
    check_archive(
        data,
        {
            "notes/été/café.txt": bodies["voyages/café.txt"],
            "写真/夜景.jpg": bodies["東京/夜景.jpg"],
            "photo.jpg": bodies["x/photo.jpg"],
            "Photo (1).jpg": bodies["y/Photo.jpg"],
        },
        tmp_path,
    )
    modified = stack.clients.s3.head_object(Bucket=stack.source_bucket, Key="x/photo.jpg")["LastModified"]
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        # DOS times have 2-second resolution; the extended timestamp field carries the exact second.
        year, month, day, hour, minute, second = modified.timetuple()[:6]
        assert archive.getinfo("photo.jpg").date_time == (year, month, day, hour, minute, second // 2 * 2)


def test_compression_follows_content(stack: Stack) -> None:
    """Text is deflated; media with an S3 CRC-32 is STORED without data descriptor (tests/test_media.py
    has every case, level 0 included)."""
    text = b"the same line again and again\n" * 20_000
    media = os.urandom(200_000)
    stack.put("doc.txt", text)
    stack.put("with-crc.png", media, ChecksumAlgorithm="CRC32")
    stack.send({"request_id": "compress", "files": [{"source": k} for k in ["doc.txt", "with-crc.png"]]})
    run_burst(stack.settings())

    assert only_notification(stack)["status"] == "completed"
    with zipfile.ZipFile(io.BytesIO(stack.download("download/compress/compress.zip"))) as archive:
        doc, stored = archive.getinfo("doc.txt"), archive.getinfo("with-crc.png")
        assert doc.compress_type == zipfile.ZIP_DEFLATED and doc.compress_size < len(text) // 10
        assert stored.compress_type == zipfile.ZIP_STORED
        assert not stored.flag_bits & 0x08, "STORED entries must not use a data descriptor"
        assert zlib.crc32(media) == stored.CRC
        assert archive.read("with-crc.png") == media


def test_skip_lists_missing_sources(stack: Stack, tmp_path: Path) -> None:
    """With on_missing=skip a missing key is left out and listed as skipped; the rest is archived."""
    stack.put("here.txt", b"present")
    stack.send(
        {
            "request_id": "skip-1",
            "on_missing": "skip",
            "files": [{"source": "here.txt"}, {"source": "gone.txt"}],
        }
    )
    run_burst(stack.settings())

    note = only_notification(stack)
    assert note["status"] == "completed"
    assert note["skipped"] == [{"source": "gone.txt", "reason": "not_found"}]
    assert note["archive"]["entries"] == 1
    check_archive(stack.download("download/skip-1/skip-1.zip"), {"here.txt": b"present"}, tmp_path)


BAD_REQUESTS: list[tuple[str, str | dict[str, Any], str, str]] = [
    ("invalid JSON", '{"files": [', "invalid_request", "not valid JSON"),
    ("unknown field", {"file": [{"source": "a.txt"}], "request_id": "bad-1"}, "invalid_request", "file"),
    ("empty files", {"files": [], "request_id": "bad-2"}, "invalid_request", "at least 1"),
    ("zip slip", {"files": [{"source": "a.txt", "destination": "../../etc"}]}, "invalid_request", "'..'"),
    (
        "absolute name",
        {"files": [{"source": "a.txt", "destination": "/root"}]},
        "invalid_request",
        "absolute",
    ),
    (
        "forbidden bucket",
        {"files": [{"source": "s3://not-allowed/a.txt"}]},
        "forbidden_source",
        "not-allowed",
    ),
    (
        "missing source",
        {"files": [{"source": "a.txt"}, {"source": "nope.txt"}]},
        "source_not_found",
        "nope.txt",
    ),
    (
        "all missing, skip",
        {"on_missing": "skip", "files": [{"source": "nope.txt"}]},
        "source_not_found",
        "none",
    ),
]


@pytest.mark.parametrize(("case", "body", "code", "reason"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_fail_permanently_without_archive(
    stack: Stack, case: str, body: str | dict[str, Any], code: str, reason: str
) -> None:
    """Each bad input gives one failed notification with the right code and reason, no archive, no retry."""
    stack.put("a.txt", b"a")
    if isinstance(body, dict):
        body = {**body, "metadata": {"case": case}}
    message_id = stack.send(body)
    run_burst(stack.settings())

    note = only_notification(stack)
    assert note["status"] == "failed"
    assert note["error"]["code"] == code
    assert reason in note["error"]["message"]
    assert note["error"]["retryable"] is False
    expected_id = body.get("request_id", message_id) if isinstance(body, dict) else message_id
    assert note["request_id"] == expected_id
    assert note["metadata"] == ({"case": case} if isinstance(body, dict) else {})
    assert stack.archive_keys() == []
    assert stack.incomplete_uploads() == []
    assert stack.queue_depth() == 0  # deleted: a permanent failure is not retried


def test_archive_base_url_makes_cloudfront_links(stack: Stack) -> None:
    """With ARCHIVE_BASE_URL set the link is base URL + key (escaped), not a presigned URL."""
    stack.put("a.txt", b"a")
    stack.send({"request_id": "cdn-1", "archive_name": "my photos.zip", "files": [{"source": "a.txt"}]})
    run_burst(stack.settings(archive_base_url="https://d111111abcdef8.cloudfront.net/"))
    note = only_notification(stack)
    assert note["archive"]["url"] == "https://d111111abcdef8.cloudfront.net/download/cdn-1/my%20photos.zip"


def test_worker_subprocess_burst(stack: Stack, tmp_path: Path) -> None:
    """`archiver worker --burst` as a real process archives every queued request, logs JSON, exits 0."""
    for index in range(3):
        stack.put(f"k{index}.bin", bytes([index]) * 1000)
        stack.send({"request_id": f"proc-{index}", "files": [{"source": f"k{index}.bin"}]})
    done = stack.run_burst_process()
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    finished = [e for e in events if e["event"] == "request.done"]
    assert sorted(e["request_id"] for e in finished) == ["proc-0", "proc-1", "proc-2"]
    assert all(e["outcome"] == "completed" and e["archive_key"] and e["message_id"] for e in finished)
    notes = stack.notifications(3)
    assert sorted(n["request_id"] for n in notes) == ["proc-0", "proc-1", "proc-2"]
    for index in range(3):
        check_archive(
            stack.download(f"download/proc-{index}/proc-{index}.zip"),
            {f"k{index}.bin": bytes([index]) * 1000},
            tmp_path,
        )
    assert Path(stack.health_file).exists()


def test_release_delay_grows_with_deliveries() -> None:
    """A failed message comes back after 2, 4, 8 … seconds, never later than the visibility timeout."""
    assert [worker.release_delay(n, 120) for n in (1, 2, 3, 6, 7, 20)] == [2, 4, 8, 64, 120, 120]
