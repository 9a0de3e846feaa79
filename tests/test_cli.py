"""The `archiver` command line (contract §7): schema, check, submit, demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from archiver.assembly import LEAD_BYTES
from archiver.cli import HEALTH_MAX_AGE, main
from archiver.settings import MiB
from tests.conftest import Stack
from tests.zipcheck import check_with_zipfile


@pytest.fixture
def required_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name, value in {
        "SQS_SOURCE_QUEUE": "q",
        "SQS_DESTINATION_QUEUE": "n",
        "S3_SOURCE_BUCKET": "src",
        "S3_DESTINATION_BUCKET": "dst",
        "HEALTH_FILE": str(tmp_path / "beat"),
    }.items():
        monkeypatch.setenv(name, value)
    return tmp_path / "beat"


def test_schema_prints_request_and_notification(capsys: pytest.CaptureFixture[str]) -> None:
    """`archiver schema` prints the JSON Schemas: request, cancel, and the notification as completed,
    failed or cancelled."""
    assert main(["schema"]) == 0
    schemas = json.loads(capsys.readouterr().out)
    assert schemas["request"]["required"] == ["files"]
    notification = schemas["notification"]
    assert set(notification["discriminator"]["mapping"]) == {"completed", "failed", "cancelled"}
    assert schemas["cancel"]["required"] == ["cancel"]
    assert {"CompletedNotification", "FailedNotification"} <= set(notification["$defs"])


def test_check_is_healthy_only_with_a_fresh_heartbeat(required_env: Path) -> None:
    """`archiver check` exits 1 without a heartbeat or with a stale one, 0 with a fresh one."""
    assert main(["check"]) == 1
    required_env.touch()
    assert main(["check"]) == 0
    stale = time.time() - HEALTH_MAX_AGE - 5
    os.utime(required_env, (stale, stale))
    assert main(["check"]) == 1


def use_stack(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment an `archiver` command run in this process needs for the stack's queues and buckets."""
    for name, value in stack.worker_env().items():
        if name in ("SQS_SOURCE_QUEUE", "SQS_DESTINATION_QUEUE", "S3_SOURCE_BUCKET", "S3_DESTINATION_BUCKET"):
            monkeypatch.setenv(name, value)


