"""Long jobs, shutdown and crashes, on real processes with real signals (contract §5, delivery semantics).

Jobs are made slow on purpose by the fault proxy's bandwidth cap on the sources' GETs."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from archiver import queue, worker
from archiver.aws import make_clients
from archiver.settings import load_settings
from tests.conftest import Stack, wait_for
from tests.faultproxy import FaultProxy, Faults, Seen
from tests.zipcheck import check_archive

MiB = 1024 * 1024


def worker_through(proxy: FaultProxy, stack: Stack, **settings: Any) -> worker.Worker:
    """An in-process worker whose clients go through `proxy`; the stack's own clients stay direct."""
    os.environ["AWS_ENDPOINT_URL"], direct = proxy.url, os.environ["AWS_ENDPOINT_URL"]
    try:
        return worker.connect(stack.settings(**settings), make_clients())
    finally:
        os.environ["AWS_ENDPOINT_URL"] = direct


def start_worker(stack: Stack, endpoint: str, **settings: str) -> subprocess.Popen[str]:
    """A worker whose sources are streamed (a 1 MiB read-ahead window reads ahead nothing of these),
    so that parts go up while a source is still being read, and a signal lands mid-archive."""
    settings = {"PART_SIZE": str(5 * MiB), "PREFETCH_BYTES": str(MiB), **settings}
    return subprocess.Popen(
        [sys.executable, "-m", "archiver", "worker"],
        env=stack.worker_env(AWS_ENDPOINT_URL=endpoint, **settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def uploaded_parts(proxy: FaultProxy) -> int:
    return len(proxy.requests_matching(operation="UploadPart"))


def visible_now(stack: Stack) -> int:
    attributes = stack.clients.sqs.get_queue_attributes(
        QueueUrl=stack.source_url, AttributeNames=["ApproximateNumberOfMessages"]
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"])


@pytest.mark.slow
def test_long_job_is_not_redelivered_meanwhile(
    stack: Stack, slow_sources: FaultProxy, tmp_path: Path
) -> None:
    """A job three times longer than the visibility timeout keeps its message hidden from others: the
    worker extended it, each time before it would have lapsed, until it deleted it."""
    body = os.urandom(30 * MiB)  # ~30 s at 1 MiB/s, against a 10 s visibility timeout
    stack.put("long.bin", body)
    stack.send({"request_id": "long", "files": [{"source": "long.bin"}]})
    busy = worker_through(slow_sources, stack, visibility_timeout=10)
    thread = threading.Thread(target=worker.run, args=(busy,), kwargs={"burst": True})
    thread.start()
    wait_for(lambda: slow_sources.requests_matching(operation="GetObject"), timeout=30, what="the GET")
    stolen = []
    while thread.is_alive():  # a second worker polls all along
        response = stack.clients.sqs.receive_message(
            QueueUrl=stack.source_url, WaitTimeSeconds=1, VisibilityTimeout=30
        )
        stolen.extend(response.get("Messages", []))
    thread.join()
    assert stolen == []
    (note,) = stack.notifications(1)
    assert note["status"] == "completed"
    check_archive(stack.download("download/long/long.zip"), {"long.bin": body}, tmp_path)
    # The worker's own SQS calls, as the proxy saw them: the receive (its first poll), the extensions,
    # the delete.
    calls = slow_sources.requests_matching(service="sqs")
    receive = next(seen for seen in calls if seen.operation == "ReceiveMessage")
    (delete,) = [seen for seen in calls if seen.operation == "DeleteMessage"]
    extensions = [seen.at for seen in calls if seen.operation == "ChangeMessageVisibility"]
    assert delete.at - receive.at > 10, "the job did not outlast the visibility timeout"
    assert len(extensions) >= 2
    moments = [receive.at, *extensions, delete.at]
    assert moments == sorted(moments)
    assert max(later - earlier for earlier, later in itertools.pairwise(moments)) < 10


@pytest.mark.slow
def test_sigterm_lets_a_short_job_finish(stack: Stack, slow_sources: FaultProxy, tmp_path: Path) -> None:
    """SIGTERM mid-archive: a job that fits SHUTDOWN_GRACE completes, is notified and deleted; exit 0."""
    body = os.urandom(6 * MiB)
    stack.put("six.bin", body)
    stack.send({"request_id": "graceful", "files": [{"source": "six.bin"}]})
    process = start_worker(stack, slow_sources.url, SHUTDOWN_GRACE="60")
    wait_for(lambda: slow_sources.requests_matching(operation="GetObject"), timeout=30, what="the GET")
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    (note,) = stack.notifications(1)
    assert note["status"] == "completed"
    check_archive(stack.download("download/graceful/graceful.zip"), {"six.bin": body}, tmp_path)
    assert stack.queue_depth() == 0


@pytest.mark.slow
def test_sigterm_past_the_grace_aborts_and_releases(stack: Stack, slow_sources: FaultProxy) -> None:
    """A job that outlasts SHUTDOWN_GRACE is aborted: no archive, no parts left, message visible at once."""
    stack.put("big.bin", os.urandom(40 * MiB))
    stack.send({"request_id": "cut-short", "files": [{"source": "big.bin"}]})
    process = start_worker(stack, slow_sources.url, SHUTDOWN_GRACE="2", VISIBILITY_TIMEOUT="300")
    wait_for(lambda: uploaded_parts(slow_sources), timeout=60, what="a first uploaded part")
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert time.monotonic() - signalled < 20
    assert stack.archive_keys() == []
    assert stack.incomplete_uploads() == []
    assert visible_now(stack) == 1  # released with visibility 0, not hidden for 300 s
    assert stack.status("cut-short")["status"] == "queued"
    assert stack.notifications(1, max_polls=1) == []


@pytest.mark.slow
def test_second_signal_stops_at_once(stack: Stack, slow_sources: FaultProxy) -> None:
    """A second SIGTERM ends the worker now: upload aborted, message released, exit status 1."""
    stack.put("big.bin", os.urandom(40 * MiB))
    stack.send({"request_id": "twice-signalled", "files": [{"source": "big.bin"}]})
    process = start_worker(stack, slow_sources.url, SHUTDOWN_GRACE="600", VISIBILITY_TIMEOUT="300")
    wait_for(lambda: slow_sources.requests_matching(operation="GetObject"), timeout=30, what="the GET")
    process.send_signal(signal.SIGTERM)
    wait_for(lambda: uploaded_parts(slow_sources), timeout=60, what="a first uploaded part")
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 1, output
    assert time.monotonic() - signalled < 20
    assert "Traceback" not in output
    assert stack.archive_keys() == []
    assert stack.incomplete_uploads() == []
    assert visible_now(stack) == 1


@pytest.mark.parametrize("sent", ["after it exits", "during its last poll"])
def test_sigterm_while_idle_loses_no_request(stack: Stack, moto_endpoint: str, sent: str) -> None:
    """An idle worker stopped in its long poll (what ECS does at every scale-in) lets the poll end within
    SHUTDOWN_GRACE instead of abandoning it: SQS would hand the next request to the abandoned poll, where
    it stays invisible for a visibility timeout. A request sent while it stops or right after it exits
    goes at once to the next worker."""
    with FaultProxy(moto_endpoint) as proxy:  # records the worker's receives
        process = start_worker(stack, proxy.url, SHUTDOWN_GRACE="3")
        wait_for(lambda: proxy.requests_matching(operation="ReceiveMessage"), timeout=30, what="a poll")
        process.send_signal(signal.SIGTERM)
        if sent == "during its last poll":
            stack.put("a.txt", b"alpha")
            stack.send({"request_id": "after-stop", "files": [{"source": "a.txt"}]})
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "worker.stopped" in output
    if sent == "after it exits":
        stack.put("a.txt", b"alpha")
        stack.send({"request_id": "after-stop", "files": [{"source": "a.txt"}]})
    worker.run(worker.connect(stack.settings()), burst=True)
    assert [n["status"] for n in stack.notifications(1)] == ["completed"]
    assert stack.queue_depth() == 0


def test_a_poll_never_outlasts_the_shutdown_grace() -> None:
    """The long poll is 20 s, shortened to SHUTDOWN_GRACE when that is less (at least 1 s)."""
    settings = {"sqs_source_queue": "q", "sqs_destination_queue": "d"}
    settings |= {"s3_source_bucket": "src", "s3_destination_bucket": "dst"}
    waits = [
        worker.poll_seconds(load_settings(**settings, shutdown_grace=grace), burst=False)
        for grace in (25, 20, 3, 0)
    ]
    assert waits == [20, 20, 3, 1]


@pytest.mark.slow
def test_killed_worker_leaves_nothing_and_is_redone(
    stack: Stack, slow_sources: FaultProxy, tmp_path: Path
) -> None:
    """SIGKILL mid-archive: no archive appears; after the visibility timeout another worker builds it,
    and the dead worker's incomplete upload does not survive."""
    body = os.urandom(12 * MiB)
    stack.put("twelve.bin", body)
    stack.send({"request_id": "killed", "files": [{"source": "twelve.bin"}]})
    process = start_worker(stack, slow_sources.url, VISIBILITY_TIMEOUT="10")
    wait_for(lambda: uploaded_parts(slow_sources), timeout=60, what="a first uploaded part")
    process.kill()
    process.communicate(timeout=30)
    assert stack.archive_keys() == []
    # The dead worker's upload is there, incomplete (moto may still be taking in a part it was sent).
    wait_for(
        lambda: stack.incomplete_uploads() == ["download/killed/killed.zip"],
        timeout=30,
        what="the dead upload",
    )

    survivor = worker.connect(stack.settings(visibility_timeout=10))

    def redone() -> list[dict[str, Any]]:
        worker.run(survivor, burst=True)
        return stack.notifications(1, max_polls=1)

    (note,) = wait_for(redone, timeout=90, what="another worker to complete the request")
    assert note["status"] == "completed"
    check_archive(stack.download("download/killed/killed.zip"), {"twelve.bin": body}, tmp_path)
    assert stack.incomplete_uploads() == []
    assert stack.queue_depth() == 0


@pytest.mark.slow
def test_a_source_changed_mid_job_is_archived_afresh(
    stack: Stack, slow_sources: FaultProxy, tmp_path: Path
) -> None:
    """A big source replaced after its HEAD fails that attempt (its GET carries If-Match with the old ETag);
    the redelivery archives the new version, never a mix."""
    first = os.urandom(3 * MiB)
    stack.put("first.bin", first)
    stack.put("second.bin", b"old" * (MiB // 3))
    stack.send({"request_id": "changed", "files": [{"source": "first.bin"}, {"source": "second.bin"}]})
    # A small window, so second.bin is streamed when reached rather than read ahead at once.
    busy = worker_through(slow_sources, stack, prefetch_bytes=MiB, visibility_timeout=10)
    message = queue.receive(stack.clients.sqs, stack.source_url, wait_seconds=1, visibility_timeout=10)
    # second.bin's read after its HEAD waits on the wire until the object has changed: the change lands
    # between the HEAD and the GET however busy the machine is.
    gate = threading.Event()

    def read_after_head(seen: Seen) -> bool:
        return seen.method == "GET" and "second.bin" in seen.path and "if-match" in seen.headers

    slow_sources.configure(match=read_after_head, hold=gate)
    thread = threading.Thread(target=worker.handle, args=(busy, message))
    thread.start()
    try:
        wait_for(
            lambda: slow_sources.requests_matching(where=read_after_head),
            timeout=30,
            what="second.bin's GET after its HEAD",
        )
        new = b"new" * (MiB // 3)
        stack.put("second.bin", new)
    finally:
        gate.set()
    thread.join()
    # Its first GET (no ETag known yet) showed it big and was dropped; every read after the HEAD has
    # If-Match.
    probe, *gets = slow_sources.requests_matching(operation="GetObject", path_contains="second.bin")
    assert "if-match" not in probe.headers
    assert gets and all("if-match" in g.headers for g in gets)
    assert stack.archive_keys() == []
    assert stack.status("changed")["status"] == "queued"

    def redone() -> list[dict[str, Any]]:
        worker.run(worker.connect(stack.settings()), burst=True)
        return stack.notifications(1, max_polls=1)

    (note,) = wait_for(redone, timeout=60, what="the redelivery")
    assert note["status"] == "completed"
    check_archive(
        stack.download("download/changed/changed.zip"), {"first.bin": first, "second.bin": new}, tmp_path
    )


@pytest.mark.slow
def test_job_timeout_aborts_and_releases_with_backoff(stack: Stack, slow_sources: FaultProxy) -> None:
    """A job past JOB_TIMEOUT is abandoned: no archive, no parts left, the message back after a
    backoff (not at once, as after a shutdown, nor after the visibility timeout) for a later attempt."""
    stack.put("slow.bin", os.urandom(30 * MiB))
    stack.send({"request_id": "timed-out", "files": [{"source": "slow.bin"}]})
    busy = worker_through(slow_sources, stack, job_timeout=2, visibility_timeout=30)
    message = queue.receive(stack.clients.sqs, stack.source_url, wait_seconds=1, visibility_timeout=30)
    assert message is not None
    started = time.monotonic()
    worker.handle(busy, message)
    assert time.monotonic() - started < 20  # abandoned, not read to the end at 1 MiB/s
    assert stack.archive_keys() == []
    assert stack.incomplete_uploads() == []
    assert stack.status("timed-out")["status"] == "queued"
    # Timed from the release call as the proxy received it, so a slow machine can make the message
    # look late, never early: 2^1 s is a lower bound that holds under any load.
    (*_, release) = slow_sources.requests_matching(operation="ChangeMessageVisibility")
    wait_for(lambda: visible_now(stack), timeout=25, what="the message to come back")
    assert worker.release_delay(1, 30) <= time.monotonic() - release.at < 20
    assert not busy.shutdown.overdue.is_set()  # the timeout abandoned that job, not the worker


def test_the_heartbeat_covers_reading_and_planning_the_request(stack: Stack, moto_endpoint: str) -> None:
    """From the moment a message is received: while its extended-client body is still being fetched
    (held at the proxy), the message's visibility is already being extended and the health file
    refreshed, so a slow read or plan is never delivered to a second worker meanwhile."""
    stack.put("a.txt", b"alpha")
    stack.put("req.json", json.dumps({"request_id": "held", "files": [{"source": "a.txt"}]}).encode())
    pointer = [
        "software.amazon.payloadoffloading.PayloadS3Pointer",
        {"s3BucketName": stack.source_bucket, "s3Key": "req.json"},
    ]
    stack.send(json.dumps(pointer))
    hold = threading.Event()

    def pointer_get(seen: Seen) -> bool:
        return seen.operation == "GetObject" and seen.path.endswith("/req.json")

    with FaultProxy(moto_endpoint, Faults(match=pointer_get, hold=hold)) as proxy:
        busy = worker_through(proxy, stack, visibility_timeout=10)
        message = queue.receive(stack.clients.sqs, stack.source_url, wait_seconds=1, visibility_timeout=10)
        assert message is not None
        thread = threading.Thread(target=worker.handle, args=(busy, message))
        thread.start()
        try:
            wait_for(lambda: proxy.requests_matching(where=pointer_get), timeout=30, what="the body's GET")
            Path(stack.health_file).unlink(missing_ok=True)
            wait_for(
                lambda: proxy.requests_matching(operation="ChangeMessageVisibility"),
                timeout=30,
                what="a visibility extension while the body is still being read",
            )
            assert Path(stack.health_file).exists()
            assert not proxy.requests_matching(operation="CreateMultipartUpload")  # still reading
        finally:
            hold.set()
            thread.join(timeout=60)
    (note,) = stack.notifications(1)
    assert (note["status"], note["request_id"]) == ("completed", "held")
