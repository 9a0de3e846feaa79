"""The worker against S3 that fails: 5xx, throttling and broken streams injected by `tests.faultproxy`.

The worker's clients go through the proxy (AWS_ENDPOINT_URL points at it when they are made); the
`stack` fixture's clients, made before, talk to moto directly, so set-up and checks see no faults.
"""

from __future__ import annotations

import json
import random
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest
from botocore.config import Config

from archiver import worker
from archiver.settings import MiB
from tests.conftest import Stack, wait_for
from tests.faultproxy import FaultProxy
from tests.zipcheck import check_archive

OWNER = "111122223333"


def drain(stack: Stack) -> list[dict[str, Any]]:
    """Every notification now in the destination queue, deleted as read."""
    sqs, found = stack.clients.sqs, []
    while messages := sqs.receive_message(
        QueueUrl=stack.destination_url, MaxNumberOfMessages=10, WaitTimeSeconds=0
    ).get("Messages", []):
        for message in messages:
            found.append(json.loads(message["Body"]))
            sqs.delete_message(QueueUrl=stack.destination_url, ReceiptHandle=message["ReceiptHandle"])
    return found


def depth(stack: Stack, url: str) -> tuple[int, int]:
    """(visible, in flight) messages of a queue."""
    attributes = stack.clients.sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]), int(
        attributes["ApproximateNumberOfMessagesNotVisible"]
    )


def run_passes(
    work: worker.Worker, stack: Stack, done: Callable[[list[dict[str, Any]]], bool], *, timeout: float
) -> list[dict[str, Any]]:
    """Burst passes until `done(notifications so far)`. A released message is invisible for a while and a
    pass ends at the first empty receive (1 s long poll), so one pass is not enough; each pass bounds
    the loop's rate."""
    notes: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while not done(notes):
        assert time.monotonic() < deadline, f"gave up after {timeout}s with {len(notes)} notifications"
        assert worker.run(work, burst=True) == 0
        notes += drain(stack)
    return notes


@pytest.mark.parametrize("prefetch_bytes", [None, MiB], ids=["small-one-get", "big-headed"])
def test_cut_get_is_resumed_with_range_and_if_match(
    stack: Stack, fault_proxy: FaultProxy, tmp_path: Path, prefetch_bytes: int | None
) -> None:
    """A GET cut mid-body is resumed with Range from the byte it stopped at, for the same version: a big
    source HEADed first (PREFETCH_BYTES=1 MiB makes 3 MiB big: its first GET is dropped after the answer,
    then it is streamed) with If-Match on the HEAD's ETag; a small source read by its one GET by
    object_store, which resumes it itself and compares the answer's ETag with the first one's (a changed
    source: tests/test_small_sources.py)."""
    body = random.Random(1).randbytes(3 * MiB + 12_345)
    stack.put("big/cut.bin", body)
    etag = stack.clients.s3.head_object(Bucket=stack.source_bucket, Key="big/cut.bin")["ETag"]
    big = prefetch_bytes is not None
    fault_proxy.configure(
        rate=1.0,
        kinds=("cut",),
        service="s3",
        limit=1,
        cut_after=MiB,
        # The read that is cut: the small source's only GET; the big one's stream, which has If-Match.
        match=lambda r: (
            r.operation == "GetObject"
            and r.path.endswith("/big/cut.bin")
            and ("if-match" in r.headers) == big
        ),
    )
    stack.send({"request_id": "cut-1", "files": [{"source": "big/cut.bin"}]})
    settings = stack.settings(prefetch_bytes=prefetch_bytes) if big else stack.settings()
    assert worker.run(worker.connect(settings), burst=True) == 0

    notes = drain(stack)
    assert [n["status"] for n in notes] == ["completed"], notes
    check_archive(stack.download("download/cut-1/cut-1.zip"), {"cut.bin": body}, tmp_path)
    gets = fault_proxy.requests_matching(operation="GetObject", path_contains="big/cut.bin")
    heads = fault_proxy.requests_matching(operation="HeadObject", path_contains="big/cut.bin")
    assert len(heads) == int(big)
    if big:
        probe, *gets = gets
        assert probe.fault is None and "if-match" not in probe.headers
    assert [g.fault for g in gets] == ["cut", None]
    assert "range" not in gets[0].headers
    start = int(gets[1].headers["range"].removeprefix("bytes=").split("-")[0])
    assert gets[1].headers["range"] in (f"bytes={start}-", f"bytes={start}-{len(body) - 1}")
    assert 0 < start <= MiB  # what the client got before the cut, less at most a half-read chunk
    assert gets[0].headers.get("if-match") == (etag if big else None)
    assert gets[1].headers.get("if-match") == (etag if big else None)
    assert stack.incomplete_uploads() == []


