"""Start-up checks of `archiver worker`: before its first poll, the queues and the buckets its settings name
must exist (the source bucket may refuse listing) and the endpoint must answer (contract §6, settings).

Without them a queue typo ends in a traceback, a bucket typo sends every request to the DLQ, and an
endpoint nobody answers is retried for minutes. Each problem is one line instead: a wrong setting is a
`SettingsError` (exit 2), an endpoint that does not answer is `Unreachable` (exit 69, EX_UNAVAILABLE), so
an orchestrator restarts the task either way and an operator can tell which.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import botocore.exceptions

from archiver import checksums
from archiver.aws import AwsClients, error_code, http_status, is_transient, make_clients
from archiver.errors import SettingsError, Unreachable
from archiver.multipart import choose_part_size
from archiver.request import MAX_POINTER_BYTES
from archiver.settings import MiB, Settings

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

# Enough for LocalStack or S3 to answer, short enough that a wrong endpoint fails in seconds, not the
# minutes of the worker's own retries (6 attempts of 10 s connects, then tenacity's).
CONNECT_TIMEOUT = 3
READ_TIMEOUT = 10
ATTEMPTS = 2

_MISSING_QUEUE = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})
_BAD_CREDENTIALS = frozenset(
    {"InvalidClientTokenId", "InvalidAccessKeyId", "SignatureDoesNotMatch", "UnrecognizedClientException"}
)


def startup_clients(settings: Settings) -> AwsClients:
    return make_clients(
        max_connections=2,
        expected_bucket_owner=settings.expected_bucket_owner,
        attempts=ATTEMPTS,
        timeouts=(CONNECT_TIMEOUT, READ_TIMEOUT),
    )


def check(settings: Settings, clients: AwsClients | None = None) -> None:
    """Raise `SettingsError` naming every queue or bucket setting that names nothing usable, or memory
    settings the container cannot hold; or `Unreachable` at the first call that gets no answer."""
    check_memory(settings, container_memory_limit())
    try:
        clients = clients or startup_clients(settings)
    except ValueError as exc:  # botocore's "Invalid endpoint: …"
        raise SettingsError(f"invalid setting: AWS_ENDPOINT_URL: {exc}") from None
    problems = [
        problem
        for problem in (
            _check_source_queue(clients.sqs, settings.sqs_source_queue),
            _check_destination_queue(clients.sqs, settings.sqs_destination_queue),
            _check_bucket(clients, settings.s3_destination_bucket, settings.expected_bucket_owner),
            _check_source_bucket(clients, settings.s3_source_bucket, settings.expected_bucket_owner),
        )
        if problem
    ]
    if problems:
        raise SettingsError("invalid setting: " + "; ".join(problems))


def _check_source_queue(sqs: SQSClient, name_or_url: str) -> str | None:
    """The worker receives from it and reads its redrive policy, so both calls are tried."""
    where = f"SQS_SOURCE_QUEUE {name_or_url}"
    try:
        url = name_or_url if _is_url(name_or_url) else sqs.get_queue_url(QueueName=name_or_url)["QueueUrl"]
        sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["RedrivePolicy"])
    except Exception as exc:
        return _problem(exc, where=where, service=sqs)
    return None


def _check_destination_queue(sqs: SQSClient, name_or_url: str) -> str | None:
    """The task role may only send to it and get its URL: a URL is checked by the name and account in
    its path (`…/<account>/<name>`), which is how SQS's own URLs are made."""
    where = f"SQS_DESTINATION_QUEUE {name_or_url}"
    try:
        if _is_url(name_or_url):
            path = urlsplit(name_or_url).path.strip("/").split("/")
            if len(path) >= 2 and path[-2].isdigit():
                sqs.get_queue_url(QueueName=path[-1], QueueOwnerAWSAccountId=path[-2])
            else:
                sqs.get_queue_url(QueueName=path[-1])
        else:
            sqs.get_queue_url(QueueName=name_or_url)
    except Exception as exc:
        return _problem(exc, where=where, service=sqs)
    return None


def _check_bucket(clients: AwsClients, bucket: str, owner: str | None) -> str | None:
    """HeadBucket, which needs the s3:ListBucket the worker has on its destination bucket anyway; with
    EXPECTED_BUCKET_OWNER set it also checks the bucket is that account's."""
    return _head_bucket(clients, f"S3_DESTINATION_BUCKET {bucket}", bucket, owner, forbidden_ok=False)


def _check_source_bucket(clients: AwsClients, bucket: str, owner: str | None) -> str | None:
    """A mistyped S3_SOURCE_BUCKET would fail every request that names a plain key as `source_not_found`
    (NoSuchBucket), a permanent failure for requests that are fine. s3:ListBucket on it is recommended,
    not required (contract §3, archive), so a 403 passes: only a bucket that does not exist, or is in
    another region, stops the worker."""
    return _head_bucket(clients, f"S3_SOURCE_BUCKET {bucket}", bucket, owner, forbidden_ok=True)


