"""Two worker processes share one queue: every request done once, nothing left behind."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import botocore.exceptions
import pytest

from archiver.aws import AwsClients, http_status
from tests.conftest import Stack
from tests.zipcheck import check_with_zipfile

REQUESTS = 200


@pytest.mark.slow
def test_two_workers_two_hundred_requests(stack: Stack, tmp_path: Path) -> None:
    """200 requests over two `archiver worker --burst` processes: 200 archives, 200 completed
    notifications, empty source queue and DLQ, no incomplete multipart upload."""
    for index in range(20):
        stack.put(f"shared/{index}.txt", f"object {index}\n".encode() * (index + 1))
    for number in range(REQUESTS):
        files = [{"source": f"shared/{(number + k) % 20}.txt", "destination": f"d{k}"} for k in range(2)]
        stack.send({"request_id": f"load-{number}", "files": files})
    env = stack.worker_env()
    logs = [tmp_path / f"worker-{n}.log" for n in range(2)]
    streams = [log.open("w") for log in logs]
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "archiver", "worker", "--burst"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stream,
        )
        for stream in streams
    ]
    for process, log in zip(workers, logs, strict=True):
        process.wait(timeout=600)
        streams.pop(0).close()
        assert process.returncode == 0, log.read_text()[-2000:]
    # Anything but a first-time completion, so that a failure below says which message did what.
    unusual = [
        line
        for log in logs
        for line in log.read_text().splitlines()
        if ('"request.done"' in line and '"outcome": "completed"' not in line) or '"level": "error"' in line
    ]

    notes = stack.notifications(REQUESTS, max_polls=REQUESTS)
    assert len(notes) == REQUESTS
    assert {n["status"] for n in notes} == {"completed"}
    assert sorted(n["request_id"] for n in notes) == sorted(f"load-{n}" for n in range(REQUESTS))
    keys = stack.archive_keys()
    assert len(keys) == REQUESTS
    assert stack.queue_depth() == 0, unusual
    assert stack.queue_depth(stack.dlq_url) == 0, unusual
    assert stack.incomplete_uploads() == []
    for number in range(REQUESTS):
        expected = {
            f"d{k}/{(number + k) % 20}.txt": f"object {(number + k) % 20}\n".encode()
            * ((number + k) % 20 + 1)
            for k in range(2)
        }
        check_with_zipfile(stack.download(f"download/load-{number}/load-{number}.zip"), expected)


def test_embedded_stack_deletes_under_the_lock_sends_take(moto_endpoint: str) -> None:
    """moto rebuilds a queue's message list on delete; unlocked, two deletes at once (two workers) can
    bring a deleted message back. The embedded stack makes a delete wait for the lock sends hold."""
    from moto.sqs.models import Message, Queue

    queue = Queue("lock-probe", region="us-east-1", account_id="123456789012")
    message = Message("m-1", "body")
    queue.add_message(message)
    message.mark_received(visibility_timeout=600)
    deleting = threading.Thread(target=queue.delete_message, args=(message.receipt_handle,))
    with queue._messages_lock:
        deleting.start()
        deleting.join(timeout=0.5)  # a bound on a wait that must not end, not a sleep
        assert deleting.is_alive()
        assert queue._messages == [message]
    deleting.join(timeout=10)
    assert not deleting.is_alive()
    assert queue._messages == []


def test_embedded_stack_lets_exactly_one_conditional_put_win(aws: AwsClients, stack: Stack) -> None:
    """Four If-None-Match PUTs of one new key at once, twenty times: S3 lets exactly one succeed and
    refuses the others (412), which leases, claims and decision.json rest on; so must the stack."""

    def put(key: str, barrier: threading.Barrier, outcomes: list[int]) -> None:
        barrier.wait(timeout=10)
        try:
            aws.s3.put_object(Bucket=stack.destination_bucket, Key=key, Body=b"x", IfNoneMatch="*")
            outcomes.append(200)
        except botocore.exceptions.ClientError as exc:
            outcomes.append(http_status(exc))

    for round_number in range(20):
        barrier, outcomes = threading.Barrier(4), []
        threads = [
            threading.Thread(target=put, args=(f"race/{round_number}", barrier, outcomes)) for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(outcomes) == [200, 412, 412, 412], round_number
