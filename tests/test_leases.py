"""Leases and duplicates: one request_id is built by one worker at a time, a worker that lost its lease
stops without touching the new holder's status or upload, and a duplicate gets the right answer: the
first request's archive, a deferral until the lease ends, or a refusal when the body differs."""

from __future__ import annotations

import io
import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from archiver import queue, worker
from archiver.logs import configure_logging
from archiver.models import utc_timestamp
from tests.conftest import Stack, wait_for
from tests.faultproxy import FaultProxy, Seen
from tests.zipcheck import check_archive

STATUS = "download/{0}/status.json"
LEASE_SECONDS = 8


def put_status(stack: Stack, request_id: str, **fields: Any) -> None:
    document = {
        "request_id": request_id,
        "status": "processing",
        "worker": "another-host-7-0badcafe",
        **fields,
    }
    stack.clients.s3.put_object(
        Bucket=stack.destination_bucket, Key=STATUS.format(request_id), Body=json.dumps(document).encode()
    )


def in_seconds(seconds: float) -> str:
    return utc_timestamp(datetime.now(UTC) + timedelta(seconds=seconds))


def events(logs: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in logs.getvalue().splitlines()]


def capture_logs() -> io.StringIO:
    logs = io.StringIO()
    configure_logging(debug=False, dev_mode=False, stream=logs)
    return logs


def visible(stack: Stack) -> int:
    attributes = stack.clients.sqs.get_queue_attributes(
        QueueUrl=stack.source_url, AttributeNames=["ApproximateNumberOfMessages"]
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"])


# ------------------------------------------------------------------------------ a worker that lost its lease


@pytest.mark.parametrize("winner", ["building", "completed"])
def test_a_worker_that_lost_its_lease_leaves_the_new_holders_work_alone(
    stack: Stack, fault_proxy: FaultProxy, tmp_path: Path, winner: str
) -> None:
    """Worker A stalls mid-archive (its source GET held at the proxy) while its lease is taken over by B.
    When A resumes it finds the status document changed and stops: it writes no status over B's (not
    `queued` over B's `completed`), aborts nothing of B's, builds no archive, and sends no notice."""
    stack.put("a.txt", b"alpha" * 1000)
    request = {"request_id": "stalled", "files": [{"source": "a.txt"}]}
    stack.send(request)
    hold = threading.Event()

    def source_get(seen: Seen) -> bool:
        return seen.operation == "GetObject" and seen.path.startswith(f"/{stack.source_bucket}/")

    fault_proxy.configure(match=source_get, hold=hold)
    logs = capture_logs()
    a = worker.connect(stack.settings())
    message = queue.receive(stack.clients.sqs, stack.source_url, wait_seconds=1, visibility_timeout=30)
    assert message is not None
    thread = threading.Thread(target=worker.handle, args=(a, message))
    thread.start()
    wait_for(lambda: fault_proxy.requests_matching(where=source_get), timeout=30, what="A's source GET")

    # B takes the lease (A's looked dead), starts its own upload, and in one case completes.
    s3, key = stack.clients.s3, "download/stalled/stalled.zip"
    b_upload = s3.create_multipart_upload(Bucket=stack.destination_bucket, Key=key)["UploadId"]
    put_status(stack, "stalled", worker="B", lease_id="b-lease", lease_expires_at=in_seconds(300))
    if winner == "completed":
        s3.abort_multipart_upload(Bucket=stack.destination_bucket, Key=key, UploadId=b_upload)
        s3.put_object(
            Bucket=stack.destination_bucket, Key=key, Body=b"B's archive", Metadata={"request-id": "x"}
        )
        put_status(stack, "stalled", worker="B", status="completed", lease_id="b-lease")
    else:
        # A notices at its next heartbeat tick, while still stalled.
        wait_for(
            lambda: any(e["event"] == "status.lease_lost" for e in events(logs)),
            timeout=30,
            what="A to notice the lost lease",
        )
    b_document = stack.status("stalled")
    hold.set()
    thread.join(timeout=60)

    assert stack.status("stalled") == b_document  # not a byte of B's status rewritten
    if winner == "completed":
        assert stack.download(key) == b"B's archive"
        assert stack.incomplete_uploads() == []
    else:
        assert stack.archive_keys() == []
        uploads = s3.list_multipart_uploads(Bucket=stack.destination_bucket).get("Uploads", [])
        assert [u["UploadId"] for u in uploads] == [b_upload]  # A's own upload aborted, B's untouched
        s3.abort_multipart_upload(Bucket=stack.destination_bucket, Key=key, UploadId=b_upload)
    assert stack.notifications(1, max_polls=1) == []
    (done,) = [e for e in events(logs) if e["event"] == "request.done"]
    assert done["outcome"] == "deferred"


def test_the_lease_is_judged_by_the_holders_expiry_not_the_readers_timeout(stack: Stack) -> None:
    """A dead worker that ran with a 10 s lease: 15 s after its last write, a worker whose own
    VISIBILITY_TIMEOUT is 120 s takes over at once instead of waiting 120 s."""
    stack.put("a.txt", b"alpha")
    put_status(stack, "expired", updated_at=in_seconds(-15), lease_expires_at=in_seconds(-5), lease_id="dead")
    stack.send({"request_id": "expired", "files": [{"source": "a.txt"}]})
    worker.run(worker.connect(stack.settings(visibility_timeout=120)), burst=True)
    assert [n["status"] for n in stack.notifications(1)] == ["completed"]
    document = stack.status("expired")
    assert document["status"] == "completed"
    assert document["lease_expires_at"] is None


def test_a_live_lease_hides_the_duplicate_until_it_ends(stack: Stack, tmp_path: Path) -> None:
    """A duplicate of a request whose lease ends in 8 s is released until then, judged by the message's
    own visibility: not visible again before the lease's end (released with the 2 s backoff instead,
    it would be), and visible soon after (not after the reader's 30 s visibility timeout), when the
    next worker builds it."""
    stack.put("a.txt", b"alpha")
    lease_end = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=LEASE_SECONDS)
    put_status(
        stack,
        "leased",
        updated_at=utc_timestamp(),
        lease_expires_at=utc_timestamp(lease_end),
        lease_id="live",
        message_id="m-holder",
    )
    holder = stack.status("leased")
    message_id = stack.send({"request_id": "leased", "files": [{"source": "a.txt"}]})
    logs = capture_logs()
    w = worker.connect(stack.settings())
    worker.run(w, burst=True)
    (deferred,) = [e for e in events(logs) if e["event"] == "request.deferred"]
    assert LEASE_SECONDS - 1 <= deferred["retry_after"] <= LEASE_SECONDS + 2

    wait_for(lambda: visible(stack), timeout=LEASE_SECONDS + 15, what="the message back after the lease")
    seen_at = datetime.now(UTC)
    assert seen_at >= lease_end, f"visible at {seen_at}, before the lease ended at {lease_end}"
    assert stack.status("leased") == holder  # the holder's document, untouched until then
    worker.run(w, burst=True)
    assert [n["status"] for n in stack.notifications(1)] == ["completed"]
    assert stack.status("leased")["message_id"] == message_id
    check_archive(stack.download("download/leased/leased.zip"), {"a.txt": b"alpha"}, tmp_path)