@pytest.mark.slow
def test_ten_percent_s3_faults_every_request_completes(
    stack: Stack, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """With 10% of S3 requests failing (500, 503, cut streams), 50 requests all complete byte-correct."""
    rng = random.Random(2026)
    objects = {
        f"f/{index:02}.{'bin' if index % 3 else 'txt'}": (
            rng.randbytes(300 * 1024 + index) if index % 4 == 0 else b"line %d\n" % index * (index * 40 + 1)
        )
        for index in range(40)
    }
    for key, data in objects.items():
        stack.put(key, data)
    expected: dict[str, dict[str, bytes]] = {}
    for number in range(50):
        keys = rng.sample(sorted(objects), rng.randint(1, 3))
        expected[f"many-{number}"] = {key.rsplit("/", 1)[1]: objects[key] for key in keys}
        stack.send({"request_id": f"many-{number}", "files": [{"source": key} for key in keys]})
    fault_proxy.configure(rate=0.1, service="s3", seed=7)
    work = worker.connect(stack.settings(visibility_timeout=10))

    notes = run_passes(work, stack, lambda notes: len(notes) >= 50, timeout=240)

    faults = [r.fault for r in fault_proxy.requests_matching(service="s3") if r.fault]
    assert {"500", "503", "cut"} <= set(faults), faults  # the mix really happened
    assert sorted(n["request_id"] for n in notes) == sorted(expected)
    assert [n for n in notes if n["status"] != "completed"] == []
    for request_id, entries in expected.items():
        check_archive(stack.download(f"download/{request_id}/{request_id}.zip"), entries, tmp_path)
    assert depth(stack, stack.source_url) == (0, 0)
    assert depth(stack, stack.dlq_url) == (0, 0)
    assert stack.incomplete_uploads() == []


def test_lost_create_response_leaves_no_incomplete_upload(stack: Stack, fault_proxy: FaultProxy) -> None:
    """A CreateMultipartUpload whose response is lost (then retried) leaves no incomplete upload behind."""
    stack.put("a.txt", b"a" * 1000)
    fault_proxy.configure(
        rate=1.0, kinds=("cut",), limit=1, match=lambda r: r.operation == "CreateMultipartUpload"
    )
    stack.send({"request_id": "lost-create", "files": [{"source": "a.txt"}]})
    assert worker.run(worker.connect(stack.settings()), burst=True) == 0

    assert [n["status"] for n in drain(stack)] == ["completed"]
    creates = fault_proxy.requests_matching(operation="CreateMultipartUpload")
    assert [r.fault for r in creates] == ["cut", None]  # moto made an upload for both
    assert stack.incomplete_uploads() == []


def test_lost_complete_response_still_completes(
    stack: Stack, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """A CompleteMultipartUpload that worked but whose answer was lost counts as done: one archive,
    one completed notification, no failure and no retry of the request."""
    stack.put("a.txt", b"a" * 1000)
    fault_proxy.configure(
        rate=1.0, kinds=("cut",), limit=1, match=lambda r: r.operation == "CompleteMultipartUpload"
    )
    stack.send({"request_id": "lost-complete", "files": [{"source": "a.txt"}]})
    assert worker.run(worker.connect(stack.settings()), burst=True) == 0

    assert [n["status"] for n in drain(stack)] == ["completed"]
    completes = fault_proxy.requests_matching(operation="CompleteMultipartUpload")
    assert completes[0].fault == "cut"
    check_archive(
        stack.download("download/lost-complete/lost-complete.zip"), {"a.txt": b"a" * 1000}, tmp_path
    )
    assert stack.incomplete_uploads() == []
    assert depth(stack, stack.source_url) == (0, 0)


def test_forbidden_bucket_sends_no_s3_request(stack: Stack, fault_proxy: FaultProxy) -> None:
    """A source outside ALLOWED_SOURCE_BUCKETS fails as forbidden_source before any S3 request is sent."""
    stack.put("a.txt", b"a")
    work = worker.connect(stack.settings())
    mark = fault_proxy.mark()
    stack.send({"request_id": "forbidden-1", "files": [{"source": "a.txt"}, {"source": "s3://elsewhere/b"}]})
    assert worker.run(work, burst=True) == 0

    notes = drain(stack)
    assert [(n["status"], n["error"]["code"]) for n in notes] == [("failed", "forbidden_source")]
    assert fault_proxy.requests_matching(service="s3", since=mark) == []
    assert fault_proxy.requests_matching(service="sqs", operation="DeleteMessage", since=mark)


def test_expected_bucket_owner_on_every_s3_request(
    stack: Stack, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """EXPECTED_BUCKET_OWNER goes on every S3 request the worker sends, and never into the archive URL:
    boto3's (HEAD of a big source, its stream, the upload) and obstore's (the one GET of a small source,
    a signed header). PREFETCH_BYTES=32 KiB makes `two.bin` (25.6 kB) big and `one.txt` small."""
    stack.put("one.txt", b"one\n" * 1000)
    stack.put("two.bin", bytes(range(256)) * 100)
    stack.send({"request_id": "owner-1", "files": [{"source": "one.txt"}, {"source": "two.bin"}]})
    settings = stack.settings(expected_bucket_owner=OWNER, prefetch_bytes=32 * 1024)
    assert worker.run(worker.connect(settings), burst=True) == 0

    notes = drain(stack)
    assert [n["status"] for n in notes] == ["completed"], notes
    sent = fault_proxy.requests_matching(service="s3")
    assert {r.operation for r in sent} >= {
        *("HeadObject", "GetObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload")
    }
    small = fault_proxy.requests_matching(service="s3", path_contains="one.txt")
    assert [r.operation for r in small] == ["GetObject"]  # one request, no HEAD
    assert fault_proxy.requests_matching(operation="HeadObject", path_contains="two.bin")
    assert [(r.operation, r.headers.get("x-amz-expected-bucket-owner")) for r in sent] == [
        (r.operation, OWNER) for r in sent
    ]
    url = notes[0]["archive"]["url"]
    assert "expected-bucket-owner" not in url.lower()
    with urllib.request.urlopen(url, timeout=30) as response:  # signed without the header: it works
        data = response.read()
    check_archive(data, {"one.txt": b"one\n" * 1000, "two.bin": bytes(range(256)) * 100}, tmp_path)


@pytest.mark.slow
def test_transient_failures_release_then_fail_then_dead_letter(stack: Stack, fault_proxy: FaultProxy) -> None:
    """Sources that keep failing: released with backoff, `failed` retryable on the last delivery, then DLQ."""
    stack.put("flaky/a.txt", b"a")
    fault_proxy.configure(rate=1.0, kinds=("500", "503"), service="s3", match=lambda r: "/flaky/" in r.path)
    stack.send({"request_id": "flaky-1", "files": [{"source": "flaky/a.txt"}]})
    work = worker.connect(stack.settings(visibility_timeout=30))
    assert work.max_receive_count == 3

    assert worker.run(work, burst=True) == 0
    assert drain(stack) == []
    # Not deleted: released with release_delay(1) = 2 s, long before the 30 s visibility timeout would
    # have brought it back. Timed from the release call as the proxy received it, so a slow machine can
    # make the message look late, never early.
    (release,) = fault_proxy.requests_matching(operation="ChangeMessageVisibility")
    wait_for(lambda: depth(stack, stack.source_url) == (1, 0), timeout=25)
    assert worker.release_delay(1, 30) <= time.monotonic() - release.at < 20

    notes = run_passes(work, stack, lambda notes: bool(notes), timeout=60)
    assert len(notes) == 1
    assert notes[0]["status"] == "failed"
    assert notes[0]["request_id"] == "flaky-1"
    assert notes[0]["error"]["retryable"] is True
    assert notes[0]["error"]["code"] == "internal"
    assert notes[0]["error"]["message"].startswith("gave up after 3 attempts")
    gets = fault_proxy.requests_matching(operation="GetObject", path_contains="/flaky/")
    assert gets and all(g.fault for g in gets)
    # Each attempt's upload, begun before its sources answered, was aborted.
    creates = fault_proxy.requests_matching(operation="CreateMultipartUpload")
    assert len(creates) == len(fault_proxy.requests_matching(operation="AbortMultipartUpload")) == 3
    assert stack.archive_keys() == [] and stack.incomplete_uploads() == []

    # SQS moves the message to the DLQ at the first receive after its last delivery's release.
    def in_dlq() -> bool:
        assert worker.run(work, burst=True) == 0
        return depth(stack, stack.dlq_url) == (1, 0)

    wait_for(in_dlq, timeout=30, interval=0)
    assert depth(stack, stack.source_url) == (0, 0)
    assert drain(stack) == []  # no second notification


def test_injected_errors_parse_like_aws(stack: Stack, fault_proxy: FaultProxy) -> None:
    """Injected 500/503s parse in botocore as S3 InternalError/SlowDown and SQS ServiceUnavailable."""
    session = boto3.session.Session()
    once = Config(retries={"total_max_attempts": 1})
    s3 = session.client("s3", endpoint_url=fault_proxy.url, config=once)
    sqs = session.client("sqs", endpoint_url=fault_proxy.url, config=once)
    stack.put("x.txt", b"x" * 100_000)

    def code(call: Callable[[], Any]) -> tuple[str, int]:
        with pytest.raises(botocore.exceptions.ClientError) as caught:
            call()
        error = caught.value.response
        return error["Error"]["Code"], error["ResponseMetadata"]["HTTPStatusCode"]

    for kind, expected in [("500", ("InternalError", 500)), ("503", ("SlowDown", 503))]:
        fault_proxy.configure(rate=1.0, kinds=(kind,), service="s3")
        assert code(lambda: s3.get_object(Bucket=stack.source_bucket, Key="x.txt")) == expected
        assert code(lambda: s3.head_object(Bucket=stack.source_bucket, Key="x.txt"))[1] == expected[1]
        assert sqs.get_queue_url(QueueName=stack.source_queue)["QueueUrl"]  # SQS untouched
    fault_proxy.configure(rate=1.0, kinds=("503",), service="sqs")
    assert code(lambda: sqs.get_queue_url(QueueName=stack.source_queue)) == ("ServiceUnavailable", 503)

    fault_proxy.configure(rate=1.0, kinds=("cut",), service="s3", cut_after=1000)
    with pytest.raises((botocore.exceptions.ResponseStreamingError, botocore.exceptions.IncompleteReadError)):
        s3.get_object(Bucket=stack.source_bucket, Key="x.txt")["Body"].read()

    fault_proxy.configure(service="s3", latency=0.2, throttle=200_000)
    started = time.monotonic()
    assert s3.get_object(Bucket=stack.source_bucket, Key="x.txt")["Body"].read() == b"x" * 100_000
    assert time.monotonic() - started >= 0.2 + 0.4  # latency, then 100 kB at 200 kB/s (less a first step)
    assert [r.fault for r in fault_proxy.requests_matching(service="sqs")] == [None, None, "503"]
