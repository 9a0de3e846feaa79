"""Two worker processes share one queue: every request done once, nothing left behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import Stack
from tests.zipcheck import check_with_zipfile

REQUESTS = 200


@pytest.mark.slow
def test_two_workers_two_hundred_requests(stack: Stack) -> None:
    """200 requests over two `archiver worker --burst` processes: 200 archives, 200 completed
    notifications, empty source queue and DLQ, no incomplete multipart upload."""
    for index in range(20):
        stack.put(f"shared/{index}.txt", f"object {index}\n".encode() * (index + 1))
    for number in range(REQUESTS):
        files = [{"source": f"shared/{(number + k) % 20}.txt", "destination": f"d{k}"} for k in range(2)]
        stack.send({"request_id": f"load-{number}", "files": files})
    env = stack.worker_env()
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "archiver", "worker", "--burst"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for process in workers:
        _, errors = process.communicate(timeout=600)
        assert process.returncode == 0, errors[-2000:]

    notes = stack.notifications(REQUESTS, max_polls=REQUESTS)
    assert len(notes) == REQUESTS
    assert {n["status"] for n in notes} == {"completed"}
    assert sorted(n["request_id"] for n in notes) == sorted(f"load-{n}" for n in range(REQUESTS))
    keys = stack.archive_keys()
    assert len(keys) == REQUESTS
    assert stack.queue_depth() == 0
    assert stack.queue_depth(stack.dlq_url) == 0
    assert stack.incomplete_uploads() == []
    for number in range(REQUESTS):
        expected = {
            f"d{k}/{(number + k) % 20}.txt": f"object {(number + k) % 20}\n".encode()
            * ((number + k) % 20 + 1)
            for k in range(2)
        }
        check_with_zipfile(stack.download(f"download/load-{number}/load-{number}.zip"), expected)
