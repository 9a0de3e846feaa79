"""Where users lose things: what happens to a request's message around its notification, its duplicates
and another worker's lease (docs/operations.md, Failure modes; contract §5, delivery semantics). Each test
here fails on a build with one deliberate bug put into the settling of a message (docs/mutation.md names
them); the lease's deferral is tested in tests/test_leases.py.

The worker's clients go through the fault proxy, which records every call in the order it arrived and
when; release delays are read from the message's own visibility, timed from the release call."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from archiver import queue, worker
from archiver.models import utc_timestamp
from archiver.settle import release_delay
from tests.conftest import Stack, wait_for
from tests.faultproxy import FaultProxy, Seen
from tests.zipcheck import check_archive

STATUS = "download/{0}/status.json"


def visible(stack: Stack) -> int:
    """Messages of the source queue that a receive would get now (in-flight ones not counted)."""
    attributes = stack.clients.sqs.get_queue_attributes(
        QueueUrl=stack.source_url, AttributeNames=["ApproximateNumberOfMessages"]
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"])


def write_status(stack: Stack, request_id: str, document: dict[str, Any]) -> None:
    stack.clients.s3.put_object(
        Bucket=stack.destination_bucket, Key=STATUS.format(request_id), Body=json.dumps(document).encode()
    )


def lapse_deliveries(stack: Stack, count: int) -> None:
    """Receive the only message `count` times without working on it: the next delivery is count + 1."""
    for _ in range(count):
        assert queue.receive(stack.clients.sqs, stack.source_url, wait_seconds=1, visibility_timeout=0)


def operations(proxy: FaultProxy, *names: str) -> list[Seen]:
    return [seen for seen in proxy.requests_matching() if seen.operation in names]


def back_after(proxy: FaultProxy, stack: Stack, *, timeout: float) -> float:
    """Seconds from the worker's last visibility change (its release) until the message is visible:
    at least the delay it was released with, whatever the machine's load."""
    (*_, release) = operations(proxy, "ChangeMessageVisibility")
    wait_for(lambda: visible(stack), timeout=timeout, what="the released message to be visible again")
    return time.monotonic() - release.at


def sqs_calls(seen: Seen, name: str) -> bool:
    return seen.service == "sqs" and seen.operation == name


# ---------------------------------------------------------------------- notify first, then delete


