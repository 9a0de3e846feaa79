"""Sources that can never be read as they are: each a permanent failure with a clear code on its first
delivery, never a retry loop ending in the DLQ as `internal`."""

from __future__ import annotations

from typing import Any

import pytest

from archiver import worker
from tests.conftest import Stack
from tests.faultproxy import FaultProxy


def run_once(stack: Stack, request: dict[str, Any]) -> dict[str, Any]:
    stack.send(request)
    assert worker.run(worker.connect(stack.settings()), burst=True) == 0
    (note,) = stack.notifications(1)
    assert stack.queue_depth() == 0 and stack.queue_depth(stack.dlq_url) == 0
    assert stack.archive_keys() == [] and stack.incomplete_uploads() == []
    return note


@pytest.mark.parametrize("storage_class", ["GLACIER", "DEEP_ARCHIVE"])
def test_an_archived_source_fails_without_an_archive(
    stack: Stack, fault_proxy: FaultProxy, storage_class: str
) -> None:
    """GLACIER or DEEP_ARCHIVE with no finished restore: `source_archived`, from a small source's one
    GET (403 InvalidObjectState; the upload already begun is aborted)."""
    stack.put("a.txt", b"alpha")
    stack.put("cold.jpg", b"frozen", StorageClass=storage_class)
    note = run_once(stack, {"files": [{"source": "a.txt"}, {"source": "cold.jpg"}]})
    assert (note["status"], note["error"]["code"]) == ("failed", "source_archived")
    assert "cold.jpg" in note["error"]["message"]
    assert note["error"]["retryable"] is False
    assert fault_proxy.requests_matching(operation="HeadObject") == []


@pytest.mark.parametrize("storage_class", ["GLACIER", "DEEP_ARCHIVE"])
def test_an_archived_big_source_fails_before_any_upload(
    stack: Stack, fault_proxy: FaultProxy, storage_class: str
) -> None:
    """Sources HEADed first (PREFETCH_BYTES=0): the HEAD says GLACIER or DEEP_ARCHIVE with no finished
    restore, `source_archived` decided before an upload is created."""
    stack.put("a.txt", b"alpha")
    stack.put("cold.jpg", b"frozen", StorageClass=storage_class)
    stack.send({"files": [{"source": "a.txt"}, {"source": "cold.jpg"}]})
    assert worker.run(worker.connect(stack.settings(prefetch_bytes=0)), burst=True) == 0
    (note,) = stack.notifications(1)
    assert (note["status"], note["error"]["code"]) == ("failed", "source_archived")
    assert fault_proxy.requests_matching(operation="CreateMultipartUpload") == []


def test_an_archived_source_the_head_did_not_reveal_fails_on_its_get(
    stack: Stack, fault_proxy: FaultProxy
) -> None:
    """A server whose HEAD leaves out the storage class (sources HEADed first, PREFETCH_BYTES=0): the
    GET's 403 InvalidObjectState is permanent `source_archived`, the upload is aborted, and nothing is
    retried."""
    stack.put("cold.jpg", b"frozen", StorageClass="GLACIER")
    fault_proxy.configure(
        match=lambda seen: seen.operation == "HeadObject" and seen.path.endswith("/cold.jpg"),
        response_headers=(("x-amz-storage-class", None),),
    )
    stack.send({"files": [{"source": "cold.jpg"}]})
    assert worker.run(worker.connect(stack.settings(prefetch_bytes=0)), burst=True) == 0
    (note,) = stack.notifications(1)
    assert (note["status"], note["error"]["code"]) == ("failed", "source_archived")
    assert len(fault_proxy.requests_matching(operation="GetObject", path_contains="cold.jpg")) == 1


def test_a_source_whose_key_the_role_cannot_use_is_forbidden(stack: Stack, fault_proxy: FaultProxy) -> None:
    """An SSE-KMS source without kms:Decrypt passes its HEAD and its GET answers 403 AccessDenied: the
    same answer as a 403 on the HEAD, `forbidden_source`, on the first delivery."""
    stack.put("secret.jpg", b"sealed")
    fault_proxy.configure(
        rate=1.0,
        kinds=("403",),
        match=lambda seen: seen.operation == "GetObject" and seen.path.endswith("/secret.jpg"),
    )
    note = run_once(stack, {"files": [{"source": "secret.jpg"}]})
    assert (note["status"], note["error"]["code"]) == ("failed", "forbidden_source")
    assert len(fault_proxy.requests_matching(operation="GetObject", path_contains="secret.jpg")) == 1
