"""Where moto's server (5.x) differs from S3 and SQS in ways the daemon depends on, made to behave as AWS
documents, for the embedded stack the demo and every test run on. Each fix is applied once per process.
"""

from __future__ import annotations

import threading
from typing import Any


def apply() -> None:
    _make_sqs_deletes_atomic()
    _make_conditional_puts_atomic()
    _check_completions()


def _make_sqs_deletes_atomic() -> None:
    """moto (5.x) deletes a message by rebuilding the queue's list outside the lock its sends take: two
    workers deleting at once, or a delete beside a send, can bring a deleted message back or drop a sent
    one, which SQS never does. Deletes then take that same lock (once per process)."""
    from moto.sqs.models import Queue

    delete = Queue.delete_message
    if getattr(delete, "atomic", False):
        return

    def atomic_delete(self: Queue, receipt_handle: str) -> None:
        with self._messages_lock:
            delete(self, receipt_handle)

    atomic_delete.atomic = True  # type: ignore[attr-defined]
    Queue.delete_message = atomic_delete  # type: ignore[method-assign]


# One at a time: moto checks If-Match / If-None-Match and then writes, as two steps.
_CONDITIONAL_PUTS = threading.Lock()


def _make_conditional_puts_atomic() -> None:
    """moto (5.x) checks a PutObject's If-None-Match or If-Match, then writes, without a lock: two
    conditional writes at once can both pass, where S3 lets exactly one win (what a lease, a claim and
    decision.json rest on). Conditional PUTs then run one at a time (once per process)."""
    from moto.s3.responses import S3Response

    put = S3Response.put_object
    if getattr(put, "atomic", False):
        return

    def atomic_put(self: S3Response) -> Any:
        if "If-None-Match" in self.headers or "If-Match" in self.headers:
            with _CONDITIONAL_PUTS:
                return put(self)
        return put(self)

    atomic_put.atomic = True  # type: ignore[attr-defined]
    S3Response.put_object = atomic_put  # type: ignore[method-assign]


# The request a CompleteMultipartUpload is being answered for, seen by the upload's completion.
_COMPLETING = threading.local()


def _check_completions() -> None:
    """moto completes any upload whose parts are in ascending order, and takes a full-object checksum
    without looking at it. S3 refuses both of what it documents: part numbers that do not start at 1 and
    run without gaps on an upload with part checksums (InvalidPartOrder), and a full-object checksum
    or object size (`x-amz-mp-object-size`) that is not the parts' (BadDigest, InvalidRequest)."""
    from moto.s3.exceptions import InvalidPartOrder, S3ClientError
    from moto.s3.models import FakeMultipart
    from moto.s3.responses import S3Response

    post = S3Response._key_response_post
    if getattr(post, "checked", False):
        return

    def completing(self: S3Response, request: Any, body: bytes, *args: Any, **kwargs: Any) -> Any:
        _COMPLETING.headers = request.headers
        try:
            return post(self, request, body, *args, **kwargs)
        finally:
            _COMPLETING.headers = None

    complete = FakeMultipart.complete

    def checked_complete(self: FakeMultipart, body: Any) -> Any:
        parts = list(body)
        algorithm = self.metadata.get("x-amz-checksum-algorithm")
        if algorithm and [number for number, _ in parts] != list(range(1, len(parts) + 1)):
            raise InvalidPartOrder()
        value, etag, checksum = complete(self, iter(parts))
        headers = getattr(_COMPLETING, "headers", None) or {}
        size = headers.get("x-amz-mp-object-size")
        if size is not None and int(size) != len(value):
            raise S3ClientError("InvalidRequest", f"the object size {size} is not the parts' {len(value)}")
        sent = headers.get(f"x-amz-checksum-{algorithm.lower()}") if algorithm else None
        if sent is not None and checksum is not None and checksum[0] == "FULL_OBJECT" and sent != checksum[1]:
            raise S3ClientError(
                "BadDigest", f"The {algorithm} you specified did not match the calculated checksum."
            )
        return value, etag, checksum

    completing.checked = True  # type: ignore[attr-defined]
    S3Response._key_response_post = completing  # type: ignore[method-assign]
    FakeMultipart.complete = checked_complete  # type: ignore[method-assign]
