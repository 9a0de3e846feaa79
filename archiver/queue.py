"""The only module that talks to SQS: receive, extend, release, delete, send."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from archiver.aws import retry_transient

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

# SQS limits: a message is at most 1 MiB, long polling waits at most 20 s.
LONG_POLL_SECONDS = 20
# A message attribute that marks what workers send each other on the source queue (fan-out segment
# tasks), so that nothing a producer sends is taken for one by its body alone.
TASK_ATTRIBUTE = "ArchiverTask"


@dataclass(frozen=True)
class Message:
    message_id: str
    receipt_handle: str
    body: str
    receive_count: int
    sent_at: datetime | None
    task: str | None = None  # the TASK_ATTRIBUTE of a message a worker sent (a fan-out segment task)


@retry_transient
def resolve_queue_url(sqs: SQSClient, name_or_url: str) -> str:
    """Queues are configured by name or by URL; boto3 wants the URL."""
    if name_or_url.startswith(("https://", "http://")):
        return name_or_url
    return sqs.get_queue_url(QueueName=name_or_url)["QueueUrl"]


@retry_transient
def max_receive_count(sqs: SQSClient, queue_url: str) -> int | None:
    """The redrive policy's maxReceiveCount: the delivery that is the last before the DLQ."""
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["RedrivePolicy"])
    policy = attributes.get("Attributes", {}).get("RedrivePolicy")
    if not policy:
        return None
    return int(json.loads(policy)["maxReceiveCount"])


@retry_transient
def receive(sqs: SQSClient, queue_url: str, *, wait_seconds: int, visibility_timeout: int) -> Message | None:
    response = sqs.receive_message(
        QueueUrl=queue_url,
        MaxNumberOfMessages=1,
        WaitTimeSeconds=wait_seconds,
        VisibilityTimeout=visibility_timeout,
        MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
        MessageAttributeNames=[TASK_ATTRIBUTE],
    )
    messages = response.get("Messages", [])
    if not messages:
        return None
    raw = messages[0]
    attributes = raw.get("Attributes", {})
    sent = attributes.get("SentTimestamp")
    marked = raw.get("MessageAttributes") or {}
    task = marked[TASK_ATTRIBUTE].get("StringValue") if TASK_ATTRIBUTE in marked else None
    return Message(
        message_id=raw["MessageId"],
        receipt_handle=raw["ReceiptHandle"],
        body=raw.get("Body", ""),
        receive_count=int(attributes.get("ApproximateReceiveCount", "1")),
        sent_at=datetime.fromtimestamp(int(sent) / 1000, UTC) if sent else None,
        task=task,
    )


@retry_transient
def set_visibility(sqs: SQSClient, queue_url: str, message: Message, seconds: int) -> None:
    """Extend a message's invisibility while working on it, or release it (0) for redelivery."""
    sqs.change_message_visibility(
        QueueUrl=queue_url, ReceiptHandle=message.receipt_handle, VisibilityTimeout=seconds
    )


@retry_transient
def delete(sqs: SQSClient, queue_url: str, message: Message) -> None:
    sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message.receipt_handle)


@retry_transient
def max_message_size(sqs: SQSClient, queue_url: str) -> int:
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["MaximumMessageSize"])
    return int(attributes.get("Attributes", {}).get("MaximumMessageSize", 262_144))


@retry_transient
def send(sqs: SQSClient, queue_url: str, body: str, *, payload_size: int | None = None) -> str:
    """Send one message; `payload_size` marks an extended-client pointer with the size it points at."""
    if payload_size is None:
        return sqs.send_message(QueueUrl=queue_url, MessageBody=body)["MessageId"]
    attributes: dict[str, Any] = {
        "ExtendedPayloadSize": {"DataType": "Number", "StringValue": str(payload_size)}
    }
    return sqs.send_message(QueueUrl=queue_url, MessageBody=body, MessageAttributes=attributes)["MessageId"]


@retry_transient
def send_task(sqs: SQSClient, queue_url: str, body: str, *, kind: str) -> str:
    """Send a task to the workers of `queue_url`, marked with TASK_ATTRIBUTE."""
    attributes: dict[str, Any] = {TASK_ATTRIBUTE: {"DataType": "String", "StringValue": kind}}
    return sqs.send_message(QueueUrl=queue_url, MessageBody=body, MessageAttributes=attributes)["MessageId"]
