"""`archiver demo`: the whole flow against an embedded AWS stack (moto's server on 127.0.0.1, no Docker).

It creates the original service's resources, uploads sample objects, sends requests like the contract's
examples, runs the real worker in burst mode, then follows every notification's link and checks each
archive entry by entry. Exit 0 only if every check passed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import struct
import sys
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from boto3.s3.transfer import TransferConfig

from archiver import motofixes, queue
from archiver.assembly import LEAD_BYTES
from archiver.aws import AwsClients, make_clients
from archiver.settings import Settings, load_settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sqs import SQSClient

REGION = "us-east-1"
SOURCE_BUCKET = "source-images"
PARTNER_BUCKET = "partner-images"
DESTINATION_BUCKET = "zip-storage"
SOURCE_QUEUE = "input-queue"
DEAD_LETTER_QUEUE = "input-queue-dlq"
DESTINATION_QUEUE = "output-queue"
MAX_RECEIVE_COUNT = 3


@contextlib.contextmanager
def embedded_stack(*, access_key: str = "demo", secret_key: str = "demo") -> Iterator[str]:  # noqa: S107
    """Start moto's server on a free port of 127.0.0.1 and point boto3 at it (moto accepts any
    credentials); yields the endpoint URL, and puts the environment back afterwards."""
    from moto.server import ThreadedMotoServer

    motofixes.apply()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in _STACK_ENV}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_REGION=REGION,
        AWS_DEFAULT_REGION=REGION,
        AWS_ACCESS_KEY_ID=access_key,
        AWS_SECRET_ACCESS_KEY=secret_key,
    )
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_STACK_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
)


def create_resources(s3: S3Client, sqs: SQSClient) -> None:
    """The same buckets and queues as localstack-init/ready.d/init-resources.sh."""
    for bucket in (SOURCE_BUCKET, PARTNER_BUCKET, DESTINATION_BUCKET):
        s3.create_bucket(Bucket=bucket)
    dlq_url = sqs.create_queue(QueueName=DEAD_LETTER_QUEUE, Attributes={"MessageRetentionPeriod": "1209600"})[
        "QueueUrl"
    ]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    sqs.create_queue(
        QueueName=SOURCE_QUEUE,
        Attributes={
            "VisibilityTimeout": "120",
            "RedrivePolicy": json.dumps(
                {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": MAX_RECEIVE_COUNT}
            ),
        },
    )
    sqs.create_queue(QueueName=DESTINATION_QUEUE)


# What the AWS CLI and boto3's upload_file do with anything over 8 MiB.
IN_PARTS = TransferConfig(multipart_threshold=8 * 1024 * 1024, multipart_chunksize=8 * 1024 * 1024)
# The smallest threshold allowed, so a sample of a few MiB shows server-side assembly.
DEMO_COPY_MIN_BYTES = 16 * 1024 * 1024


def demo_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "sqs_source_queue": SOURCE_QUEUE,
        "sqs_destination_queue": DESTINATION_QUEUE,
        "s3_source_bucket": SOURCE_BUCKET,
        "s3_destination_bucket": DESTINATION_BUCKET,
        "allowed_source_buckets": f"{SOURCE_BUCKET},{PARTNER_BUCKET}",
        "health_file": os.path.join(os.environ.get("TMPDIR", "/tmp"), "archiver-demo.heartbeat"),  # noqa: S108
        "part_size": 5 * 1024 * 1024,
        "server_side_copy_min_bytes": DEMO_COPY_MIN_BYTES,
    }
    values.update(overrides)
    return load_settings(**values)


# ------------------------------------------------------------------------------------------- sample data


def png(width: int, height: int, seed: int) -> bytes:
    """A real, viewable RGB PNG: a colour gradient, different for each seed."""
    rows = bytearray()
    for y in range(height):
        rows.append(0)  # filter: none
        for x in range(width):
            rows += bytes(
                ((x * 255 // width + seed * 40) % 256, (y * 255 // height) % 256, (seed * 85) % 256)
            )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(rows)))
        + chunk(b"IEND", b"")
    )


SAMPLES: dict[tuple[str, str], bytes] = {
    (SOURCE_BUCKET, "example-directory/uuid1.png"): png(320, 200, 1),
    (PARTNER_BUCKET, "example-directory/uuid2.png"): png(320, 200, 2),
    (SOURCE_BUCKET, "example-directory/uuid3.png"): png(640, 400, 3),
    (SOURCE_BUCKET, "example-directory/readme.txt"): ("archiver demo: a text file.\n" * 40_000).encode(),
    (SOURCE_BUCKET, "voyages/café-crème.txt"): "Un café crème, s'il vous plaît. ☕\n".encode() * 500,
    (SOURCE_BUCKET, "voyages/東京/夜景.png"): png(200, 200, 4),
    (SOURCE_BUCKET, "trip-a/photo.jpg"): os.urandom(300_000),
    (SOURCE_BUCKET, "trip-b/photo.jpg"): os.urandom(200_000),
    # Big enough for server-side assembly at the demo's threshold (DEMO_COPY_MIN_BYTES).
    (SOURCE_BUCKET, "films/rushes.mp4"): os.urandom(24 * 1024 * 1024 + 321),
    # Uploaded in 8 MiB parts, as `aws s3 cp` does: its checksum is a composite, not its CRC-32.
    (SOURCE_BUCKET, "films/trailer.mp4"): os.urandom(12 * 1024 * 1024 + 17),
}
UPLOADED_IN_PARTS = frozenset({(SOURCE_BUCKET, "films/trailer.mp4")})


@dataclass(frozen=True)
class DemoCase:
    title: str
    request: dict[str, Any]
    # entry path -> (bucket, key) of the sample it must hold; empty for an expected failure
    expected: dict[str, tuple[str, str]]
    expected_error: str | None = None
    copied: str | None = None  # the source key S3 must copy server-side, all but its first 5 MiB


CASES = (
    DemoCase(
        title="the contract's example: folders, another allowed bucket, a chosen name",
        request={
            "files": [
                {"source": "example-directory/uuid1.png", "destination": "album_1"},
                {"source": f"s3://{PARTNER_BUCKET}/example-directory/uuid2.png", "destination": "album_1"},
                {"source": "example-directory/uuid3.png", "destination": "album_2", "name": "cover.png"},
                {"source": "example-directory/readme.txt"},
            ],
            "metadata": {"user_email": "someone@example.com"},
        },
        expected={
            "album_1/uuid1.png": (SOURCE_BUCKET, "example-directory/uuid1.png"),
            "album_1/uuid2.png": (PARTNER_BUCKET, "example-directory/uuid2.png"),
            "album_2/cover.png": (SOURCE_BUCKET, "example-directory/uuid3.png"),
            "readme.txt": (SOURCE_BUCKET, "example-directory/readme.txt"),
        },
    ),
    DemoCase(
        title="non-ASCII names, a duplicate name renamed, a missing file skipped",
        request={
            "request_id": "holiday-2026",
            "archive_name": "vacances été.zip",
            "on_missing": "skip",
            "files": [
                {"source": "voyages/café-crème.txt", "destination": "notes"},
                {"source": "voyages/東京/夜景.png", "destination": "東京"},
                {"source": "trip-a/photo.jpg"},
                {"source": "trip-b/photo.jpg"},
                {"source": "trip-c/does-not-exist.jpg"},
            ],
            "metadata": {"album": "Été 2026", "pages": 2},
        },
        expected={
            "notes/café-crème.txt": (SOURCE_BUCKET, "voyages/café-crème.txt"),
            "東京/夜景.png": (SOURCE_BUCKET, "voyages/東京/夜景.png"),
            "photo.jpg": (SOURCE_BUCKET, "trip-a/photo.jpg"),
            "photo (1).jpg": (SOURCE_BUCKET, "trip-b/photo.jpg"),
        },
    ),
    DemoCase(
        title=(
            "a 24 MiB video copied inside S3 (UploadPartCopy): only its first 5 MiB pass the worker;"
            " a 12 MiB one uploaded in parts, streamed"
        ),
        request={
            "request_id": "rushes",
            "files": [
                {"source": "films/rushes.mp4"},
                {"source": "films/trailer.mp4"},
                {"source": "example-directory/readme.txt"},
            ],
        },
        expected={
            "rushes.mp4": (SOURCE_BUCKET, "films/rushes.mp4"),
            "trailer.mp4": (SOURCE_BUCKET, "films/trailer.mp4"),
            "readme.txt": (SOURCE_BUCKET, "example-directory/readme.txt"),
        },
        copied="films/rushes.mp4",
    ),
    DemoCase(
        title="a typo ('file' for 'files') is rejected with a clear reason, nothing archived",
        request={"file": [{"source": "example-directory/uuid1.png"}], "request_id": "typo"},
        expected={},
        expected_error="invalid_request",
    ),
)


# ------------------------------------------------------------------------------------------- checks


def verify_archive(data: bytes, expected: dict[str, bytes]) -> list[str]:
    """Every problem found in the archive: names, bytes, CRCs. Empty when it is right."""
    problems: list[str] = []
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        if sorted(names) != sorted(expected):
            problems.append(f"entries {sorted(names)} != expected {sorted(expected)}")
        bad = archive.testzip()
        if bad is not None:
            problems.append(f"CRC mismatch in {bad}")
        for name in set(names) & set(expected):
            info = archive.getinfo(name)
            if not info.flag_bits & 0x800:
                problems.append(f"{name}: UTF-8 flag not set")
            if archive.read(name) != expected[name]:
                problems.append(f"{name}: bytes differ from the source")
    return problems


def _collect_notifications(sqs: SQSClient, url: str, count: int) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for _ in range(10):
        if len(found) >= count:
            break
        response = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        for message in response.get("Messages", []):
            body = json.loads(message["Body"])
            found[body["request_id"]] = body
            sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    return found


def run_demo(*, verbose: bool = False, out: Any = None) -> int:
    from archiver import worker
    from archiver.logs import configure_logging

    out = out or sys.stdout
    logs = io.StringIO()
    configure_logging(debug=False, dev_mode=True, stream=sys.stderr if verbose else logs)
    with embedded_stack() as endpoint:
        print(f"embedded AWS stack (moto) on {endpoint}", file=out)
        clients: AwsClients = make_clients()
        create_resources(clients.s3, clients.sqs)
        for (bucket, key), body in SAMPLES.items():
            if (bucket, key) in UPLOADED_IN_PARTS:
                clients.s3.upload_fileobj(io.BytesIO(body), bucket, key, Config=IN_PARTS)
            else:
                clients.s3.put_object(Bucket=bucket, Key=key, Body=body)
        print(f"uploaded {len(SAMPLES)} sample objects to {SOURCE_BUCKET} and {PARTNER_BUCKET}", file=out)

        settings = demo_settings()
        source_url = queue.resolve_queue_url(clients.sqs, SOURCE_QUEUE)
        request_ids = {}
        for case in CASES:
            message_id = queue.send(clients.sqs, source_url, json.dumps(case.request))
            request_ids[case.request.get("request_id", message_id)] = case
        print(f"sent {len(CASES)} requests to {SOURCE_QUEUE}; running the worker in burst mode", file=out)

        copies = _count_copies(clients.s3)
        embedded = worker.connect(settings, clients)
        embedded.emit_metrics = False  # the demo prints notifications; metric lines would bury them
        worker.run(embedded, burst=True)

        notifications = _collect_notifications(
            clients.sqs, queue.resolve_queue_url(clients.sqs, DESTINATION_QUEUE), len(CASES)
        )
        failures = sum(
            _report_case(case, notifications.get(request_id), copies, out)
            for request_id, case in request_ids.items()
        )
    if failures:
        print(f"\ndemo FAILED: {failures} of {len(CASES)} requests did not check out", file=out)
        if not verbose:
            print(logs.getvalue(), file=sys.stderr)
        return 1
    print(f"\ndemo passed: {len(CASES)} requests, every archive downloaded and verified", file=out)
    return 0


def _report_case(
    case: DemoCase, notification: dict[str, Any] | None, copies: dict[str, int], out: Any
) -> bool:
    """Print one request's notification and checks; True when something did not check out."""
    print(f"\n== {case.title}", file=out)
    if notification is None:
        print("  FAIL: no notification arrived", file=out)
        return True
    print(json.dumps(notification, indent=2, ensure_ascii=False), file=out)
    problems = _check_case(case, notification)
    if case.copied is not None:
        copied = copies.get(case.copied, 0)
        print(f"  copied inside S3 (UploadPartCopy): {copied} bytes of {case.copied}", file=out)
        if copied != len(SAMPLES[(SOURCE_BUCKET, case.copied)]) - LEAD_BYTES:
            problems.append(f"expected all but the first {LEAD_BYTES} bytes copied server-side")
    for problem in problems:
        print(f"  FAIL: {problem}", file=out)
    if not problems:
        print(f"  check: OK ({_describe(case, notification)})", file=out)
    return bool(problems)