def _head_bucket(
    clients: AwsClients, where: str, bucket: str, owner: str | None, *, forbidden_ok: bool
) -> str | None:
    try:
        clients.s3.head_bucket(Bucket=bucket)
    except Exception as exc:
        if isinstance(exc, botocore.exceptions.ClientError) and not is_transient(exc):
            status = http_status(exc)
            if status == 404:
                return f"{where}: no such bucket"
            if status == 403 and forbidden_ok:
                return None
            if status == 403:
                owner_note = f" or is not owned by EXPECTED_BUCKET_OWNER {owner}" if owner else ""
                return f"{where}: access denied (the role lacks s3:ListBucket on it{owner_note})"
            if status == 301:
                return f"{where}: the bucket is in another region than AWS_REGION"
        return _problem(exc, where=where, service=clients.s3)
    return None


def _is_url(value: str) -> bool:
    return value.startswith(("https://", "http://"))


def _problem(exc: Exception, *, where: str, service: object) -> str:
    """One line for a failed check, or raise if it is not the setting's fault."""
    endpoint = getattr(getattr(service, "meta", None), "endpoint_url", "the endpoint")
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        raise SettingsError("invalid setting: AWS credentials: none found") from None
    if isinstance(exc, botocore.exceptions.ClientError) and not is_transient(exc):
        code = error_code(exc) or str(http_status(exc))
        if code in _MISSING_QUEUE:
            return f"{where}: no such queue"
        if code in _BAD_CREDENTIALS:
            raise SettingsError(f"invalid setting: AWS credentials rejected by {endpoint} ({code})") from None
        return f"{where}: {code}"
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if is_transient(exc):
        raise Unreachable(f"cannot reach {endpoint}: {detail}") from None
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return f"{where}: {detail}"
    raise exc


# The memory formula (docs/settings.md, Memory): the interpreter and an idle worker, 6 MiB more with awscrt
# installed (the crc64nvme extra: botocore then loads its C runtime, used or not); a copied entry's
# 5 MiB lead, one small deflate entry past 4 GiB held to be STORED (16 MiB), and obstore's runtime with
# the source GETs' threads and sockets (10 MiB); reading and planning the request, 1 KiB a file and its
# text five times over (what that frees then holds the central directory, 300 B an entry).
BASELINE_BYTES = 75 * MiB
AWSCRT_BYTES = 6 * MiB
EXTRA_BYTES = 36 * MiB
REQUEST_BYTES_PER_FILE = 1024
REQUEST_TEXT_COPIES = 5


def baseline_bytes() -> int:
    """The idle worker's share of the memory formula, as installed here."""
    return BASELINE_BYTES + (AWSCRT_BYTES if checksums.awscrt_installed() else 0)


def memory_needed(settings: Settings) -> int:
    """The most memory the worker may need at these settings for a request of plain names: parts
    uploading, the one being filled and the one cut where a copy starts, at the largest part size
    MAX_ARCHIVE_BYTES may grow them to; read-ahead; the largest request the limits accept; the rest
    (docs/settings.md, Memory; deploy/README.md)."""
    part_size = choose_part_size(
        settings.max_archive_bytes + settings.max_archive_bytes // 50, settings.part_size
    )
    request = REQUEST_BYTES_PER_FILE * settings.max_files + REQUEST_TEXT_COPIES * MAX_POINTER_BYTES
    return (
        baseline_bytes()
        + (settings.upload_concurrency + 2) * part_size
        + settings.prefetch_bytes
        + request
        + EXTRA_BYTES
    )


def check_memory(settings: Settings, limit: int | None) -> None:
    """PART_SIZE x UPLOAD_CONCURRENCY + PREFETCH_BYTES must fit the container: found at start-up, not
    as an OOM kill in the middle of the first big archive."""
    needed = memory_needed(settings)
    if limit is not None and needed > limit:
        raise SettingsError(
            "invalid setting: PART_SIZE, UPLOAD_CONCURRENCY and PREFETCH_BYTES need up to"
            f" {needed // MiB} MiB (docs/settings.md, Memory), more than the {limit // MiB} MiB"
            " this container may use"
        )


def container_memory_limit(
    cgroup: Path = Path("/sys/fs/cgroup"), metadata_uri: str | None = None
) -> int | None:
    """The memory this process may use, in bytes: the smaller of its cgroup's limit (v2 memory.max, v1
    memory.limit_in_bytes) and, on ECS, the task's (task metadata endpoint v4, `Limits.Memory` in MiB).
    None where neither says."""
    limits = [limit for limit in (_cgroup_limit(cgroup), _ecs_task_limit(metadata_uri)) if limit]
    return min(limits) if limits else None


def _cgroup_limit(cgroup: Path) -> int | None:
    for name in ("memory.max", "memory/memory.limit_in_bytes"):
        try:
            text = (cgroup / name).read_text(encoding="utf-8").strip()
        except OSError:
            continue
        # "max", or v1's "unlimited" (a number near 2^63): no limit.
        return int(text) if text.isdigit() and int(text) < 1 << 60 else None
    return None


def _ecs_task_limit(metadata_uri: str | None) -> int | None:
    uri = metadata_uri or os.environ.get("ECS_CONTAINER_METADATA_URI_V4")
    if not uri:
        return None
    try:
        with urllib.request.urlopen(f"{uri}/task", timeout=2) as response:  # noqa: S310 - the agent's URI
            memory = json.loads(response.read()).get("Limits", {}).get("Memory")
    except (OSError, ValueError):
        return None  # the check is a courtesy; the worker runs without it
    return int(memory) * MiB if isinstance(memory, int | float) and memory > 0 else None
