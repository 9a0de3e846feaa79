"""Notifications where the producer listens (contract §4, notification targets): the SNS topic and the
EventBridge bus beside the destination queue, on moto over HTTP, each delivering to an SQS queue the
way a subscriber would (a raw-delivery subscription, a rule matching on source and detail-type)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from archiver import worker
from archiver.aws import make_clients
from tests.conftest import Stack


@dataclass
class Listeners:
    topic_arn: str
    bus: str
    topic_queue: str  # the raw subscription's queue: every notification
    failed_queue: str  # a subscription filtered on the `status` attribute: failed ones only
    bus_queue: str  # the rule's target: completed, failed and cancelled events from `archiver`


def queue_arn(stack: Stack, url: str) -> str:
    attributes = stack.clients.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
    return attributes["Attributes"]["QueueArn"]


@pytest.fixture
def listeners(stack: Stack) -> Listeners:
    sqs = stack.clients.sqs
    suffix = stack.destination_bucket.removeprefix("zips-")
    clients = make_clients()
    sns, events = clients.sns, clients.events
    assert sns is not None and events is not None
    queues = [
        sqs.create_queue(QueueName=f"{name}-{suffix}")["QueueUrl"] for name in ("topic", "failed", "bus")
    ]
    topic_arn = sns.create_topic(Name=f"archives-{suffix}")["TopicArn"]
    sns.subscribe(
        TopicArn=topic_arn,
        Protocol="sqs",
        Endpoint=queue_arn(stack, queues[0]),
        Attributes={"RawMessageDelivery": "true"},
    )
    sns.subscribe(
        TopicArn=topic_arn,
        Protocol="sqs",
        Endpoint=queue_arn(stack, queues[1]),
        Attributes={"RawMessageDelivery": "true", "FilterPolicy": json.dumps({"status": ["failed"]})},
    )
    bus = f"archives-{suffix}"
    events.create_event_bus(Name=bus)
    pattern = {
        "source": ["archiver"],
        "detail-type": ["archive.completed", "archive.failed", "archive.cancelled"],
    }
    events.put_rule(Name=f"to-queue-{suffix}", EventBusName=bus, EventPattern=json.dumps(pattern))
    events.put_targets(
        Rule=f"to-queue-{suffix}",
        EventBusName=bus,
        Targets=[{"Id": "queue", "Arn": queue_arn(stack, queues[2])}],
    )
    return Listeners(topic_arn, bus, *queues)


def drain(stack: Stack, url: str) -> list[dict[str, Any]]:
    sqs = stack.clients.sqs
    found: list[dict[str, Any]] = []
    while messages := sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get(
        "Messages", []
    ):
        for message in messages:
            found.append(json.loads(message["Body"]))
            sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    return found


def by_request(notes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {note["request_id"]: note for note in notes}


def test_every_target_gets_the_same_document(stack: Stack, listeners: Listeners) -> None:
    """A completed, a failed and a cancelled request: the topic's subscriber and the bus's rule get the
    queue's documents, byte for byte the same JSON; the filtered subscription only the failed one; the
    events carry `source` and `detail-type` a rule matches on."""
    stack.put("a.txt", b"alpha")
    stack.send({"request_id": "t-done", "files": [{"source": "a.txt"}], "metadata": {"k": 1}})
    stack.send({"request_id": "t-failed", "files": [{"source": "missing.txt"}]})
    stack.send({"cancel": {"request_id": "t-cancelled"}})
    settings = stack.settings(notify_sns_topic_arn=listeners.topic_arn, notify_event_bus=listeners.bus)
    assert worker.run(worker.connect(settings), burst=True) == 0
    stack.send({"request_id": "t-cancelled", "files": [{"source": "a.txt"}]})
    assert worker.run(worker.connect(settings), burst=True) == 0

    queued = by_request(stack.notifications(3))
    assert {key: note["status"] for key, note in queued.items()} == {
        "t-done": "completed",
        "t-failed": "failed",
        "t-cancelled": "cancelled",
    }
    assert by_request(drain(stack, listeners.topic_queue)) == queued
    assert list(by_request(drain(stack, listeners.failed_queue))) == ["t-failed"]
    events = drain(stack, listeners.bus_queue)
    assert {event["detail"]["request_id"]: event["detail"] for event in events} == queued
    for event in events:
        assert event["source"] == "archiver"
        assert event["detail-type"] == f"archive.{event['detail']['status']}"
    assert stack.queue_depth() == 0


def test_a_target_that_fails_releases_the_message(stack: Stack, listeners: Listeners) -> None:
    """A topic that does not exist: the queue's notification went, the message is released (not
    deleted), so the next delivery notifies every target again."""
    stack.put("a.txt", b"alpha")
    stack.send({"request_id": "t-gone", "files": [{"source": "a.txt"}]})
    gone = listeners.topic_arn + "-gone"
    settings = stack.settings(notify_sns_topic_arn=gone)
    assert worker.run(worker.connect(settings), burst=True) == 0
    (note,) = stack.notifications(1)
    assert note["status"] == "completed"
    assert stack.queue_depth() == 1  # released, its status still `completed`
    assert stack.status("t-gone")["status"] == "completed"