def test_a_notification_that_cannot_be_sent_leaves_the_message_to_come_back(
    stack: Stack, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """The archive is built but SQS refuses its notification: the request message is not deleted (a
    crash between the two must never lose the notification), the status stays `completed`, and the
    message comes back after its backoff; the redelivery only re-sends the notification. When both
    calls work, the notification goes first."""
    stack.put("a.txt", b"alpha" * 100)
    request = {"request_id": "unsent", "files": [{"source": "a.txt"}]}
    stack.send(request)
    fault_proxy.configure(rate=1.0, kinds=("403",), match=lambda seen: sqs_calls(seen, "SendMessage"))
    w = worker.connect(stack.settings())
    worker.run(w, burst=True)

    assert [seen.fault for seen in operations(fault_proxy, "SendMessage")] == ["403"]
    assert operations(fault_proxy, "DeleteMessage") == []
    assert stack.status("unsent")["status"] == "completed"  # not `queued`: the archive exists
    assert back_after(fault_proxy, stack, timeout=20) >= release_delay(1, 30)

    fault_proxy.configure()
    mark = fault_proxy.mark()
    worker.run(w, burst=True)
    (note,) = stack.notifications(1)
    assert note["status"] == "completed"
    settling = ("SendMessage", "DeleteMessage")
    calls = [seen.operation for seen in fault_proxy.requests_matching(service="sqs", since=mark)]
    assert [operation for operation in calls if operation in settling] == list(settling)
    assert len(operations(fault_proxy, "CreateMultipartUpload")) == 1  # built once, re-notified
    with urllib.request.urlopen(note["archive"]["url"], timeout=30) as response:
        check_archive(response.read(), {"a.txt": b"alpha" * 100}, tmp_path)
    assert stack.queue_depth() == 0


def test_a_delete_that_fails_on_the_last_delivery_is_no_failure(
    stack: Stack, fault_proxy: FaultProxy
) -> None:
    """On the delivery before the DLQ the archive is built and notified, then the delete is refused:
    the producer has its `completed` notification and hears nothing else (no retryable `failed`
    notice), and the status stays `completed` (a redrive re-sends it)."""
    stack.put("a.txt", b"alpha")
    stack.send({"request_id": "undeleted", "files": [{"source": "a.txt"}]})
    lapse_deliveries(stack, 2)  # the worker gets delivery 3 of 3
    fault_proxy.configure(rate=1.0, kinds=("403",), match=lambda seen: sqs_calls(seen, "DeleteMessage"))
    worker.run(worker.connect(stack.settings()), burst=True)

    assert [seen.fault for seen in operations(fault_proxy, "DeleteMessage")] == ["403"]
    notes = stack.notifications(2, max_polls=3)
    assert [note["status"] for note in notes] == ["completed"]
    assert stack.status("undeleted")["status"] == "completed"


# ---------------------------------------------------------------------- duplicates


def test_a_duplicate_gets_a_fresh_link_and_timestamp(stack: Stack, tmp_path: Path) -> None:
    """A request sent again long after it completed (a redrive, a producer's retry) gets the stored
    notification with a link made now, which works, and today's `created_at`, not the first one's."""
    stack.put("a.txt", b"alpha")
    request = {"request_id": "again", "files": [{"source": "a.txt"}], "metadata": {"n": 1}}
    stack.send(request)
    w = worker.connect(stack.settings())
    worker.run(w, burst=True)
    (first,) = stack.notifications(1)
    document = stack.status("again")
    assert "url" not in document["notification"]["archive"]  # a presigned link is a credential
    document["notification"]["created_at"] = "2001-02-03T04:05:06Z"  # as if completed long ago
    write_status(stack, "again", document)

    resent_after = utc_timestamp()
    stack.send(request)
    worker.run(w, burst=True)
    (again,) = stack.notifications(1)
    assert again["created_at"] >= resent_after

    def without_links(note: dict[str, Any]) -> dict[str, Any]:
        return {
            **note,
            "created_at": None,
            "archive": {**note["archive"], "url": None},
            "manifest": {**note["manifest"], "url": None},
        }

    assert without_links(again) == without_links(first)
    assert "url" not in document["notification"]["manifest"]
    with urllib.request.urlopen(again["archive"]["url"], timeout=30) as response:
        check_archive(response.read(), {"a.txt": b"alpha"}, tmp_path)


# ---------------------------------------------------------------------- failures before any upload


@pytest.mark.parametrize("case", ["missing", "archived", "too large"])
@pytest.mark.parametrize("heads_first", [True, False], ids=["heads-first", "one-get"])
def test_requests_that_cannot_succeed_never_leave_an_archive(
    stack: Stack, fault_proxy: FaultProxy, case: str, heads_first: bool
) -> None:
    """A missing source (`on_missing: fail`), a source in Glacier, sources over MAX_ARCHIVE_BYTES. With
    every source HEADed first (PREFETCH_BYTES=0): after the HEADs, before CreateMultipartUpload. With one
    GET per small source (the default, §3, archive): no HEAD at all, and the upload created meanwhile is
    aborted, never completed. Counted at the proxy, since an upload created then aborted would leave the
    bucket looking the same as one never created."""
    stack.put("a.txt", b"a" * 600)
    stack.put("cold.txt", b"cold", StorageClass="GLACIER")
    stack.put("b.txt", b"b" * 600)
    second, code = {
        "missing": ("gone.txt", "source_not_found"),
        "archived": ("cold.txt", "source_archived"),
        "too large": ("b.txt", "too_large"),
    }[case]
    stack.send({"request_id": "early", "files": [{"source": "a.txt"}, {"source": second}]})
    prefetch = {"prefetch_bytes": 0} if heads_first else {}
    worker.run(worker.connect(stack.settings(max_archive_bytes=1000, **prefetch)), burst=True)

    (note,) = stack.notifications(1)
    assert (note["status"], note["error"]["code"], note["error"]["retryable"]) == ("failed", code, False)
    heads = {seen.path.rsplit("/", 1)[1] for seen in operations(fault_proxy, "HeadObject")}
    created = operations(fault_proxy, "CreateMultipartUpload")
    if heads_first:
        assert heads == {"a.txt", second}
        assert created == []
    else:
        assert heads == set()
        assert len(created) == len(operations(fault_proxy, "AbortMultipartUpload")) <= 1
    assert operations(fault_proxy, "CompleteMultipartUpload") == []
    assert stack.archive_keys() == [] and stack.incomplete_uploads() == []
    assert stack.queue_depth() == 0
