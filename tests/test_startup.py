"""`archiver worker` checks what its settings name before the first poll: one line and the right exit
status for a missing queue, a mistyped bucket or an endpoint that does not answer (contract §6)."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from archiver import startup
from archiver.cli import UNREACHABLE_EXIT
from archiver.errors import SettingsError
from archiver.settings import MiB
from archiver.startup import startup_clients
from tests.conftest import Stack
from tests.faultproxy import FaultProxy


def start_worker(stack: Stack, **settings: str) -> subprocess.CompletedProcess[str]:
    return stack.run_burst_process(**settings)


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


def test_a_source_bucket_typo_stops_the_worker(stack: Stack) -> None:
    """A mistyped S3_SOURCE_BUCKET would fail every plain-key request as source_not_found (NoSuchBucket),
    permanently: exit 2 and one line, nothing received."""
    stack.send({"request_id": "never-taken", "files": [{"source": "a.txt"}]})
    result = start_worker(stack, S3_SOURCE_BUCKET=f"{stack.source_bucket}-typo")
    assert result.returncode == 2
    assert one_line(result) == (
        f"archiver: invalid setting: S3_SOURCE_BUCKET {stack.source_bucket}-typo: no such bucket"
    )
    assert stack.queue_depth() == 1


def test_a_source_bucket_the_role_may_not_list_is_accepted(stack: Stack, fault_proxy: FaultProxy) -> None:
    """s3:ListBucket on the source bucket is recommended, not required: HeadBucket's 403 there is no
    reason to stop (on the destination bucket it is: the worker lists its uploads)."""
    fault_proxy.configure(
        rate=1.0,
        kinds=("403",),
        match=lambda seen: seen.method == "HEAD" and seen.path == f"/{stack.source_bucket}",
    )
    settings = stack.settings()
    startup.check(settings, startup_clients(settings))  # raises nothing
    refused = fault_proxy.requests_matching(method="HEAD", where=lambda seen: seen.fault == "403")
    assert [seen.path.strip("/") for seen in refused] == [stack.source_bucket]
    fault_proxy.configure(
        rate=1.0,
        kinds=("403",),
        match=lambda seen: seen.method == "HEAD" and seen.path == f"/{stack.destination_bucket}",
    )
    with pytest.raises(
        SettingsError, match=f"S3_DESTINATION_BUCKET {stack.destination_bucket}: access denied"
    ):
        startup.check(settings, startup_clients(settings))


def test_every_wrong_setting_is_named_on_the_one_line(stack: Stack) -> None:
    """Three wrong settings at once: all three on one line, so one restart fixes them all."""
    result = start_worker(
        stack,
        SQS_SOURCE_QUEUE="no-such-requests",
        SQS_DESTINATION_QUEUE="no-such-notifications",
        S3_DESTINATION_BUCKET="no-such-archives",
        S3_SOURCE_BUCKET="no-such-sources",
    )
    assert result.returncode == 2
    line = one_line(result)
    assert line.startswith("archiver: invalid setting: ")
    for name in ("SQS_SOURCE_QUEUE", "SQS_DESTINATION_QUEUE", "S3_DESTINATION_BUCKET", "S3_SOURCE_BUCKET"):
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
    # The worker's own retries would take minutes; the start-up check's budget is seconds (a loaded
    # machine gets a wide margin).
    assert elapsed < 60, f"took {elapsed:.1f}s"


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


@pytest.fixture
def task_metadata() -> Iterator[tuple[dict[str, Any], str]]:
    """ECS's task metadata endpoint v4, as documented: GET `${ECS_CONTAINER_METADATA_URI_V4}/task`."""
    task: dict[str, Any] = {"Limits": {"CPU": 1, "Memory": 2048}}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: object) -> None:
            pass

        def do_GET(self) -> None:
            payload = json.dumps(task).encode() if self.path.endswith("/task") else b"{}"
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield task, f"http://127.0.0.1:{server.server_address[1]}/v4/container-id"
    server.shutdown()
    server.server_close()


def test_memory_settings_the_task_cannot_hold_stop_the_worker(
    stack: Stack, task_metadata: tuple[dict[str, Any], str]
) -> None:
    """PART_SIZE x UPLOAD_CONCURRENCY + PREFETCH_BYTES over the task's memory: exit 2 and one line at
    start-up, not an OOM kill in the middle of the first big archive."""
    task, uri = task_metadata
    task["Limits"]["Memory"] = 512
    result = start_worker(
        stack, ECS_CONTAINER_METADATA_URI_V4=uri, PART_SIZE=str(64 * MiB), UPLOAD_CONCURRENCY="8"
    )
    assert result.returncode == 2
    line = one_line(result)
    assert "PART_SIZE, UPLOAD_CONCURRENCY and PREFETCH_BYTES need up to" in line
    assert "more than the 512 MiB this container may use" in line
    assert start_worker(stack, ECS_CONTAINER_METADATA_URI_V4=uri).returncode == 0  # the defaults fit 512


def test_the_container_limit_comes_from_its_cgroup_or_the_ecs_task(
    tmp_path: Path, task_metadata: tuple[dict[str, Any], str]
) -> None:
    """cgroup v2's memory.max, v1's memory.limit_in_bytes, ECS's task limit: the smallest that is set."""
    _, uri = task_metadata
    v2, v1, none = tmp_path / "v2", tmp_path / "v1", tmp_path / "none"
    (v1 / "memory").mkdir(parents=True)
    v2.mkdir()
    none.mkdir()
    (v2 / "memory.max").write_text("1073741824\n")
    (v1 / "memory" / "memory.limit_in_bytes").write_text("536870912\n")
    assert startup.container_memory_limit(v2, metadata_uri=None) == 1024 * MiB
    assert startup.container_memory_limit(v1, metadata_uri=None) == 512 * MiB
    assert startup.container_memory_limit(none, metadata_uri=None) is None
    (v2 / "memory.max").write_text("max\n")
    assert startup.container_memory_limit(v2, metadata_uri=None) is None
    assert startup.container_memory_limit(none, metadata_uri=uri) == 2048 * MiB
    assert startup.container_memory_limit(v1, metadata_uri=uri) == 512 * MiB
    assert startup.container_memory_limit(none, metadata_uri=f"http://127.0.0.1:{closed_port()}") is None
