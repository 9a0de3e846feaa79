"""Fixtures: a moto server over real HTTP on 127.0.0.1 for the session; fresh buckets and queues per test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import hypothesis
import pytest
import structlog

from archiver.aws import AwsClients, make_clients
from archiver.demo import embedded_stack
from archiver.settings import Settings, load_settings
from tests.faultproxy import FaultProxy, Faults, Seen

# `make mutation` (scripts/mutation.py) sets ARCHIVER_HYPOTHESIS=mutation: every property test then draws
# the same examples on every run and keeps no database, so a failure found while one mutant is tested is
# never replayed as the kill of another; and it stops at the first failing example, unshrunk.
hypothesis.settings.register_profile(
    "mutation",
    derandomize=True,
    database=None,
    deadline=None,
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
)
if os.environ.get("ARCHIVER_HYPOTHESIS") == "mutation":
    hypothesis.settings.load_profile("mutation")


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's server in a thread of the test process, reached by boto3 over HTTP like any S3/SQS (the
    demo's own embedded stack, with a secret the log tests can look for)."""
    with embedded_stack(access_key="testing", secret_key="testing-secret-key") as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def aws(moto_endpoint: str) -> AwsClients:
    return make_clients()


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """Tests that configure logging must not leak their configuration into the next test."""
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


@dataclass(frozen=True)
class Stack:
    """One test's own buckets and queues, so tests never see each other's objects or messages."""

    clients: AwsClients
    source_bucket: str
    other_bucket: str
    destination_bucket: str
    source_queue: str
    source_url: str
    destination_url: str
    dlq_url: str
    health_file: str

    def worker_env(self, **settings: str) -> dict[str, str]:
        """The environment of an `archiver worker` process on this stack, with extra `settings`."""
        return {
            **os.environ,
            "SQS_SOURCE_QUEUE": self.source_queue,
            "SQS_DESTINATION_QUEUE": self.destination_url,
            "S3_SOURCE_BUCKET": self.source_bucket,
            "S3_DESTINATION_BUCKET": self.destination_bucket,
            "HEALTH_FILE": self.health_file,
            **settings,
        }

    def run_burst_process(self, **settings: str) -> subprocess.CompletedProcess[str]:
        """`archiver worker --burst` as a real process until the queue is empty; output captured."""
        return subprocess.run(
            [sys.executable, "-m", "archiver", "worker", "--burst"],
            env=self.worker_env(**settings),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "sqs_source_queue": self.source_queue,
            "sqs_destination_queue": self.destination_url,
            "s3_source_bucket": self.source_bucket,
            "s3_destination_bucket": self.destination_bucket,
            "allowed_source_buckets": f"{self.source_bucket},{self.other_bucket}",
            "health_file": self.health_file,
            "part_size": 5 * 1024 * 1024,
            "visibility_timeout": 30,
        }
        values.update(overrides)
        return load_settings(**values)

    def put(self, key: str, body: bytes, *, bucket: str | None = None, **extra: Any) -> None:
        self.clients.s3.put_object(Bucket=bucket or self.source_bucket, Key=key, Body=body, **extra)

    def send(self, request: dict[str, Any] | str) -> str:
        body = request if isinstance(request, str) else json.dumps(request)
        return self.clients.sqs.send_message(QueueUrl=self.source_url, MessageBody=body)["MessageId"]

    def notifications(self, expected: int, *, max_polls: int = 20) -> list[dict[str, Any]]:
        """Receive (and delete) notifications until `expected` have arrived or the queue stays empty."""
        sqs = self.clients.sqs
        found: list[dict[str, Any]] = []
        for _ in range(max_polls):
            if len(found) >= expected:
                break
            response = sqs.receive_message(
                QueueUrl=self.destination_url, MaxNumberOfMessages=10, WaitTimeSeconds=1
            )
            for message in response.get("Messages", []):
                found.append(json.loads(message["Body"]))
                sqs.delete_message(QueueUrl=self.destination_url, ReceiptHandle=message["ReceiptHandle"])
        return found

    def queue_depth(self, url: str | None = None) -> int:
        attributes = self.clients.sqs.get_queue_attributes(
            QueueUrl=url or self.source_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(attributes["ApproximateNumberOfMessages"]) + int(
            attributes["ApproximateNumberOfMessagesNotVisible"]
        )

    def archive_keys(self) -> list[str]:
        """Keys of the archives in the destination bucket (the documents beside them left out)."""
        listing = self.clients.s3.list_objects_v2(Bucket=self.destination_bucket)
        documents = ("/status.json", "/decision.json", "/manifest.json")
        return [item["Key"] for item in listing.get("Contents", []) if not item["Key"].endswith(documents)]

    def status(self, request_id: str, prefix: str = "download") -> dict[str, Any]:
        key = f"{prefix}/{request_id}/status.json"
        return json.loads(self.download(key))

    def incomplete_uploads(self) -> list[str]:
        listing = self.clients.s3.list_multipart_uploads(Bucket=self.destination_bucket)
        return [upload["Key"] for upload in listing.get("Uploads", [])]

    def download(self, key: str) -> bytes:
        return self.clients.s3.get_object(Bucket=self.destination_bucket, Key=key)["Body"].read()


@pytest.fixture
def stack(aws: AwsClients, tmp_path: Any) -> Stack:
    suffix = uuid.uuid4().hex[:10]
    buckets = [f"src-{suffix}", f"other-{suffix}", f"zips-{suffix}"]
    for bucket in buckets:
        aws.s3.create_bucket(Bucket=bucket)
    sqs = aws.sqs
    dlq_url = sqs.create_queue(QueueName=f"requests-dlq-{suffix}")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    source_queue = f"requests-{suffix}"
    source_url = sqs.create_queue(
        QueueName=source_queue,
        Attributes={
            "VisibilityTimeout": "30",
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 3}),
        },
    )["QueueUrl"]
    destination_url = sqs.create_queue(QueueName=f"notifications-{suffix}")["QueueUrl"]
    return Stack(
        clients=aws,
        source_bucket=buckets[0],
        other_bucket=buckets[1],
        destination_bucket=buckets[2],
        source_queue=source_queue,
        source_url=source_url,
        destination_url=destination_url,
        dlq_url=dlq_url,
        health_file=str(tmp_path / "heartbeat"),
    )


