"""One archive per request_id: duplicates re-send the notification, live leases are respected,
dead workers' uploads are cleaned up, and the status document tells producers how it went."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from archiver import queue, status, worker
from archiver.models import utc_timestamp
from tests.conftest import Stack
from tests.faultproxy import FaultProxy
from tests.zipcheck import check_archive


def archive_etag(stack: Stack, key: str) -> str:
    return stack.clients.s3.head_object(Bucket=stack.destination_bucket, Key=key)["ETag"]


def test_same_request_id_twice_yields_one_archive(stack: Stack, tmp_path: Path) -> None:
    """A request_id sent twice builds once; the second message re-sends the notification and is deleted."""
    stack.put("a.txt", b"alpha")
    request = {"request_id": "twice", "files": [{"source": "a.txt"}], "metadata": {"n": 1}}
    stack.send(request)
    w = worker.connect(stack.settings())
    worker.run(w, burst=True)
    key = "download/twice/twice.zip"
    first_etag = archive_etag(stack, key)
    first_status = stack.status("twice")

    stack.send(request)
    worker.run(w, burst=True)

    notes = stack.notifications(2)
    assert [n["status"] for n in notes] == ["completed", "completed"]
    assert notes[0]["archive"]["key"] == notes[1]["archive"]["key"] == key
    assert notes[1]["metadata"] == {"n": 1}
    assert stack.archive_keys() == [key]
    assert archive_etag(stack, key) == first_etag  # not rebuilt
    assert stack.status("twice")["started_at"] == first_status["started_at"]
    assert stack.queue_depth() == 0
    check_archive(stack.download(key), {"a.txt": b"alpha"}, tmp_path)


def test_same_message_delivered_twice_yields_one_archive(stack: Stack) -> None:
    """Two deliveries of one SQS message (a visibility lapse) give one archive and leave no message."""
    stack.put("a.txt", b"alpha")
    stack.send({"files": [{"source": "a.txt"}]})
    sqs = stack.clients.sqs
    first = queue.receive(sqs, stack.source_url, wait_seconds=1, visibility_timeout=0)
    second = queue.receive(sqs, stack.source_url, wait_seconds=1, visibility_timeout=30)
    assert first is not None and second is not None
    assert first.message_id == second.message_id
    assert second.receive_count == 2

    w = worker.connect(stack.settings())
    worker.handle(w, first)
    worker.handle(w, second)

    notes = stack.notifications(2)
    assert [n["status"] for n in notes] == ["completed", "completed"]
    assert stack.archive_keys() == [f"download/{first.message_id}/{first.message_id}.zip"]
    assert stack.queue_depth() == 0


def test_a_live_lease_defers_the_duplicate(stack: Stack) -> None:
    """While another worker's status document is fresh, a duplicate is released, not built; once the
    lease is stale the request is built."""
    stack.put("a.txt", b"alpha")
    held = {
        "request_id": "leased",
        "status": "processing",
        "worker": "another-host-1-abcdef01",
        "updated_at": utc_timestamp(),
    }
    key = "download/leased/status.json"
    stack.clients.s3.put_object(Bucket=stack.destination_bucket, Key=key, Body=json.dumps(held).encode())
    stack.send({"request_id": "leased", "files": [{"source": "a.txt"}]})
    w = worker.connect(stack.settings())
    worker.run(w, burst=True)
    assert stack.archive_keys() == []
    assert stack.queue_depth() == 1  # released for later, not deleted
    assert stack.notifications(1, max_polls=1) == []

    stale = {**held, "updated_at": "2020-01-01T00:00:00Z"}
    stack.clients.s3.put_object(Bucket=stack.destination_bucket, Key=key, Body=json.dumps(stale).encode())
    stack.clients.sqs.purge_queue(QueueUrl=stack.source_url)
    stack.send({"request_id": "leased", "files": [{"source": "a.txt"}]})
    worker.run(w, burst=True)
    assert stack.archive_keys() == ["download/leased/leased.zip"]
    assert stack.notifications(1)[0]["status"] == "completed"


@pytest.mark.parametrize("seen", ["absent", "stale"])
def test_of_two_workers_reading_the_same_status_one_builds(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, seen: str
) -> None:
    """The lease is taken with a conditional write: a worker whose read is overtaken by another worker's
    claim (here: that claim and its upload were made between the read and the write) releases the
    message, and neither builds nor aborts the winner's upload."""
    stack.put("a.txt", b"alpha")
    key, status_key = "download/raced/raced.zip", "download/raced/status.json"
    s3 = stack.clients.s3
    before = None
    if seen == "stale":
        old = {"request_id": "raced", "status": "failed", "updated_at": "2020-01-01T00:00:00Z"}
        s3.put_object(Bucket=stack.destination_bucket, Key=status_key, Body=json.dumps(old).encode())
        before = status.read_stored(s3, bucket=stack.destination_bucket, archive_key=key)
    # The winner's claim and upload, made after this worker's read.
    winner = {
        "request_id": "raced",
        "status": "processing",
        "worker": "winner-1",
        "updated_at": utc_timestamp(),
    }
    s3.put_object(Bucket=stack.destination_bucket, Key=status_key, Body=json.dumps(winner).encode())
    upload = s3.create_multipart_upload(Bucket=stack.destination_bucket, Key=key)
    read_then = before or status.Stored(document=None, etag=None)
    monkeypatch.setattr(status, "read_stored", lambda *_, **__: read_then)

    stack.send({"request_id": "raced", "files": [{"source": "a.txt"}]})
    worker.run(worker.connect(stack.settings()), burst=True)
    assert stack.status("raced")["worker"] == "winner-1"
    assert stack.incomplete_uploads() == [key]  # the winner's upload, untouched
    assert stack.archive_keys() == []
    assert stack.queue_depth() == 1  # released for later
    s3.abort_multipart_upload(Bucket=stack.destination_bucket, Key=key, UploadId=upload["UploadId"])