@pytest.mark.parametrize("holder", ["another message", "this message"])
def test_a_busy_duplicate_is_never_reported_as_failed(stack: Stack, holder: str) -> None:
    """On its last delivery, a duplicate of a request another worker is building gets no `failed`
    notice (no worker names for producers). Another message for the request_id is deleted, since the
    holder answers for it; the holder's own message (its visibility lapsed) is only released."""
    stack.put("a.txt", b"alpha")
    message_id = stack.send({"request_id": "busy", "files": [{"source": "a.txt"}]})
    for _ in range(2):  # deliveries 1 and 2 lapse; the worker gets delivery 3 of 3, the last
        assert queue.receive(stack.clients.sqs, stack.source_url, wait_seconds=1, visibility_timeout=0)
    holder_message = "m-original" if holder == "another message" else message_id
    put_status(stack, "busy", lease_expires_at=in_seconds(300), lease_id="live", message_id=holder_message)
    worker.run(worker.connect(stack.settings()), burst=True)
    assert stack.notifications(1, max_polls=2) == []
    assert stack.queue_depth(stack.dlq_url) == 0
    assert stack.queue_depth() == (0 if holder == "another message" else 1)


def test_a_claim_that_fails_builds_nothing_and_writes_nothing(stack: Stack, fault_proxy: FaultProxy) -> None:
    """The lease could not be written (S3 answers 500 to it, retries included): without it nothing is
    built, no upload is touched, and the message is released."""
    stack.put("a.txt", b"alpha")
    fault_proxy.configure(
        rate=1.0,
        kinds=("500",),
        match=lambda seen: seen.operation == "PutObject" and seen.path.endswith("/status.json"),
    )
    stack.send({"request_id": "unclaimed", "files": [{"source": "a.txt"}]})
    worker.run(worker.connect(stack.settings()), burst=True)
    assert fault_proxy.requests_matching(operation="CreateMultipartUpload") == []
    assert fault_proxy.requests_matching(operation="AbortMultipartUpload") == []
    assert [p.fault for p in fault_proxy.requests_matching(operation="PutObject")] == ["500"] * len(
        fault_proxy.requests_matching(operation="PutObject")
    )
    assert stack.queue_depth() == 1
    assert stack.notifications(1, max_polls=1) == []


