"""The task role grants exactly what the worker calls: its real boto3 calls, recorded, against
deploy/worker-actions.json (which tests/test_deploy.py holds equal to the template's policy)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from archiver import startup, worker
from archiver.aws import AwsClients, make_clients
from archiver.protection import IAM_ACTIONS as PROTECTION_ACTIONS
from archiver.settings import MiB
from tests.conftest import Stack

DECLARED = json.loads((Path(__file__).parent.parent / "deploy" / "worker-actions.json").read_text())

# Each API operation the worker may call and the IAM action it needs. An operation missing here fails the
# test below, so a new call cannot ship without its permission.
ACTION_OF = {
    "s3:HeadObject": "s3:GetObject",
    "s3:GetObject": "s3:GetObject",
    "s3:PutObject": "s3:PutObject",
    "s3:CreateMultipartUpload": "s3:PutObject",
    "s3:UploadPart": "s3:PutObject",
    # Also s3:GetObject on the source, which HeadObject and GetObject already need.
    "s3:UploadPartCopy": "s3:PutObject",
    "s3:CompleteMultipartUpload": "s3:PutObject",
    "s3:AbortMultipartUpload": "s3:AbortMultipartUpload",
    # A fanned-out archive's plan and records (archiver/fanout/store.py): listed, and deleted once complete.
    "s3:ListObjectsV2": "s3:ListBucket",
    "s3:DeleteObject": "s3:DeleteObject",
    "s3:DeleteObjects": "s3:DeleteObject",
    "s3:ListMultipartUploads": "s3:ListBucketMultipartUploads",
    # The start-up check of the destination bucket (archiver/startup.py).
    "s3:HeadBucket": "s3:ListBucket",
    "sqs:GetQueueUrl": "sqs:GetQueueUrl",
    "sqs:GetQueueAttributes": "sqs:GetQueueAttributes",
    "sqs:ReceiveMessage": "sqs:ReceiveMessage",
    "sqs:ChangeMessageVisibility": "sqs:ChangeMessageVisibility",
    "sqs:DeleteMessage": "sqs:DeleteMessage",
    "sqs:SendMessage": "sqs:SendMessage",
    # The notification targets besides the queue (archiver/publish.py), when configured.
    "sns:Publish": "sns:Publish",
    "events:PutEvents": "events:PutEvents",
}
# s3:ListBucket is also granted on the source buckets, where nothing calls it: with it S3 answers a
# missing key with 404 instead of 403, which is how a missing source is told apart from a forbidden one.
# The worker makes no KMS call: for an SSE-KMS object S3 calls KMS itself, with the caller's
# credentials, so the caller needs these (S3 User Guide, "Using server-side encryption with AWS KMS
# keys"; the operations' API pages). Which key: the one of the bucket read or written ("read" is the
# copy's source for UploadPartCopy). HEAD decrypts nothing, which is why a source the role cannot
# decrypt passes its HEAD and fails at its GET or copy. Parts and completion are covered by the
# upload's own permissions, which CreateMultipartUpload documents as GenerateDataKey and Decrypt.
KMS_OF: dict[str, tuple[str, set[str]]] = {
    "GetObject": ("read", {"kms:Decrypt"}),
    "PutObject": ("write", {"kms:GenerateDataKey"}),
    "CreateMultipartUpload": ("write", {"kms:GenerateDataKey", "kms:Decrypt"}),
    "UploadPartCopy": ("read", {"kms:Decrypt"}),
}
# What the recorded run below needs, by whose key: the template grants exactly this when keys are given
# (tests/test_deploy.py).
KMS_NEEDED = {("kms:Decrypt", "source"), ("kms:Decrypt", "archive"), ("kms:GenerateDataKey", "archive")}


def kms_needed(
    s3_calls: set[tuple[str, str, str | None]], *, source: str, archive: str
) -> set[tuple[str, str]]:
    """(KMS action, "source" or "archive") for recorded (operation, bucket, copy source bucket) calls."""
    side = {source: "source", archive: "archive"}
    needed = set()
    for operation, bucket, copied_from in s3_calls:
        if operation not in KMS_OF:
            continue
        reads_or_writes, actions = KMS_OF[operation]
        key_of = copied_from if reads_or_writes == "read" and copied_from else bucket
        needed |= {(action, side[key_of]) for action in actions}
    return needed


@pytest.fixture
def recorded(moto_endpoint: str) -> tuple[AwsClients, set[str], set[tuple[str, str, str | None]]]:
    calls: set[str] = set()
    s3_calls: set[tuple[str, str, str | None]] = set()
    clients = make_clients()

    def record(model: Any, **_: Any) -> None:
        calls.add(f"{model.service_model.endpoint_prefix}:{model.name}")

    def record_bucket(params: dict[str, Any], model: Any, **_: Any) -> None:
        copied = params.get("CopySource")  # botocore may already have made {Bucket, Key} "bucket/key"
        if isinstance(copied, dict):
            copied = copied["Bucket"]
        elif copied:
            copied = copied.lstrip("/").split("/", 1)[0]
        s3_calls.add((model.name, params.get("Bucket", ""), copied))

    for client in (clients.s3, clients.sqs, clients.presign, clients.sns, clients.events):
        client.meta.events.register("before-call", record)
    clients.s3.meta.events.register("before-parameter-build.s3", record_bucket)
    return clients, calls, s3_calls


def test_every_worker_call_is_granted_and_every_grant_is_used(
    stack: Stack, recorded: tuple[AwsClients, set[str], set[tuple[str, str, str | None]]]
) -> None:
    """A run through every path (built, skipped, duplicate, failed, pointer, stale upload, released)
    calls only granted actions, and uses every granted one; with SSE-KMS buckets, it needs exactly
    the declared KMS actions on exactly the keys the template grants them on."""
    clients, calls, s3_calls = recorded
    stack.put("a.txt", b"a")
    stack.put("big.mp4", bytes(16 * MiB), ChecksumAlgorithm="CRC32")  # copied server-side
    stack.put("req.json", json.dumps({"request_id": "via-pointer", "files": [{"source": "a.txt"}]}).encode())
    s3 = stack.clients.s3
    s3.create_multipart_upload(Bucket=stack.destination_bucket, Key="download/stale/stale.zip")
    pointer = [
        "software.amazon.payloadoffloading.PayloadS3Pointer",
        {"s3BucketName": stack.source_bucket, "s3Key": "req.json"},
    ]
    for body in (
        {"request_id": "stale", "files": [{"source": "a.txt"}]},
        {"request_id": "stale", "files": [{"source": "a.txt"}]},  # a duplicate: re-notified
        {"request_id": "skipping", "on_missing": "skip", "files": [{"source": "a.txt"}, {"source": "no"}]},
        {"request_id": "missing", "files": [{"source": "no"}]},
        {"request_id": "copied", "files": [{"source": "a.txt"}, {"source": "big.mp4"}]},
        # Fanned out (16 MiB > 2 x 5 MiB): its segment tasks go to the source queue and come back.
        {"request_id": "fanned", "files": [{"source": "big.mp4"}, {"source": "a.txt"}]},
        pointer,
    ):
        stack.send(body)
    stack.send(json.dumps({"request_id": "x", "files": [{"source": "a.txt", "name": "b.txt"}]}))
    settings = stack.settings(server_side_copy_min_bytes=16 * MiB, fanout_segment_bytes=5 * MiB)
    startup.check(settings, clients)
    running = worker.connect(settings, clients)
    running.emit_metrics = False
    worker.run(running, burst=True)
    assert len(stack.notifications(8)) == 8
    # And a release: a message whose notification cannot be sent (the queue is gone) is put back.
    stack.send({"request_id": "released", "files": [{"source": "a.txt"}]})
    broken = worker.connect(stack.settings(sqs_destination_queue=stack.destination_url + "-gone"), clients)
    worker.run(broken, burst=True)

    unknown = calls - set(ACTION_OF)
    assert unknown == set(), f"map these operations to IAM actions and grant them: {unknown}"
    used = {ACTION_OF[call] for call in calls}
    declared = set(DECLARED["s3"]) | set(DECLARED["sqs"])
    assert used <= declared, f"called but not granted: {used - declared}"
    assert declared <= used, f"granted but never called: {declared - used}"
    assert set(DECLARED["ecs"]) == set(PROTECTION_ACTIONS)
    needed = kms_needed(s3_calls, source=stack.source_bucket, archive=stack.destination_bucket)
    assert needed == KMS_NEEDED
    assert {action for action, _ in needed} == set(DECLARED["kms"])


def test_notification_targets_need_exactly_their_declared_grants(
    stack: Stack, recorded: tuple[AwsClients, set[str], set[tuple[str, str, str | None]]]
) -> None:
    """With an SNS topic and an EventBridge bus configured, a completed and a failed request call
    sns:Publish and events:PutEvents, what the template grants when both are given, and nothing else
    of those services."""
    clients, calls, _ = recorded
    assert clients.sns is not None and clients.events is not None
    topic = clients.sns.create_topic(Name=f"t-{stack.source_queue}")
    bus = f"b-{stack.source_queue}"
    clients.events.create_event_bus(Name=bus)
    calls.clear()
    stack.put("a.txt", b"a")
    stack.send({"request_id": "done", "files": [{"source": "a.txt"}]})
    stack.send({"request_id": "missing", "files": [{"source": "no"}]})
    settings = stack.settings(notify_sns_topic_arn=topic["TopicArn"], notify_event_bus=bus)
    running = worker.connect(settings, clients)
    running.emit_metrics = False
    worker.run(running, burst=True)
    assert len(stack.notifications(2)) == 2
    targets = {call for call in calls if call.split(":")[0] in ("sns", "events")}
    assert {ACTION_OF[call] for call in targets} == set(DECLARED["sns"]) | set(DECLARED["events"])
