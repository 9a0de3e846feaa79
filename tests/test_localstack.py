"""The LocalStack dev loop against a real LocalStack, as a developer runs it (docs/localstack.md).

moto is not LocalStack, and LocalStack is what the teams around this worker develop against. So one
LocalStack for this module (localstack-core from .localstack-venv, which `make localstack` installs on
pyenv's Python 3.13) runs on a free port of 127.0.0.1, where the compose file publishes 4566, and a
developer's shell is played with .envrc.dist's values, that port aside: the init script, the AWS CLI
(plain `aws --endpoint-url`), `archiver worker`, the notification, the link opened by a plain HTTP client,
every archive checked by every reader.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import boto3
import pytest
from awscrt import checksums as crt  # type: ignore[import-untyped]

from archiver.assembly import LEAD_BYTES
from archiver.settings import MiB
from tests.conftest import wait_for
from tests.faultproxy import FaultProxy, Faults, Seen
from tests.test_dev_loop import (
    ENVRC,
    VENV_BIN,
    base_env,
    compose_environment,
    compose_services,
    parse_envrc,
    run_init_script,
)
from tests.zipcheck import check_archive

REPO = Path(__file__).resolve().parent.parent
LOCALSTACK_PYTHON = REPO / ".localstack-venv" / "bin" / "python"
COMPOSE_PORT = 4566  # where docker-compose.yml publishes LocalStack, and .envrc.dist points
ACCOUNT = "000000000000"  # LocalStack's account for the access key "test"
START_TIMEOUT = 60  # measured ~1-3 s; the first start after an install compiles bytecode
# LocalStack ignores SIGTERM for up to ~45 s (measured); nothing of its state is worth waiting for.
STOP_GRACE = 3

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@dataclass(frozen=True)
class LocalStack:
    port: int

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        """True once S3 and SQS are up, by LocalStack's own health endpoint."""
        try:
            with urllib.request.urlopen(f"{self.endpoint}/_localstack/health", timeout=2) as response:
                services = json.load(response)["services"]
        except (OSError, ValueError, KeyError):
            return False
        return all(services.get(name) in ("available", "running") for name in ("s3", "sqs"))

    def sqs(self) -> Any:
        """A plain boto3 client, for polling queue depths without a CLI process each time."""
        return boto3.client(
            "sqs",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def stop(process: subprocess.Popen[bytes], grace: float = STOP_GRACE) -> None:
    """SIGTERM by PID, then SIGKILL after `grace` seconds."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def localstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    if not LOCALSTACK_PYTHON.exists():
        pytest.fail(f"no LocalStack at {LOCALSTACK_PYTHON}: `make localstack` installs it")
    root = tmp_path_factory.mktemp("localstack")
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(root),
        "LANG": "C.UTF-8",
        "GATEWAY_LISTEN": f"127.0.0.1:{port}",
        "GATEWAY_SERVER": "hypercorn",
        "SERVICES": "s3,sqs",
        "SQS_ENDPOINT_STRATEGY": "path",
        # Its state in this test's temporary directory, not a /tmp/localstack shared by every run here.
        "LOCALSTACK_VOLUME_DIR": str(root / "volume"),
        "FILESYSTEM_ROOT": str(root / "filesystem"),
        # LocalStack takes any container it runs in for its own image, and then ignores FILESYSTEM_ROOT.
        "OVERRIDE_IN_DOCKER": "0",
        # No network here: no analytics, no certificate download, no DNS server of its own.
        "DISABLE_EVENTS": "1",
        "SKIP_SSL_CERT_DOWNLOAD": "1",
        "DNS_ADDRESS": "0",
    }
    log_path = root / "localstack.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(LOCALSTACK_PYTHON), "-m", "localstack.runtime.main"],
            env=env,
            cwd=root,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = LocalStack(port=port)
    try:
        wait_for(
            lambda: process.poll() is not None or server.ready(),
            timeout=START_TIMEOUT,
            what="LocalStack's health endpoint",
            interval=0.2,
        )
        assert process.poll() is None, "LocalStack exited:\n" + log_path.read_text(errors="replace")[-3000:]
        yield server
    finally:
        stop(process)


def developer_env(localstack: LocalStack, tmp_path: Path, **extra: str) -> dict[str, str]:
    """A shell with .envrc.dist loaded (no other AWS or archiver variable), LocalStack on its port."""
    exports, _ = parse_envrc(ENVRC.read_text(encoding="utf-8"))
    here = f"localhost:{localstack.port}"
    env = {key: value for key, value in base_env().items() if not key.startswith("AWS_")}
    env.update({key: value.replace(f"localhost:{COMPOSE_PORT}", here) for key, value in exports.items()})
    env["HEALTH_FILE"] = str(tmp_path / "heartbeat")
    env["PATH"] = os.pathsep.join([str(VENV_BIN), "/usr/bin", "/bin"])
    env.update(extra)
    return env


def aws(env: dict[str, str], *args: str) -> str:
    """The AWS CLI as the docs write it, `aws --endpoint-url …` (v1 ignores AWS_ENDPOINT_URL for SQS)."""
    result = subprocess.run(
        [str(VENV_BIN / "aws"), "--endpoint-url", env["AWS_ENDPOINT_URL"], *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"aws {' '.join(args)}\n{result.stderr}"
    return result.stdout


def upload(env: dict[str, str], directory: Path, target: str, body: bytes, *options: str) -> None:
    path = directory / target.rsplit("/", 1)[-1]
    path.write_bytes(body)
    aws(env, "s3", "cp", "--only-show-errors", *options, str(path), target)


def queue_url(env: dict[str, str], name: str) -> str:
    """The URL the original seed commands use: the endpoint, the account, the name."""
    return f"{env['AWS_ENDPOINT_URL']}/{ACCOUNT}/{name}"


def send(env: dict[str, str], request: dict[str, Any]) -> None:
    aws(
        env,
        "sqs",
        "send-message",
        "--queue-url",
        queue_url(env, "input-queue"),
        "--message-body",
        json.dumps(request),
    )


def receive_notifications(env: dict[str, str]) -> list[dict[str, Any]]:
    """Read and delete what is on the destination queue, as a consumer does."""
    found: list[dict[str, Any]] = []
    url = queue_url(env, "output-queue")
    while True:
        output = aws(
            env,
            "sqs",
            "receive-message",
            "--queue-url",
            url,
            "--max-number-of-messages",
            "10",
            "--wait-time-seconds",
            "1",
            "--output",
            "json",
        )
        messages = json.loads(output or "{}").get("Messages", [])
        if not messages:
            return found
        for message in messages:
            found.append(json.loads(message["Body"]))
            aws(
                env, "sqs", "delete-message", "--queue-url", url, "--receipt-handle", message["ReceiptHandle"]
            )


def run_burst(env: dict[str, str], *, failing: bool = False) -> subprocess.CompletedProcess[str]:
    """`archiver worker --burst` until the queue is empty; a traceback only where a request `failing`."""
    worker = subprocess.run(
        [str(VENV_BIN / "archiver"), "worker", "--burst"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert worker.returncode == 0, worker.stderr[-5000:]
    assert failing or "Traceback" not in worker.stderr, worker.stderr[-5000:]
    return worker


def download(url: str) -> bytes:
    """The link as a browser or curl would open it: a plain GET, no AWS library."""
    with urllib.request.urlopen(url, timeout=60) as response:
        return bytes(response.read())


def metrics_lines(stdout: str) -> list[dict[str, Any]]:
    """The worker's EMF lines (one per request)."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{") and '"_aws"' in line]


def queue_depth(localstack: LocalStack, name: str) -> int:
    sqs = localstack.sqs()
    url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
    attributes = sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]) + int(
        attributes["ApproximateNumberOfMessagesNotVisible"]
    )


