"""boto3 clients configured once for the whole worker, and the classification of AWS errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import boto3
import botocore.exceptions
import urllib3.exceptions
from botocore.config import Config
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_random_exponential

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sqs import SQSClient

_THROTTLING_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "AWS.SimpleQueueService.ServiceUnavailable",
        "KmsThrottled",
    }
)

_NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.ReadTimeoutError,
    ConnectionError,
    TimeoutError,
)


def error_code(exc: BaseException) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def http_status(exc: BaseException) -> int:
    if isinstance(exc, botocore.exceptions.ClientError):
        return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    return 0


def is_transient(exc: BaseException) -> bool:
    """Throttling, 5xx, timeouts and broken connections: worth trying again."""
    if isinstance(exc, _NETWORK_ERRORS):
        return True
    if isinstance(exc, botocore.exceptions.ClientError):
        # 501 Not Implemented is an answer, not an outage.
        return error_code(exc) in _THROTTLING_CODES or (http_status(exc) >= 500 and http_status(exc) != 501)
    return False


# Around whole steps, on top of botocore's own per-request retries: a step that failed after those
# (a SlowDown burst, a connection reset mid-body) gets a few more tries, jittered, before the message
# is released for redelivery.
retry_transient = retry(
    retry=retry_if_exception(is_transient),
    wait=wait_random_exponential(multiplier=0.5, max=8),
    stop=stop_after_attempt(4),
    reraise=True,
)


@dataclass(frozen=True)
class AwsClients:
    s3: S3Client
    sqs: SQSClient
    # A twin without ExpectedBucketOwner: a presigned URL must not sign headers the downloader won't send.
    presign: S3Client


def _expect_owner(owner: str) -> Any:
    def add_owner(params: dict[str, Any], model: Any, **_: Any) -> None:
        for name in ("ExpectedBucketOwner", "ExpectedSourceBucketOwner"):  # the latter on copies
            if name in model.input_shape.members:
                params.setdefault(name, owner)

    return add_owner


def make_clients(
    *,
    max_connections: int = 16,
    expected_bucket_owner: str | None = None,
    link_endpoint: str | None = None,
    attempts: int = 6,
    timeouts: tuple[float, float] = (10, 60),
) -> AwsClients:
    """Clients for S3 and SQS; region, endpoint and credentials come from the standard AWS variables.

    `link_endpoint` is where presigned links are signed for, if not the endpoint the worker calls;
    `attempts` and `timeouts` (connect, read) bound each call, retries included."""
    connect_timeout, read_timeout = timeouts
    config = Config(
        retries={"mode": "adaptive", "max_attempts": attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=max_connections,
        tcp_keepalive=True,
        signature_version="s3v4",
    )
    session = boto3.session.Session()
    s3 = session.client("s3", config=config)
    if expected_bucket_owner:
        s3.meta.events.register("before-parameter-build.s3", _expect_owner(expected_bucket_owner))
    sqs = session.client("sqs", config=config)
    presign = session.client("s3", config=config, endpoint_url=link_endpoint)
    return AwsClients(s3=s3, sqs=sqs, presign=presign)
