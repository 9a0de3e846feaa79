"""Where a notification goes: the destination queue always, and the SNS topic (NOTIFY_SNS_TOPIC_ARN) and
the EventBridge bus (NOTIFY_EVENT_BUS) when they are set, each the same document (contract §4).

The queue comes first; a target that fails raises, so the message is released and the notification sent
again to every target on the next delivery: at least once everywhere, as on the queue alone. A document
a target refuses for its size is sent reduced (archiver.notify.reduced), as on the queue.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import botocore.exceptions
import structlog

from archiver import notify
from archiver.aws import AwsClients, http_status, is_transient, retry_transient
from archiver.errors import TransientError, clip
from archiver.notices import CompletedNotification
from archiver.notify import Notice
from archiver.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_events import EventBridgeClient
    from mypy_boto3_sns import SNSClient

log = structlog.get_logger(__name__)

# SNS and EventBridge take at most 256 KiB a message or event; an event's envelope is counted too.
MAX_EVENT_DETAIL_BYTES = 250 * 1024


def detail_type(notification: Notice) -> str:
    """What an EventBridge rule matches on, besides the source: `archive.completed` and so on."""
    return f"archive.{notification.status}"


def publish(clients: AwsClients, settings: Settings, queue_url: str, notification: Notice) -> None:
    notify.send_notification(clients.sqs, queue_url, notification)
    if not (settings.notify_sns_topic_arn or settings.notify_event_bus):
        return
    body = _body(notification, MAX_EVENT_DETAIL_BYTES)  # one document for both
    if settings.notify_sns_topic_arn:
        if clients.sns is None:
            raise RuntimeError("NOTIFY_SNS_TOPIC_ARN is set, and these clients have no SNS client")
        to_topic(clients.sns, settings.notify_sns_topic_arn, notification, body)
    if settings.notify_event_bus:
        if clients.events is None:
            raise RuntimeError("NOTIFY_EVENT_BUS is set, and these clients have no EventBridge client")
        to_bus(clients.events, settings, notification, body)


def _body(notification: Notice, max_bytes: int) -> str:
    """The document as sent, reduced (metadata and lists left out) when it is too big for the target."""
    fitted = notify.fit(notification) if isinstance(notification, CompletedNotification) else notification
    body = notify.encode(fitted)
    if len(body.encode()) > max_bytes:
        log.warning("notification.reduced", reason=f"over {max_bytes} bytes")
        body = notify.encode(notify.reduced(fitted))
    return body


@retry_transient
def to_topic(sns: SNSClient, topic_arn: str, notification: Notice, body: str) -> None:
    # A subscription's filter policy can pick statuses without parsing the body.
    attributes = {"status": {"DataType": "String", "StringValue": notification.status}}
    fifo = (
        {
            "MessageGroupId": notification.request_id,
            "MessageDeduplicationId": hashlib.sha256(body.encode()).hexdigest(),
        }
        if topic_arn.endswith(".fifo")
        else {}
    )
    sns.publish(TopicArn=topic_arn, Message=body, MessageAttributes=attributes, **fifo)  # type: ignore[arg-type]


def to_bus(events: EventBridgeClient, settings: Settings, notification: Notice, body: str) -> None:
    entry = {
        "Source": settings.notify_event_source,
        "DetailType": detail_type(notification),
        "Detail": body,
        "EventBusName": settings.notify_event_bus or "",
    }
    try:
        response = retry_transient(events.put_events)(Entries=[entry])  # type: ignore[list-item]
    except botocore.exceptions.ClientError as exc:
        if is_transient(exc) or http_status(exc) != 400:
            raise
        raise TransientError(f"EventBridge refused the event: {clip(str(exc), 200)}") from None
    if response.get("FailedEntryCount"):
        (failed,) = response["Entries"]
        # An entry that fails is not an error of the call: PutEvents answers 200 and says so per entry.
        raise TransientError(f"EventBridge did not take the event: {failed.get('ErrorCode')}")
