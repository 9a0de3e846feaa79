"""Reading a request body: JSON decoded within a stated memory bound, and an SQS Extended Client pointer
followed into S3 (contract §1, request).

What `json.loads` builds from a body can be 24 times the body: `[{},{},…]` is a 72-byte dict per 3
bytes. So before decoding, the body's structural characters are counted (outside strings, at C speed):
no valid request holds more than `max_json_values(max_files)` of them, and a body that does is refused
before any object is built. What a body costs to decode is then at most what a valid request of its
size costs (docs/settings.md, Memory).
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import botocore.exceptions

from archiver.aws import http_status, retry_transient
from archiver.errors import PermanentError, shown
from archiver.models import MAX_METADATA_BYTES
from archiver.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

EXTENDED_CLIENT_POINTER = "software.amazon.payloadoffloading.PayloadS3Pointer"
# 50,000 files with keys like `example-directory/<uuid>.png` are 4.6 MiB of JSON. Planning costs up to 5
# times the body, 20 times when names mix ASCII and emoji (CPython then stores every character in 4
# bytes): measured, docs/settings.md, Memory. 64 MiB, the limit before, could cost over a GiB.
MAX_POINTER_BYTES = 8 * 1024 * 1024
# Per file at most `{`, three `:` and three `,`; the rest of a request is a few fields and its metadata,
# whose JSON is at most MAX_METADATA_BYTES and so holds at most that many structural characters.
_TOKENS_PER_FILE = 7
_TOKENS_OUTSIDE_FILES = MAX_METADATA_BYTES + 64
_STRING = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)


def max_json_values(max_files: int) -> int:
    """The most structural characters (`{ [ , :`, outside strings) a valid request can hold: an upper
    bound of the objects `json.loads` builds for it, each value and key being one."""
    return _TOKENS_PER_FILE * max_files + _TOKENS_OUTSIDE_FILES


def json_values(body: str) -> int:
    """How many `{ [ , :` a body holds outside its strings."""
    skeleton = _STRING.sub('""', body)
    return sum(skeleton.count(char) for char in "{[,:")


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {shown(key)}")
        result[key] = value
    return result


def decode_body(body: str, *, max_files: int) -> Any:
    """JSON-decode a message body, refusing duplicate keys (json.loads would keep the last silently) and
    bodies with more values than a request of `max_files` files can hold."""
    values = json_values(body)
    if values > (most := max_json_values(max_files)):
        raise PermanentError(
            "too_large",
            f"the body has {values} of '{{', '[', ',' and ':' outside strings; a request of at most"
            f" MAX_FILES ({max_files}) files has at most {most}",
        )
    try:
        return json.loads(body, object_pairs_hook=_reject_duplicate_keys)
    except RecursionError:
        raise PermanentError("invalid_request", "the body is not valid JSON: nested too deeply") from None
    except ValueError as exc:
        raise PermanentError("invalid_request", f"the body is not valid JSON: {exc}") from None


def extended_client_pointer(document: Any) -> tuple[str, str] | None:
    """(bucket, key) if `document` is an SQS Extended Client pointer, else None."""
    if (
        isinstance(document, list)
        and len(document) == 2
        and document[0] == EXTENDED_CLIENT_POINTER
        and isinstance(document[1], dict)
    ):
        bucket, key = document[1].get("s3BucketName"), document[1].get("s3Key")
        if isinstance(bucket, str) and isinstance(key, str) and bucket and key:
            return bucket, key
        raise PermanentError("invalid_request", "extended-client pointer without s3BucketName and s3Key")
    return None


def load_document(s3: S3Client, settings: Settings, body: str) -> Any:
    """The decoded request; an extended-client pointer is followed into S3, within the allow-list."""
    document = decode_body(body, max_files=settings.max_files)
    pointer = extended_client_pointer(document)
    if pointer is None:
        return document
    bucket, key = pointer
    if bucket not in settings.source_buckets:
        raise PermanentError(
            "forbidden_source", f"request pointer names bucket {shown(bucket)}, which is not allowed"
        )
    return decode_body(_read_pointer(s3, bucket, key), max_files=settings.max_files)


@retry_transient
def _read_pointer(s3: S3Client, bucket: str, key: str) -> str:
    try:
        response = s3.get_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as exc:
        where = f"request pointer s3://{bucket}/{key}"
        if http_status(exc) == 404:
            raise PermanentError("invalid_request", f"{where} does not exist") from None
        if http_status(exc) == 403:
            raise PermanentError("forbidden_source", f"access denied to {where}") from None
        raise
    body = response["Body"]
    if response["ContentLength"] > MAX_POINTER_BYTES:
        body.close()
        raise PermanentError(
            "too_large", f"request body in s3://{bucket}/{key} is over {MAX_POINTER_BYTES} bytes"
        )
    # Read no more than the limit whatever the length said, so a wrong one cannot cost more.
    data = body.read(MAX_POINTER_BYTES + 1)
    body.close()
    if len(data) > MAX_POINTER_BYTES:
        raise PermanentError(
            "too_large", f"request body in s3://{bucket}/{key} is over {MAX_POINTER_BYTES} bytes"
        )
    return data.decode("utf-8", errors="replace")
