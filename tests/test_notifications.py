"""Every notification can be sent: what it echoes is validated, its size is bounded, its text stays within
SQS's characters, and a notification SQS still refuses for its content is replaced by a smaller one."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archiver import notify, worker
from archiver.errors import MAX_ERROR_MESSAGE, PermanentError
from archiver.models import MAX_METADATA_BYTES, parse_request
from tests.conftest import Stack

# SQS's allowed characters: #x9 | #xA | #xD | #x20 to #xD7FF | #xE000 to #xFFFD | #x10000 to #x10FFFF.
OUTSIDE_SQS = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def raw_notifications(stack: Stack, expected: int) -> list[str]:
    """Notification bodies exactly as SQS holds them (received and deleted)."""
    sqs, found = stack.clients.sqs, []
    for _ in range(20):
        if len(found) >= expected:
            break
        answer = sqs.receive_message(
            QueueUrl=stack.destination_url, MaxNumberOfMessages=10, WaitTimeSeconds=1
        )
        for message in answer.get("Messages", []):
            found.append(message["Body"])
            sqs.delete_message(QueueUrl=stack.destination_url, ReceiptHandle=message["ReceiptHandle"])
    return found


def run(stack: Stack, body: str) -> dict[str, Any]:
    """One request through the worker: its one notification, and nothing left in either queue."""
    stack.send(body)
    assert worker.run(worker.connect(stack.settings()), burst=True) == 0
    (raw,) = raw_notifications(stack, 1)
    assert OUTSIDE_SQS.search(raw) is None
    assert stack.queue_depth() == 0 and stack.queue_depth(stack.dlq_url) == 0
    note: dict[str, Any] = json.loads(raw)
    return note


def test_a_lone_surrogate_in_metadata_is_an_invalid_request(stack: Stack) -> None:
    """`\\ud800` is valid JSON but not text: rejected as invalid_request before any archive, and the
    failed notice (without the metadata it cannot carry) reaches the producer."""
    stack.put("a.txt", b"alpha")
    note = run(
        stack, '{"request_id": "lone", "files": [{"source": "a.txt"}], "metadata": {"user": "\\ud800"}}'
    )
    assert note["status"] == "failed"
    assert note["request_id"] == "lone"
    assert note["error"]["code"] == "invalid_request"
    assert "metadata.user" in note["error"]["message"]
    assert note["metadata"] == {}
    assert stack.archive_keys() == []


def test_a_lone_surrogate_in_a_source_is_an_invalid_request(stack: Stack) -> None:
    note = run(stack, '{"files": [{"source": "a\\udc80.txt"}]}')
    assert (note["status"], note["error"]["code"]) == ("failed", "invalid_request")
    assert "files.0.source" in note["error"]["message"]


def test_characters_sqs_refuses_are_escaped_not_lost(stack: Stack) -> None:
    """U+FFFF and U+FFFE are text SQS will not carry raw: they travel as JSON escapes and decode back to the
    metadata the producer sent."""
    stack.put("a.txt", b"alpha")
    metadata = {"note": "a\uffffb\ufffe", "emoji": "😀", "accents": "été"}
    note = run(stack, json.dumps({"files": [{"source": "a.txt"}], "metadata": metadata}))
    assert note["status"] == "completed"
    assert note["metadata"] == metadata


def test_failure_messages_are_bounded_whatever_the_body(stack: Stack) -> None:
    """A 160 KB name of control characters quoted in a failure message: the notice stays small."""
    name = "\u0001" * 160_000
    body = json.dumps({"request_id": "huge", "files": [{"source": "a.txt", "name": name}]})
    assert len(body) > 160_000 * 5
    note = run(stack, body)
    assert (note["status"], note["error"]["code"]) == ("failed", "invalid_request")
    assert len(note["error"]["message"]) <= MAX_ERROR_MESSAGE
    assert len(json.dumps(note)) < 8 * 1024


@pytest.mark.parametrize("fails", [False, True], ids=["completed", "failed"])
def test_a_notification_sqs_refuses_is_replaced_by_a_smaller_one(stack: Stack, fails: bool) -> None:
    """A destination queue whose messages may be only 2 KiB refuses the full notification: a notice
    without the metadata, marked truncated, goes instead, and the request is settled on its first try.
    (Not SQS's least, 1 KiB: a completed notice with its two presigned links is ~1.1 KiB even reduced
    here, and more on AWS, where each link carries the task role's session token.)"""
    stack.clients.sqs.set_queue_attributes(
        QueueUrl=stack.destination_url, Attributes={"MaximumMessageSize": "2048"}
    )
    stack.put("a.txt", b"alpha")
    source = "missing.txt" if fails else "a.txt"
    request = {"request_id": "small", "files": [{"source": source}], "metadata": {"blob": "x" * 4000}}
    note = run(stack, json.dumps(request))
    assert note["status"] == ("failed" if fails else "completed")
    assert note["request_id"] == "small"
    assert note["metadata"] == {}
    assert note["truncated"] is True


METADATA = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=50),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(metadata=st.dictionaries(st.text(max_size=20), METADATA, max_size=6))
def test_any_accepted_metadata_encodes_into_a_sendable_notification(metadata: dict[str, Any]) -> None:
    """Whatever metadata validation accepts (any text, surrogates included in what is generated) encodes
    into a body within SQS's characters and size that decodes back to the same metadata."""
    try:
        request = parse_request({"files": [{"source": "a"}], "metadata": metadata})
    except PermanentError as exc:
        assert exc.code == "invalid_request"
        return
    note = notify.failed(
        request_id="r", code="internal", message="x", retryable=True, metadata=request.metadata
    )
    body = notify.encode(note)
    assert OUTSIDE_SQS.search(body) is None
    assert len(body.encode()) <= MAX_METADATA_BYTES + 8 * 1024
    assert json.loads(body)["metadata"] == metadata