def test_claim_is_conditional(stack: Stack) -> None:
    """A claim succeeds on the status it read (or on none), and fails once it changed."""
    s3, bucket, key = stack.clients.s3, stack.destination_bucket, "download/claim/claim.zip"
    progress = status.Progress()

    def claim(seen: status.Stored) -> status.Lease | None:
        terms = status.LeaseTerms(message_id="m-1", digest="d", seconds=30)
        return status.claim(
            s3, bucket=bucket, archive_key=key, request_id="claim", progress=progress, seen=seen, terms=terms
        )

    absent = status.Stored(document=None, etag=None)
    assert claim(absent)
    assert not claim(absent)  # someone claimed since
    current = status.read_stored(s3, bucket=bucket, archive_key=key)
    assert current.document is not None and current.document["status"] == "processing"
    progress.files_done = 1  # so the document, and its ETag, change
    assert claim(current)
    assert not claim(current)  # the ETag it names is gone


def test_a_server_without_conditional_writes_still_builds(stack: Stack, fault_proxy: FaultProxy) -> None:
    """An S3-compatible server that answers a conditional PutObject with 501 gets the lease written
    plainly (the lease is then read-then-write, as without conditions), and the request completes."""
    stack.put("a.txt", b"alpha")
    fault_proxy.configure(
        rate=1.0,
        kinds=("501",),
        match=lambda seen: seen.operation == "PutObject" and "if-none-match" in seen.headers,
    )
    stack.send({"request_id": "plain", "files": [{"source": "a.txt"}]})
    worker.run(worker.connect(stack.settings()), burst=True)
    assert [n["status"] for n in stack.notifications(1)] == ["completed"]
    puts = fault_proxy.requests_matching(operation="PutObject", path_contains="/download/plain/status.json")
    assert [p.fault for p in puts[:2]] == ["501", None]
    assert "if-none-match" not in puts[1].headers


def test_a_dead_workers_upload_is_aborted(stack: Stack) -> None:
    """An incomplete multipart upload left for the same key by a killed worker is aborted on retry."""
    key = "download/dead/dead.zip"
    s3 = stack.clients.s3
    upload = s3.create_multipart_upload(Bucket=stack.destination_bucket, Key=key)
    s3.upload_part(
        Bucket=stack.destination_bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1024
    )
    stack.put("a.txt", b"alpha")
    stack.send({"request_id": "dead", "files": [{"source": "a.txt"}]})
    worker.run(worker.connect(stack.settings()), burst=True)
    assert stack.notifications(1)[0]["status"] == "completed"
    assert stack.incomplete_uploads() == []


def test_status_document_tracks_the_request(stack: Stack) -> None:
    """status.json ends `completed` with full progress and the notification, or `failed` with the error."""
    stack.put("a.txt", b"alpha" * 1000)
    stack.put("b.txt", b"beta" * 1000)
    stack.send({"request_id": "st-ok", "files": [{"source": "a.txt"}, {"source": "b.txt"}]})
    stack.send({"request_id": "st-bad", "files": [{"source": "a.txt"}, {"source": "missing.txt"}]})
    worker.run(worker.connect(stack.settings()), burst=True)

    done = stack.status("st-ok")
    assert done["status"] == "completed"
    assert done["files_done"] == done["files_total"] == 2
    assert done["bytes_done"] == done["bytes_total"] == 9000
    assert done["notification"]["archive"]["key"] == "download/st-ok/st-ok.zip"
    assert done["error"] is None
    failed = stack.status("st-bad")
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "source_not_found"