def test_a_status_that_cannot_be_read_is_not_overwritten(stack: Stack, fault_proxy: FaultProxy) -> None:
    """Reading status.json fails (500, retries included): the worker releases the message and writes no
    `queued` over what may be another worker's live lease."""
    stack.put("a.txt", b"alpha")
    put_status(stack, "unread", lease_expires_at=in_seconds(300), lease_id="live")
    before = stack.status("unread")
    fault_proxy.configure(
        rate=1.0,
        kinds=("500",),
        match=lambda seen: seen.operation == "GetObject" and seen.path.endswith("/status.json"),
    )
    stack.send({"request_id": "unread", "files": [{"source": "a.txt"}]})
    worker.run(worker.connect(stack.settings()), burst=True)
    assert fault_proxy.requests_matching(operation="PutObject") == []
    assert stack.status("unread") == before
    assert stack.queue_depth() == 1


# ------------------------------------------------------------------------------ answers to a duplicate


def test_an_archive_head_error_is_not_taken_for_a_missing_archive(
    stack: Stack, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """A completed request whose sources the producer deleted is sent again while the archive's HEAD
    answers 503: the message is released, not rebuilt into `failed / source_not_found`; once S3 answers,
    the duplicate gets the completed notification."""
    stack.put("a.txt", b"alpha")
    request = {"request_id": "kept", "files": [{"source": "a.txt"}], "metadata": {"n": 1}}
    stack.send(request)
    w = worker.connect(stack.settings())
    worker.run(w, burst=True)
    assert [n["status"] for n in stack.notifications(1)] == ["completed"]
    stack.clients.s3.delete_object(Bucket=stack.source_bucket, Key="a.txt")

    fault_proxy.configure(
        rate=1.0,
        kinds=("503",),
        match=lambda seen: seen.operation == "HeadObject" and seen.path.endswith("/kept/kept.zip"),
    )
    stack.send(request)
    worker.run(worker.connect(stack.settings()), burst=True)
    assert stack.notifications(1, max_polls=1) == []
    assert stack.status("kept")["status"] == "completed"
    assert stack.queue_depth() == 1

    fault_proxy.configure()
    stack.clients.sqs.purge_queue(QueueUrl=stack.source_url)
    stack.send(request)
    worker.run(worker.connect(stack.settings()), burst=True)
    (note,) = stack.notifications(1)
    assert (note["status"], note["metadata"]) == ("completed", {"n": 1})
    check_archive(stack.download("download/kept/kept.zip"), {"a.txt": b"alpha"}, tmp_path)


def test_a_request_id_reused_for_another_request_is_refused(stack: Stack) -> None:
    """Like an idempotency key: the same request_id with a different body is `invalid_request`, and the
    second producer never receives the first one's link or metadata. The same body (keys in another
    order) is a duplicate and gets the first notification again."""
    stack.put("a.txt", b"alpha")
    stack.put("b.txt", b"beta")
    first = {"request_id": "reused", "files": [{"source": "a.txt"}], "metadata": {"email": "a@example.com"}}
    stack.send(first)
    w = worker.connect(stack.settings())
    worker.run(w, burst=True)
    (done,) = stack.notifications(1)
    assert done["status"] == "completed"
    completed = stack.status("reused")

    stack.send(
        {"request_id": "reused", "files": [{"source": "b.txt"}], "metadata": {"email": "b@example.com"}}
    )
    worker.run(w, burst=True)
    (refused,) = stack.notifications(1)
    assert refused["status"] == "failed"
    assert refused["error"]["code"] == "invalid_request"
    assert "already used for a different request" in refused["error"]["message"]
    assert refused["metadata"] == {"email": "b@example.com"}
    assert "archive" not in refused
    assert stack.status("reused") == completed
    assert stack.archive_keys() == ["download/reused/reused.zip"]

    stack.send(json.dumps(dict(reversed(list(first.items())))))
    worker.run(w, burst=True)
    (again,) = stack.notifications(1)
    assert (again["status"], again["metadata"]) == ("completed", {"email": "a@example.com"})