def _count_copies(s3: S3Client) -> dict[str, int]:
    """Bytes copied server-side per source key, seen in the worker's own UploadPartCopy calls."""
    copied: dict[str, int] = {}

    def record(params: dict[str, Any], **_: Any) -> None:
        first, last = params["CopySourceRange"].removeprefix("bytes=").split("-")
        key = params["CopySource"]["Key"]
        copied[key] = copied.get(key, 0) + int(last) - int(first) + 1

    s3.meta.events.register("provide-client-params.s3.UploadPartCopy", record)
    return copied


def _describe(case: DemoCase, notification: dict[str, Any]) -> str:
    if case.expected_error:
        return f"failed with {notification['error']['code']} as expected"
    return f"downloaded the link, {len(case.expected)} entries, bytes and CRCs match"


def _check_case(case: DemoCase, notification: dict[str, Any]) -> list[str]:
    if case.expected_error:
        if notification["status"] != "failed" or notification["error"]["code"] != case.expected_error:
            return [f"expected a {case.expected_error} failure"]
        return []
    if notification["status"] != "completed":
        return [f"status {notification['status']}: {notification.get('error')}"]
    url = notification["archive"]["url"]
    if not url.startswith("http://127.0.0.1:"):
        return [f"unexpected link {url}"]
    with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - our own local endpoint
        data = response.read()
    problems = verify_archive(data, {path: SAMPLES[where] for path, where in case.expected.items()})
    if notification["archive"]["size"] != len(data):
        problems.append("notified size differs from the object")
    if notification["archive"]["entries"] != len(case.expected):
        problems.append("notified entry count is wrong")
    if not problems:
        print(f"  sha256 of the archive: {hashlib.sha256(data).hexdigest()}", file=sys.stdout)
    return problems