@pytest.fixture(scope="module")
def resources(localstack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> LocalStack:
    """The init script, run by hand with .envrc.dist's values, as docs/localstack.md says."""
    env = developer_env(localstack, tmp_path_factory.mktemp("init"))
    result = run_init_script(env, [VENV_BIN])
    assert result.returncode == 0, result.stderr
    assert "buckets source-images partner-images zip-storage" in result.stdout
    assert "queues input-queue (DLQ input-queue-dlq), output-queue" in result.stdout
    return localstack


# ------------------------------------------------------------------------------------------- tests


def test_the_seed_loop_builds_an_archive_whose_link_opens(resources: LocalStack, tmp_path: Path) -> None:
    """Seeded with the AWS CLI, archived by `archiver worker --burst`, notified on output-queue, the link
    downloaded with urllib; the big video is copied inside LocalStack (UploadPartCopy)."""
    env = developer_env(resources, tmp_path, SERVER_SIDE_COPY_MIN_BYTES=str(16 * MiB))
    video = os.urandom(16 * MiB + 4321)  # past the 16 MiB threshold; `aws s3 cp` uploads it in parts
    sources = {
        "s3://source-images/example-directory/uuid1.png": os.urandom(70_000),
        "s3://partner-images/example-directory/uuid2.png": os.urandom(50_000),
        "s3://source-images/example-directory/uuid3.png": os.urandom(30_000),
        "s3://source-images/example-directory/readme.txt": b"zip these S3 objects\n" * 500,
        "s3://source-images/example-directory/clip.mp4": video,
    }
    for target, body in sources.items():
        upload(env, tmp_path, target, body)
    send(
        env,
        {
            "files": [
                {"source": "example-directory/uuid1.png", "destination": "album_1"},
                {"source": "s3://partner-images/example-directory/uuid2.png", "destination": "album_1"},
                {"source": "example-directory/uuid3.png", "destination": "album_2", "name": "cover.png"},
                {"source": "example-directory/readme.txt"},
                {"source": "example-directory/clip.mp4", "destination": "videos"},
            ],
            "metadata": {"user_email": "someone@example.com"},
            "request_id": "seed-loop",
        },
    )

    worker = run_burst(env)

    (note,) = receive_notifications(env)
    assert note["status"] == "completed", note
    assert note["request_id"] == "seed-loop"
    assert note["metadata"] == {"user_email": "someone@example.com"}
    archive = note["archive"]
    assert (archive["bucket"], archive["key"]) == ("zip-storage", "download/seed-loop/seed-loop.zip")
    assert archive["url"].startswith(f"http://localhost:{resources.port}/zip-storage/download/seed-loop/")
    data = download(archive["url"])
    assert len(data) == archive["size"]
    check_archive(
        data,
        {
            "album_1/uuid1.png": sources["s3://source-images/example-directory/uuid1.png"],
            "album_1/uuid2.png": sources["s3://partner-images/example-directory/uuid2.png"],
            "album_2/cover.png": sources["s3://source-images/example-directory/uuid3.png"],
            "readme.txt": sources["s3://source-images/example-directory/readme.txt"],
            "videos/clip.mp4": video,
        },
        tmp_path,
    )
    (line,) = metrics_lines(worker.stdout)
    assert line["ArchiveBytes"] == len(data)
    assert line["CopiedBytes"] == len(video) - LEAD_BYTES, "the video was not copied inside LocalStack"


def test_a_link_made_with_composes_settings_opens_from_the_host(
    resources: LocalStack, tmp_path: Path
) -> None:
    """The compose worker reaches LocalStack by a name only its network resolves; its links are signed
    for ARCHIVE_LINK_ENDPOINT, the port compose publishes on the host, and open there."""
    services = compose_services()
    compose = compose_environment(services["archiver"])
    assert compose["AWS_ENDPOINT_URL"] == "http://localstack:4566"
    assert compose["ARCHIVE_LINK_ENDPOINT"] == f"http://localhost:{COMPOSE_PORT}"
    assert f"127.0.0.1:{COMPOSE_PORT}:4566" in services["localstack"]["ports"]

    host = developer_env(resources, tmp_path)
    upload(host, tmp_path, "s3://source-images/compose/notes.txt", b"opened on the host\n" * 100)
    send(host, {"request_id": "compose-link", "files": [{"source": "compose/notes.txt"}]})
    worker_env = {key: value for key, value in base_env().items() if not key.startswith("AWS_")}
    worker_env.update(compose)
    worker_env.update(
        # The worker's own way to LocalStack, not the one the link names: "localstack" does not
        # resolve outside compose, 127.0.0.1 stands in for it.
        AWS_ENDPOINT_URL=resources.endpoint,
        # compose's value, on this LocalStack's port.
        ARCHIVE_LINK_ENDPOINT=compose["ARCHIVE_LINK_ENDPOINT"].replace(
            f":{COMPOSE_PORT}", f":{resources.port}"
        ),
        HEALTH_FILE=str(tmp_path / "heartbeat"),
    )
    run_burst(worker_env)

    (note,) = receive_notifications(host)
    assert note["status"] == "completed", note
    url = note["archive"]["url"]
    assert url.startswith(f"http://localhost:{resources.port}/zip-storage/download/compose-link/"), url
    check_archive(download(url), {"notes.txt": b"opened on the host\n" * 100}, tmp_path)


def test_a_request_that_keeps_failing_goes_to_the_dlq_and_a_redrive_completes_it(
    resources: LocalStack, tmp_path: Path
) -> None:
    """While S3 refuses the request's status document (LocalStack behind a proxy that answers those
    writes 501), every attempt fails, the last one with a `failed` notification, and the queue's redrive
    policy moves the request to the DLQ. Once S3 takes them again, `aws sqs start-message-move-task`
    brings it back and the worker completes it under the same request_id."""
    env = developer_env(resources, tmp_path)
    cold = b"refused at first\n" * 200
    upload(env, tmp_path, "s3://source-images/archived/cold.txt", cold)
    upload(env, tmp_path, "s3://source-images/archived/warm.txt", b"still here\n")
    send(
        env,
        {
            "request_id": "refused-at-first",
            "files": [{"source": "archived/cold.txt"}, {"source": "archived/warm.txt"}],
        },
    )

    def status_write(seen: Seen) -> bool:
        return seen.operation == "PutObject" and seen.path.endswith("/refused-at-first/status.json")

    # Burst runs until the redrive policy moves it: each takes the request if it is visible again, fails
    # it and releases it with a growing delay (2, 4, 8 s), then stops at the first empty 1 s poll.
    refusing = Faults(rate=1.0, kinds=("501",), service="s3", match=status_write)
    with FaultProxy(env["AWS_ENDPOINT_URL"], refusing) as proxy:
        failing_env = {**env, "AWS_ENDPOINT_URL": proxy.url}

        def dead_lettered() -> bool:
            run_burst(failing_env, failing=True)
            return queue_depth(resources, "input-queue-dlq") == 1

        wait_for(dead_lettered, timeout=120, what="the request in input-queue-dlq", interval=0.5)
    assert queue_depth(resources, "input-queue") == 0

    (failed,) = receive_notifications(env)
    assert failed["status"] == "failed", failed
    assert failed["request_id"] == "refused-at-first"
    assert failed["error"]["retryable"] is True
    assert "gave up after 3 attempts" in failed["error"]["message"]
    assert "NotImplemented" in failed["error"]["message"]

    # The cause fixed, the DLQ moved back to its source queue, as docs/operations.md (Dead-letter queue) says.
    dlq_arn = json.loads(
        aws(
            env,
            "sqs",
            "get-queue-attributes",
            "--queue-url",
            queue_url(env, "input-queue-dlq"),
            "--attribute-names",
            "QueueArn",
            "--output",
            "json",
        )
    )["Attributes"]["QueueArn"]
    aws(env, "sqs", "start-message-move-task", "--source-arn", dlq_arn)
    wait_for(
        lambda: queue_depth(resources, "input-queue") == 1 and queue_depth(resources, "input-queue-dlq") == 0,
        timeout=60,
        what="the message moved back to input-queue",
        interval=0.5,
    )

    run_burst(env)

    (note,) = receive_notifications(env)
    assert note["status"] == "completed", note
    assert note["request_id"] == "refused-at-first"
    check_archive(download(note["archive"]["url"]), {"cold.txt": cold, "warm.txt": b"still here\n"}, tmp_path)


def test_a_fanned_out_request_on_localstack_is_the_single_worker_archive(
    resources: LocalStack, tmp_path: Path
) -> None:
    """Fan-out against LocalStack's S3 and SQS (conditional writes of claims, task message attributes,
    UploadPartCopy of segment heads, DeleteObjects), a background worker beside a burst one: the archive
    is byte for byte the one a single worker writes with fan-out off, and no temporary object is left."""
    # Pairs of photos make 6 MiB segments whose heads LocalStack copies in; the last two, each a segment
    # of its own under 5 MiB, are joined by the coordinator into one part.
    photos = {f"fan/p{i}.jpg": os.urandom(3 * MiB - 16 * i if i < 6 else 3 * MiB + i) for i in range(8)}
    # And a video `aws s3 cp` uploads in parts (over 8 MiB: no full-object CRC-32), a segment of its own,
    # read as a big source (HEADed, streamed).
    photos["fan/v.mp4"] = os.urandom(9 * MiB + 7)
    for key, body in photos.items():
        upload(env := developer_env(resources, tmp_path), tmp_path, f"s3://source-images/{key}", body)
    files = [{"source": key} for key in photos]
    send(env, {"files": files, "request_id": "fan-single"})
    run_burst(env)
    (single,) = receive_notifications(env)
    assert single["status"] == "completed", single
    # Polls of 2 s, which a SIGTERM lets end: a worker killed in a long poll leaves it open in LocalStack,
    # which hands the next test's message to it (hidden for a visibility timeout).
    fanned_env = developer_env(
        resources, tmp_path, FANOUT_SEGMENT_BYTES=str(6 * MiB), PART_SIZE=str(5 * MiB), SHUTDOWN_GRACE="2"
    )
    workers = []
    for index in range(2):
        with (tmp_path / f"worker-{index}.log").open("wb") as log:
            workers.append(
                subprocess.Popen(
                    [str(VENV_BIN / "archiver"), "worker"],
                    env=fanned_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        send(fanned_env, {"files": files, "request_id": "fan-out"})
        found: list[dict[str, Any]] = []
        wait_for(
            lambda: found.extend(receive_notifications(fanned_env)) or found,
            timeout=120,
            what="the fanned-out notification",
            interval=0.5,
        )
    finally:
        for worker in workers:
            stop(worker, grace=30)
    (note,) = found
    assert note["status"] == "completed", note
    data = download(note["archive"]["url"])
    check_archive(data, {key.rsplit("/", 1)[1]: body for key, body in photos.items()}, tmp_path)
    assert data == download(single["archive"]["url"])
    logs = "".join((tmp_path / f"worker-{index}.log").read_text() for index in range(2))
    assert logs.count("fanout.planned") == 1 and logs.count("fanout.completed") == 1  # DEV_MODE: console
    assert logs.count("segment.built") == 6  # each segment built once
    listing = aws(env, "s3api", "list-objects-v2", "--bucket", "zip-storage", "--prefix", "download/fan-out/")
    keys = [item["Key"] for item in json.loads(listing or "{}").get("Contents", [])]
    assert sorted(keys) == [
        "download/fan-out/decision.json",
        "download/fan-out/fan-out.zip",
        "download/fan-out/manifest.json",
        "download/fan-out/status.json",
    ]


def test_a_cancel_on_localstack_answers_its_request_cancelled_and_leaves_a_completed_one(
    resources: LocalStack, tmp_path: Path
) -> None:
    """`archiver cancel` before the request is sent: the request, sent next, is answered `cancelled`,
    unread and with no archive, through LocalStack's conditional writes; a cancel of a request that
    completed changes nothing, and that archive's CRC-32 is the one its notification gave."""
    env = developer_env(resources, tmp_path)
    photo = b"a photo\n" * 100
    upload(env, tmp_path, "s3://source-images/cancel/photo.jpg", photo)

    def cancel(request_id: str) -> None:
        sent = subprocess.run(
            [str(VENV_BIN / "archiver"), "cancel", request_id],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert sent.returncode == 0, sent.stderr
        run_burst(env)

    def decided(request_id: str) -> str:
        document = aws(env, "s3", "cp", f"s3://zip-storage/download/{request_id}/decision.json", "-")
        return str(json.loads(document)["decision"])

    cancel("ls-cancelled")
    assert decided("ls-cancelled") == "cancelled"
    send(env, {"request_id": "ls-cancelled", "files": [{"source": "cancel/photo.jpg"}], "metadata": {"a": 1}})
    send(env, {"request_id": "ls-kept", "files": [{"source": "cancel/photo.jpg"}]})
    run_burst(env)
    notes = {note["request_id"]: note for note in receive_notifications(env)}
    assert sorted(notes) == ["ls-cancelled", "ls-kept"]
    assert notes["ls-cancelled"]["status"] == "cancelled" and notes["ls-cancelled"]["metadata"] == {"a": 1}
    kept = notes["ls-kept"]
    assert kept["status"] == "completed", kept
    listing = aws(env, "s3api", "list-objects-v2", "--bucket", "zip-storage", "--prefix", "download/ls-")
    keys = sorted(item["Key"] for item in json.loads(listing or "{}").get("Contents", []))
    assert keys == [
        "download/ls-cancelled/decision.json",
        "download/ls-cancelled/status.json",
        "download/ls-kept/decision.json",
        "download/ls-kept/ls-kept.zip",
        "download/ls-kept/manifest.json",
        "download/ls-kept/status.json",
    ]

    cancel("ls-kept")
    assert receive_notifications(env) == []
    assert decided("ls-kept") == "completed"
    data = download(kept["archive"]["url"])
    check_archive(data, {"photo.jpg": photo}, tmp_path)
    # The notification's CRC-32 is the downloaded bytes' (contract §4, notification).
    assert kept["archive"]["crc32"] == base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    # Handed to S3 as the upload's FULL_OBJECT CRC-32 at completion, which LocalStack checks as S3 does.
    head = archive_head(env, "download/ls-kept/ls-kept.zip")
    assert (head["ChecksumType"], head["ChecksumCRC32"]) == ("FULL_OBJECT", kept["archive"]["crc32"])
    assert kept["archive"]["checksum"] == {
        "algorithm": "CRC32",
        "type": "FULL_OBJECT",
        "value": kept["archive"]["crc32"],
        "s3_verified": True,
    }
    assert queue_depth(resources, "input-queue") == 0


def archive_head(env: dict[str, str], key: str) -> dict[str, Any]:
    """HeadObject of an archive with its checksums, as the AWS CLI gives it."""
    checksums = ("--checksum-mode", "ENABLED")
    found = aws(env, "s3api", "head-object", "--bucket", "zip-storage", "--key", key, *checksums)
    return cast(dict[str, Any], json.loads(found))


def test_a_crc64nvme_archive_on_localstack_is_verified_by_it_at_completion(
    resources: LocalStack, tmp_path: Path
) -> None:
    """ARCHIVE_CHECKSUM=CRC64NVME against LocalStack: parts of 5 MiB, a photo, a video `aws s3 cp`
    uploaded in parts and one it uploaded whole with a CRC-32 (the one a CRC64NVME archive may copy): the
    CRC64NVME handed over at completion, joined from the parts', is the downloaded bytes' and the one
    HeadObject gives."""
    env = developer_env(
        resources,
        tmp_path,
        ARCHIVE_CHECKSUM="CRC64NVME",
        PART_SIZE=str(5 * MiB),
        SERVER_SIDE_COPY_MIN_BYTES=str(16 * MiB),
    )
    files = {"photo.jpg": os.urandom(300_000), "parts.mp4": os.urandom(9 * MiB + 1)}
    files["whole.mp4"] = os.urandom(17 * MiB + 3)
    upload(env, tmp_path, "s3://source-images/c64/photo.jpg", files["photo.jpg"])
    upload(env, tmp_path, "s3://source-images/c64/parts.mp4", files["parts.mp4"])
    (tmp_path / "whole.mp4").write_bytes(files["whole.mp4"])
    put = ("--bucket", "source-images", "--key", "c64/whole.mp4", "--body", str(tmp_path / "whole.mp4"))
    aws(env, "s3api", "put-object", *put, "--checksum-algorithm", "CRC32")
    send(env, {"request_id": "ls-crc64", "files": [{"source": f"c64/{name}"} for name in files]})
    run_burst(env)
    (note,) = receive_notifications(env)
    assert note["status"] == "completed", note
    data = download(note["archive"]["url"])
    check_archive(data, files, tmp_path)
    expected = base64.b64encode(crt.crc64nvme(data).to_bytes(8, "big")).decode()
    assert note["archive"]["checksum"] == {
        "algorithm": "CRC64NVME",
        "type": "FULL_OBJECT",
        "value": expected,
        "s3_verified": True,
    }
    head = archive_head(env, "download/ls-crc64/ls-crc64.zip")
    assert (head["ChecksumType"], head["ChecksumCRC64NVME"]) == ("FULL_OBJECT", expected)
