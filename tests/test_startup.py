"""`archiver worker` checks what its settings name before the first poll: one line and the right exit
status for a missing queue, a mistyped bucket or an endpoint that does not answer (contract §6)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from archiver.cli import UNREACHABLE_EXIT
from tests.conftest import Stack


def start_worker(stack: Stack, **settings: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "archiver", "worker", "--burst"],
        env=stack.worker_env(**settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The process's only line on stderr, and nothing on stdout: no traceback, no log of a poll."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    return lines[0]


def closed_port() -> int:
    """A port on 127.0.0.1 that nobody listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_source_queue_that_does_not_exist_stops_the_worker_with_exit_2(stack: Stack) -> None:
    """A mistyped SQS_SOURCE_QUEUE: exit 2 and one line naming it, not a QueueDoesNotExist traceback."""
    result = start_worker(stack, SQS_SOURCE_QUEUE=f"{stack.source_queue}-typo")
    assert result.returncode == 2
    assert one_line(result) == (
        f"archiver: invalid setting: SQS_SOURCE_QUEUE {stack.source_queue}-typo: no such queue"
    )


def test_a_destination_queue_url_that_names_no_queue_stops_the_worker(stack: Stack) -> None:
    """SQS_DESTINATION_QUEUE given as a URL is checked too, by the name and account in its path."""
    gone = f"{stack.destination_url}-gone"
    result = start_worker(stack, SQS_DESTINATION_QUEUE=gone)
    assert result.returncode == 2
    assert one_line(result) == f"archiver: invalid setting: SQS_DESTINATION_QUEUE {gone}: no such queue"


def test_a_destination_bucket_typo_stops_the_worker_before_any_request_is_taken(stack: Stack) -> None:
    """A mistyped S3_DESTINATION_BUCKET used to send every request to the DLQ; now nothing is received."""
    stack.send({"request_id": "never-taken", "files": [{"source": "a.txt"}]})
    result = start_worker(stack, S3_DESTINATION_BUCKET=f"{stack.destination_bucket}-typo")
    assert result.returncode == 2
    assert one_line(result) == (
        f"archiver: invalid setting: S3_DESTINATION_BUCKET {stack.destination_bucket}-typo: no such bucket"
    )
    visible = stack.clients.sqs.get_queue_attributes(
        QueueUrl=stack.source_url, AttributeNames=["ApproximateNumberOfMessages"]
    )["Attributes"]["ApproximateNumberOfMessages"]
    assert visible == "1", "the request was received although the worker should not have polled"


def test_every_wrong_setting_is_named_on_the_one_line(stack: Stack) -> None:
    """Three wrong settings at once: all three on one line, so one restart fixes them all."""
    result = start_worker(
        stack,
        SQS_SOURCE_QUEUE="no-such-requests",
        SQS_DESTINATION_QUEUE="no-such-notifications",
        S3_DESTINATION_BUCKET="no-such-archives",
    )
    assert result.returncode == 2
    line = one_line(result)
    assert line.startswith("archiver: invalid setting: ")
    for name in ("SQS_SOURCE_QUEUE", "SQS_DESTINATION_QUEUE", "S3_DESTINATION_BUCKET"):
        assert name in line


def test_an_endpoint_that_does_not_answer_exits_69_within_seconds(stack: Stack) -> None:
    """Nobody listening at AWS_ENDPOINT_URL: exit 69 (EX_UNAVAILABLE) and one line, in seconds rather
    than after the worker's minutes of retries."""
    endpoint = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    result = start_worker(stack, AWS_ENDPOINT_URL=endpoint)
    elapsed = time.monotonic() - started
    assert result.returncode == UNREACHABLE_EXIT == 69
    assert one_line(result).startswith(f"archiver: cannot reach {endpoint}: ")
    assert elapsed < 10, f"took {elapsed:.1f}s"


def test_missing_credentials_are_a_wrong_setting(stack: Stack) -> None:
    """No AWS credentials at all: exit 2, one line."""
    nowhere = {
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SECRET_ACCESS_KEY": "",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_CONFIG_FILE": "/dev/null",
        # botocore would otherwise ask the instance metadata address, which is not on this machine.
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    result = start_worker(stack, **nowhere)
    assert result.returncode == 2
    assert one_line(result) == "archiver: invalid setting: AWS credentials: none found"