@pytest.fixture
def fault_proxy(aws: AwsClients, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """A proxy in front of moto; clients made during the test (`worker.connect`) go through it.

    It asks for `aws` first so that the session's direct clients are never made through a proxy.
    """
    with FaultProxy(moto_endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield proxy


@pytest.fixture
def slow_sources(moto_endpoint: str, stack: Stack) -> Iterator[FaultProxy]:
    """A proxy that caps the source bucket's GET bodies at 1 MiB/s; everything else passes freely.
    Clients go through it only where a test makes them so (tests/test_lifecycle.py, worker_through)."""

    def source_get(seen: Seen) -> bool:
        return seen.method == "GET" and seen.path.startswith(f"/{stack.source_bucket}/")

    with FaultProxy(moto_endpoint, Faults(match=source_get, throttle=1024 * 1024)) as proxy:
        yield proxy


def wait_for(
    condition: Callable[[], Any], *, timeout: float, what: str = "the condition", interval: float = 0.1
) -> Any:
    """Poll `condition` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(interval)
    return result


# How far generated cases got, per fuzz test: printed at the end of every run (`make test` included), so a
# generator that stops reaching the code under test shows in the output, not only in a failure. A line
# travels on its test's report, the one thing pytest-xdist hands from a worker process to the one that
# prints the summary.
STAGE_REPORTS: list[str] = []  # made by the tests of this process, not yet on a report
STAGE_PROPERTY = "fuzz_stages"
SUMMARY: list[str] = []  # every line reported, in the process that prints the summary


def report_stages(name: str, stages: dict[str, int]) -> None:
    STAGE_REPORTS.append(f"{name}: " + ", ".join(f"{count} {stage}" for stage, count in stages.items()))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    report = yield
    if call.when == "call":
        report.user_properties.extend((STAGE_PROPERTY, line) for line in STAGE_REPORTS)
        STAGE_REPORTS.clear()
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    SUMMARY.extend(value for name, value in report.user_properties if name == STAGE_PROPERTY)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if SUMMARY:
        terminalreporter.section("fuzzing: cases that reached each stage")
        for line in SUMMARY:
            terminalreporter.write_line(line)
