"""boto3 clients configured once for the whole worker, the obstore stores that read sources with the same
endpoint, region and credentials, and the classification of AWS errors."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import boto3
import botocore.exceptions
import obstore.exceptions
import urllib3.exceptions
from botocore.config import Config
from obstore.auth.boto3 import Boto3CredentialProvider
from obstore.store import S3Store
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_random_exponential

if TYPE_CHECKING:
    from mypy_boto3_events import EventBridgeClient
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sns import SNSClient
    from mypy_boto3_sqs import SQSClient
    from obstore.store import S3Config

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


# obstore's errors carry the server's answer in their message: "... non-2xx status code: 403 Forbidden:
# <?xml ...><Error><Code>InvalidObjectState</Code>...".
_OBSTORE_STATUS = re.compile(r"status code: (\d{3})")
_OBSTORE_CODE = re.compile(r"<Code>([^<]*)</Code>")


def error_code(exc: BaseException) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    if isinstance(exc, obstore.exceptions.BaseError):
        found = _OBSTORE_CODE.search(str(exc))
        return found.group(1) if found else ""
    return ""


def http_status(exc: BaseException) -> int:
    if isinstance(exc, botocore.exceptions.ClientError):
        return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    if isinstance(exc, obstore.exceptions.BaseError):
        found = _OBSTORE_STATUS.search(str(exc))
        return int(found.group(1)) if found else 0
    return 0


def is_transient(exc: BaseException) -> bool:
    """Throttling, 5xx, timeouts and broken connections: worth trying again."""
    if isinstance(exc, _NETWORK_ERRORS):
        return True
    if isinstance(exc, obstore.exceptions.GenericError):
        # object_store has retried 5xx and broken connections itself already; an answer without a status
        # is a connection or body that broke, one with a 4xx other than throttling is final.
        status = http_status(exc)
        return status == 0 or status >= 500 or status in (408, 429) or error_code(exc) in _THROTTLING_CODES
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


class SourceStores:
    """obstore (Rust object_store) stores that GET source objects, one per bucket: 4-6x less CPU per
    request than botocore (bench/candidates.py), which decides how many small objects a process reads per
    second once S3's latency is hidden by many requests in flight. They use the boto3 S3 client's
    endpoint and region and its session's credentials (refreshed through boto3, so an ECS task role
    works), send ExpectedBucketOwner as a signed header when it is set, and are used only for GETs:
    HEADs, copies and the upload stay with boto3."""

    def __init__(self, s3: S3Client, session: boto3.session.Session, expected_bucket_owner: str | None):
        self._endpoint = s3.meta.endpoint_url
        self._region = s3.meta.region_name
        self._owner = expected_bucket_owner
        self._session = session
        self._credentials: Boto3CredentialProvider | None = None  # made on first use, like boto3's
        self._stores: dict[str, S3Store] = {}
        self._lock = threading.Lock()

    def __call__(self, bucket: str) -> S3Store:
        with self._lock:
            store = self._stores.get(bucket)
            if store is None:
                store = self._stores[bucket] = self._make(bucket)
            return store

    def _make(self, bucket: str) -> S3Store:
        if self._credentials is None:
            # Frozen for 5 minutes at most: botocore refreshes an expiring role's credentials 10-15
            # minutes before their end, so a frozen copy is never used past it.
            self._credentials = Boto3CredentialProvider(self._session, ttl=timedelta(minutes=5))
        host = urlsplit(self._endpoint).hostname or ""
        config: S3Config = {"region": self._region or "us-east-1"}
        if host.endswith((".amazonaws.com", ".amazonaws.com.cn")):
            # The region's endpoint, virtual-hosted like boto3's; path style for dotted names, whose host
            # would not match S3's certificate.
            config["virtual_hosted_style_request"] = "." not in bucket
        else:
            config["endpoint"] = self._endpoint  # LocalStack, SeaweedFS, moto: path style, like boto3
        headers = {"x-amz-expected-bucket-owner": self._owner} if self._owner else {}
        return S3Store(
            bucket,
            config=config,
            client_options={
                "allow_http": self._endpoint.startswith("http://"),
                "connect_timeout": timedelta(seconds=10),
                # A whole GET, body included: sources read here are small (6 MiB by default). A server
                # that stalls mid-body (seen once in SeaweedFS under load) costs this long, then the
                # read resumes.
                "timeout": timedelta(seconds=20),
                "default_headers": headers,
            },
            retry_config={"max_retries": 5, "retry_timeout": timedelta(seconds=60)},
            credential_provider=self._credentials,
        )


@dataclass(frozen=True)
class AwsClients:
    s3: S3Client
    sqs: SQSClient
    # A twin without ExpectedBucketOwner: a presigned URL must not sign headers the downloader won't send.
    presign: S3Client
    # Readers of source objects' bytes (GET only), made on first use.
    stores: SourceStores | None = field(default=None, compare=False)
    # Notification targets besides the queue (archiver.publish), called only when configured.
    sns: SNSClient | None = field(default=None, compare=False)
    events: EventBridgeClient | None = field(default=None, compare=False)

    def source_store(self, bucket: str) -> S3Store:
        if self.stores is None:
            raise RuntimeError("these clients have no source stores")
        return self.stores(bucket)


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
        # Over http:// botocore would SHA-256 every byte uploaded to sign it; over https:// (AWS) it does
        # not, and neither do we: every part carries a CRC-32 the server checks (docs/decisions.md).
        s3={"payload_signing_enabled": False},
    )
    session = boto3.session.Session()
    s3 = session.client("s3", config=config)
    if expected_bucket_owner:
        s3.meta.events.register("before-parameter-build.s3", _expect_owner(expected_bucket_owner))
    sqs = session.client("sqs", config=config)
    presign = session.client("s3", config=config, endpoint_url=link_endpoint)
    stores = SourceStores(s3, session, expected_bucket_owner)
    return AwsClients(
        s3=s3,
        sqs=sqs,
        presign=presign,
        stores=stores,
        sns=session.client("sns", config=config),
        events=session.client("events", config=config),
    )