def test_submit_validates_before_sending(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`archiver submit` refuses an invalid request locally and sends a valid one to the source queue."""
    use_stack(stack, monkeypatch)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"file": []}))
    assert main(["submit", str(bad)]) == 1
    assert "invalid request" in capsys.readouterr().err
    unsafe = tmp_path / "unsafe.json"
    unsafe.write_text(json.dumps({"files": [{"source": "s3://elsewhere/a.png"}]}))
    assert main(["submit", str(unsafe)]) == 1
    assert "forbidden_source" in capsys.readouterr().err
    assert stack.queue_depth() == 0

    good = tmp_path / "good.json"
    good.write_text(json.dumps({"files": [{"source": "a.png"}], "request_id": "sub-1"}))
    assert main(["submit", str(good)]) == 0
    assert json.loads(capsys.readouterr().out)["request_id"] == "sub-1"
    assert stack.queue_depth() == 1


def test_check_with_bad_settings_is_unhealthy_not_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """`archiver check` reports bad settings as unhealthy (1): Docker reserves health status 2."""
    monkeypatch.delenv("SQS_SOURCE_QUEUE", raising=False)
    assert main(["check"]) == 1


def test_submit_offloads_a_request_too_big_for_the_queue(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A body over the queue's MaximumMessageSize goes to S3 behind an extended-client pointer, which
    the worker follows to a completed archive."""
    from archiver import worker

    stack.clients.sqs.set_queue_attributes(
        QueueUrl=stack.source_url, Attributes={"MaximumMessageSize": "1024"}
    )
    use_stack(stack, monkeypatch)
    files = [
        {"source": f"folder/file-{i:03}.txt", "destination": "a-rather-long-folder-name"} for i in range(40)
    ]
    for spec in files:
        stack.put(spec["source"], spec["source"].encode())
    request = tmp_path / "big.json"
    request.write_text(json.dumps({"request_id": "offload-1", "files": files}))
    assert len(request.read_bytes()) > 1024

    assert main(["submit", str(request)]) == 0
    sent = json.loads(capsys.readouterr().out)
    assert sent["offloaded"].startswith(f"s3://{stack.source_bucket}/archiver-requests/")
    message = stack.clients.sqs.receive_message(
        QueueUrl=stack.source_url, VisibilityTimeout=0, MessageAttributeNames=["All"]
    )["Messages"][0]
    pointer = json.loads(message["Body"])
    assert pointer[0] == "software.amazon.payloadoffloading.PayloadS3Pointer"
    assert int(message["MessageAttributes"]["ExtendedPayloadSize"]["StringValue"]) > 1024

    worker.run(worker.connect(stack.settings()), burst=True)
    (note,) = stack.notifications(1)
    assert note["status"] == "completed"
    assert note["archive"]["entries"] == 40
    check_with_zipfile(
        stack.download(note["archive"]["key"]),
        {f"a-rather-long-folder-name/file-{i:03}.txt": f"folder/file-{i:03}.txt".encode() for i in range(40)},
    )


def test_submit_refuses_a_request_the_worker_would_not_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Over the 8 MiB a pointer may hold, the request is refused here, before any AWS call, rather than
    offloaded for the worker to fail as too_large."""
    for name in ("SQS_SOURCE_QUEUE", "SQS_DESTINATION_QUEUE", "S3_SOURCE_BUCKET", "S3_DESTINATION_BUCKET"):
        monkeypatch.setenv(name, "unused-by-this-test")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: a call would fail
    files = [{"source": f"folder/{i:05}-" + "k" * 200} for i in range(40_000)]
    request = tmp_path / "huge.json"
    request.write_text(json.dumps({"files": files}))
    assert main(["submit", str(request)]) == 1
    assert "too_large" in capsys.readouterr().err


def test_demo_runs_every_case_and_checks_it(tmp_path: Path) -> None:
    """`archiver demo` (what `make demo` runs) in its own process, without the session's AWS settings:
    its own embedded stack, every request checked, the video copied server-side."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    env["TMPDIR"] = str(tmp_path)
    demo = subprocess.run(
        [sys.executable, "-m", "archiver", "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "demo passed: 4 requests" in demo.stdout
    assert f"copied inside S3 (UploadPartCopy): {24 * MiB + 321 - LEAD_BYTES} bytes" in demo.stdout


def moved_back(stack: Stack) -> str:
    """What `aws sqs start-message-move-task` does to a message (moto has no move task): the same body in
    the source queue under a new MessageId. Returns the new id."""
    sqs = stack.clients.sqs
    (message,) = sqs.receive_message(QueueUrl=stack.source_url, WaitTimeSeconds=1)["Messages"]
    sqs.delete_message(QueueUrl=stack.source_url, ReceiptHandle=message["ReceiptHandle"])
    moved = sqs.send_message(QueueUrl=stack.source_url, MessageBody=message["Body"])["MessageId"]
    assert moved != message["MessageId"]
    return moved


def test_a_submitted_request_keeps_its_identity_through_a_redrive(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A redriven message has a new MessageId. `archiver submit` gives every request a request_id in its
    body, so the redriven request answers under the id the producer was told; a raw request without one
    comes back as a new request under its new MessageId, as the contract says."""
    from archiver import worker

    use_stack(stack, monkeypatch)
    stack.put("a.png", b"png")
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"files": [{"source": "a.png"}]}))
    assert main(["submit", str(request)]) == 0
    submitted = json.loads(capsys.readouterr().out)
    assert submitted["request_id"].startswith("submit-")
    moved_back(stack)
    worker.run(worker.connect(stack.settings()), burst=True)
    (note,) = stack.notifications(1)
    assert (note["status"], note["request_id"]) == ("completed", submitted["request_id"])

    stack.send({"files": [{"source": "a.png"}]})
    new_id = moved_back(stack)
    worker.run(worker.connect(stack.settings()), burst=True)
    (raw,) = stack.notifications(1)
    assert (raw["status"], raw["request_id"]) == ("completed", new_id)
