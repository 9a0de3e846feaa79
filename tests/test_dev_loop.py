"""The LocalStack dev loop without Docker: init script, docker-compose.yml, .envrc.dist and Dockerfile.

Docker does not run in CI, so each piece is checked the way it would be used: the init script runs for real
against moto, the compose file's and .envrc.dist's settings go through `load_settings`, and the Dockerfile's
own COPY and pip install run into a fresh venv whose console script then does a request like the image would.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from archiver import demo
from archiver.aws import AwsClients
from archiver.settings import Settings, load_settings
from tests.conftest import Stack

REPO = Path(__file__).resolve().parent.parent
INIT_SCRIPT = REPO / "localstack-init" / "ready.d" / "init-resources.sh"
COMPOSE_FILE = REPO / "docker-compose.yml"
ENVRC = REPO / ".envrc.dist"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
# The venv running the tests: its `aws` is the AWS CLI the init script uses outside LocalStack.
VENV_BIN = Path(sys.executable).parent
SETTING_NAMES = frozenset(name.upper() for name in Settings.model_fields)
# Queue attributes that differ between any two queues whatever their configuration.
VOLATILE_ATTRIBUTES = frozenset({"QueueArn", "CreatedTimestamp", "LastModifiedTimestamp", "RedrivePolicy"})


# ------------------------------------------------------------------------------------------- helpers


def base_env() -> dict[str, str]:
    """This process's environment without any archiver setting (a developer's .envrc must not leak in)."""
    return {key: value for key, value in os.environ.items() if key.upper() not in SETTING_NAMES}


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A monkeypatch whose environment starts with no archiver setting at all."""
    for key in list(os.environ):
        if key.upper() in SETTING_NAMES:
            monkeypatch.delenv(key)
    return monkeypatch


def run_init_script(env: dict[str, str], path: list[Path]) -> subprocess.CompletedProcess[str]:
    env = {**env, "PATH": os.pathsep.join([*map(str, path), "/usr/bin", "/bin"])}
    return subprocess.run(
        [str(INIT_SCRIPT)], env=env, capture_output=True, text=True, timeout=180, check=False
    )


def script_defaults() -> dict[str, str]:
    """The `${NAME:-default}` values of the init script: what it creates inside LocalStack."""
    return dict(re.findall(r'"\$\{(\w+):-([^}$]*)\}"', INIT_SCRIPT.read_text(encoding="utf-8")))


def queue_attributes(aws: AwsClients, name: str) -> dict[str, str]:
    url = aws.sqs.get_queue_url(QueueName=name)["QueueUrl"]
    return aws.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]


def comparable(attributes: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in attributes.items() if key not in VOLATILE_ATTRIBUTES}


def bucket_names(aws: AwsClients) -> set[str]:
    return {bucket["Name"] for bucket in aws.s3.list_buckets()["Buckets"]}


def compose_services() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))["services"])


def compose_environment(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {key: "" if value is None else str(value) for key, value in environment.items()}


def parse_envrc(text: str) -> tuple[dict[str, str], list[str]]:
    """The `export NAME=value` pairs of a shell file, and the export lines not preceded by a comment."""
    exports: dict[str, str] = {}
    uncommented: list[str] = []
    previous = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("export "):
            for word in shlex.split(stripped[len("export ") :], comments=True):
                name, _, value = word.partition("=")
                exports[name] = value
            if not previous.startswith("#"):
                uncommented.append(stripped)
        previous = stripped
    return exports, uncommented


# ------------------------------------------------------------------------------------------- Dockerfile


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, (KEYWORD, arguments) with continuations joined, grouped by FROM."""
    stages: list[list[tuple[str, str]]] = []
    pending: list[str] = []
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        keyword, _, arguments = " ".join([*pending, line]).partition(" ")
        pending = []
        if keyword.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword.upper(), arguments.strip()))
    return stages


def exec_form(arguments: str) -> list[str]:
    """A JSON-array (exec form) argument list; shell form is refused: the worker must be PID 1."""
    assert arguments.startswith("["), f"not in exec form: {arguments}"
    value = json.loads(arguments)
    assert isinstance(value, list)
    return [str(item) for item in value]


def last(stage: list[tuple[str, str]], keyword: str) -> str:
    found = [arguments for name, arguments in stage if name == keyword]
    assert found, f"the final stage of the Dockerfile has no {keyword}"
    return found[-1]


def dockerignore_excludes(relative: str, patterns: list[str]) -> bool:
    """Roughly Docker's .dockerignore rule: the last pattern matching the path or a parent of it wins."""
    parts = PurePosixPath(relative).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        options = [pattern, pattern.removeprefix("**/")] if pattern.startswith("**/") else [pattern]
        if any(fnmatch.fnmatchcase(path, option) for path in candidates for option in options):
            excluded = not negated
    return excluded


def emulate_copy(arguments: str, workdir: PurePosixPath, rootfs: Path, patterns: list[str]) -> None:
    """Run one `COPY src... dest` from the repository (as the build context) into a directory tree."""
    words = exec_form(arguments) if arguments.startswith("[") else shlex.split(arguments)
    *sources, destination = [word for word in words if not word.startswith("--")]
    target = rootfs / str(workdir / destination).lstrip("/")
    for source in sources:
        origin = REPO / source
        files = sorted(origin.rglob("*")) if origin.is_dir() else [origin]
        kept = [
            path
            for path in files
            if path.is_file() and not dockerignore_excludes(str(path.relative_to(REPO)), patterns)
        ]
        assert kept, f"COPY {source}: nothing in the build context (missing, or excluded by .dockerignore)"
        for path in kept:
            inside = path.relative_to(origin) if origin.is_dir() else Path(path.name)
            copy = target / inside if origin.is_dir() or destination.endswith("/") else target
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, copy)


def install_like_the_dockerfile(venv: Path, rootfs: Path) -> list[str]:
    """Replay the Dockerfile's COPY (from the context) and its `pip install` RUNs, with the venv's pip."""
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    env = {**base_env(), "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    commands: list[str] = []
    for stage in dockerfile_stages():
        workdir = PurePosixPath("/")
        for keyword, arguments in stage:
            if keyword == "WORKDIR":
                workdir = workdir / arguments
            elif keyword == "COPY" and "--from=" not in arguments:
                emulate_copy(arguments, workdir, rootfs, patterns)
            elif keyword == "RUN" and re.search(r"\bpip3? install\b", arguments):
                cwd = rootfs / str(workdir).lstrip("/")
                cwd.mkdir(parents=True, exist_ok=True)
                result = subprocess.run(
                    ["/bin/sh", "-c", arguments],
                    cwd=cwd,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=480,
                    check=False,
                )
                output = result.stdout[-3000:] + result.stderr[-3000:]
                assert result.returncode == 0, f"RUN {arguments}\n{output}"
                commands.append(arguments)
    return commands


def image_env(final_stage: list[tuple[str, str]]) -> dict[str, str]:
    """The ENV of the image's final stage, but PATH (the test's venv stands in for the image's)."""
    env: dict[str, str] = {}
    for keyword, arguments in final_stage:
        if keyword != "ENV":
            continue
        words = shlex.split(arguments)
        pairs = [word.partition("=") for word in words] if "=" in words[0] else [(words[0], "=", words[1])]
        env.update({name: value for name, _, value in pairs if name != "PATH"})
    return env


# ------------------------------------------------------------------------------------------- tests


def test_init_script_creates_the_demo_resources_and_is_idempotent(
    aws: AwsClients, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The init script makes demo.py's buckets and queues alike, via aws or awslocal, and reruns cleanly."""
    assert INIT_SCRIPT.read_text(encoding="utf-8").startswith("#!/usr/bin/env bash\n")
    assert os.access(INIT_SCRIPT, os.X_OK), "LocalStack runs only executable init scripts"
    suffix = uuid.uuid4().hex[:10]
    names = {
        "S3_SOURCE_BUCKET": f"source-images-{suffix}",
        "ALLOWED_SOURCE_BUCKETS": f"source-images-{suffix}, partner-images-{suffix}",
        "S3_DESTINATION_BUCKET": f"zip-storage-{suffix}",
        "SQS_SOURCE_QUEUE": f"input-queue-{suffix}",
        "SQS_DESTINATION_QUEUE": f"{moto_endpoint}/123456789012/output-queue-{suffix}",  # a URL works too
    }
    assert shutil.which("aws", path=str(VENV_BIN)), "the AWS CLI (dev extra awscli) is not in the venv"

    # Outside LocalStack: the plain AWS CLI against AWS_ENDPOINT_URL, even with an awslocal installed,
    # and with LocalStack's dummy keys when the shell has no credentials (docs/localstack.md's command).
    refused = tmp_path / "refused" / "awslocal"
    refused.parent.mkdir()
    refused.write_text("#!/bin/sh\necho 'awslocal used outside LocalStack' >&2\nexit 99\n", encoding="utf-8")
    refused.chmod(0o755)
    no_credentials = {
        key: value
        for key, value in base_env().items()
        if key not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    }
    no_credentials.update(
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        AWS_CONFIG_FILE="/dev/null",
        # Without the script's default keys the CLI would ask the instance metadata address instead.
        AWS_EC2_METADATA_DISABLED="true",
    )
    first = run_init_script({**no_credentials, **names}, [refused.parent, VENV_BIN])
    assert first.returncode == 0, first.stderr
    assert "awslocal" not in first.stderr

    # The reference: what `archiver demo` creates, under other unique names.
    for constant in ("SOURCE_BUCKET", "PARTNER_BUCKET", "DESTINATION_BUCKET"):
        monkeypatch.setattr(demo, constant, f"{getattr(demo, constant)}-ref-{suffix}")
    for constant in ("SOURCE_QUEUE", "DEAD_LETTER_QUEUE", "DESTINATION_QUEUE"):
        monkeypatch.setattr(demo, constant, f"{getattr(demo, constant)}-ref-{suffix}")
    demo.create_resources(aws.s3, aws.sqs)

    buckets = {f"source-images-{suffix}", f"partner-images-{suffix}", f"zip-storage-{suffix}"}

    def check() -> None:
        assert buckets <= bucket_names(aws)
        for ours, reference in [
            (f"input-queue-{suffix}-dlq", demo.DEAD_LETTER_QUEUE),
            (f"input-queue-{suffix}", demo.SOURCE_QUEUE),
            (f"output-queue-{suffix}", demo.DESTINATION_QUEUE),
        ]:
            assert comparable(queue_attributes(aws, ours)) == comparable(queue_attributes(aws, reference))
        source = queue_attributes(aws, f"input-queue-{suffix}")
        dlq = queue_attributes(aws, f"input-queue-{suffix}-dlq")
        assert source["VisibilityTimeout"] == "120"
        assert dlq["MessageRetentionPeriod"] == "1209600"
        redrive = {"deadLetterTargetArn": dlq["QueueArn"], "maxReceiveCount": 3}
        assert json.loads(source["RedrivePolicy"]) == redrive
        reference = json.loads(queue_attributes(aws, demo.SOURCE_QUEUE)["RedrivePolicy"])
        assert reference["maxReceiveCount"] == demo.MAX_RECEIVE_COUNT == 3

    check()

    # Inside LocalStack: `awslocal` (here a stand-in that adds the endpoint) and no AWS_ENDPOINT_URL.
    shim = tmp_path / "bin" / "awslocal"
    shim.parent.mkdir()
    shim.write_text('#!/bin/sh\nexec aws --endpoint-url "$FAKE_LOCALSTACK" "$@"\n', encoding="utf-8")
    shim.chmod(0o755)
    env = {key: value for key, value in base_env().items() if key != "AWS_ENDPOINT_URL"}
    second = run_init_script({**env, **names, "FAKE_LOCALSTACK": moto_endpoint}, [shim.parent, VENV_BIN])
    assert second.returncode == 0, second.stderr
    assert "exists" in second.stdout
    check()


def test_init_script_refuses_to_run_without_an_endpoint() -> None:
    """Without awslocal or AWS_ENDPOINT_URL the init script exits 2 before calling AWS at all."""
    env = {key: value for key, value in base_env().items() if key != "AWS_ENDPOINT_URL"}
    result = run_init_script(env, [VENV_BIN])
    assert result.returncode == 2
    assert "refusing" in result.stderr


def test_compose_settings_load_and_name_the_init_script_resources(settings_env: pytest.MonkeyPatch) -> None:
    """docker-compose.yml gives the archiver valid settings naming exactly what the init script creates."""
    services = compose_services()
    environment = compose_environment(services["archiver"])
    for key, value in environment.items():
        settings_env.setenv(key, value)
    settings = load_settings()

    defaults = script_defaults()
    assert defaults["S3_SOURCE_BUCKET"] == demo.SOURCE_BUCKET
    assert defaults["S3_DESTINATION_BUCKET"] == demo.DESTINATION_BUCKET
    assert defaults["SQS_SOURCE_QUEUE"] == demo.SOURCE_QUEUE
    assert defaults["SQS_DESTINATION_QUEUE"] == demo.DESTINATION_QUEUE
    assert defaults["ALLOWED_SOURCE_BUCKETS"].split(",") == [demo.SOURCE_BUCKET, demo.PARTNER_BUCKET]
    assert f"{demo.SOURCE_QUEUE}-dlq" == demo.DEAD_LETTER_QUEUE  # the script's derived DLQ name

    assert settings.s3_source_bucket == defaults["S3_SOURCE_BUCKET"]
    assert settings.s3_destination_bucket == defaults["S3_DESTINATION_BUCKET"]
    assert settings.sqs_source_queue == defaults["SQS_SOURCE_QUEUE"]
    assert settings.sqs_destination_queue == defaults["SQS_DESTINATION_QUEUE"]
    assert settings.source_buckets == {demo.SOURCE_BUCKET, demo.PARTNER_BUCKET}
    assert settings.dev_mode is True

    assert environment["AWS_ENDPOINT_URL"] == "http://localstack:4566"
    for key in ("AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert environment[key]
    assert services["archiver"]["stop_grace_period"] == f"{settings.shutdown_grace + 5}s"
    assert services["archiver"]["depends_on"] == {"localstack": {"condition": "service_healthy"}}
    localstack = services["localstack"]
    assert "./localstack-init/ready.d:/etc/localstack/init/ready.d:ro" in localstack["volumes"]
    assert re.fullmatch(r"localstack/localstack:\d+\.\d+\.\d+", localstack["image"])


def test_envrc_dist_exports_every_setting_and_they_load(settings_env: pytest.MonkeyPatch) -> None:
    """.envrc.dist exports every setting with a comment, for the compose stack, and the values load."""
    exports, uncommented = parse_envrc(ENVRC.read_text(encoding="utf-8"))
    assert SETTING_NAMES - exports.keys() == set()
    assert uncommented == []
    assert exports["AWS_ENDPOINT_URL"] == "http://localhost:4566"
    for key in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert exports[key]

    compose = compose_environment(compose_services()["archiver"])
    assert {key: exports[key] for key in compose if key != "AWS_ENDPOINT_URL"} == {
        key: value for key, value in compose.items() if key != "AWS_ENDPOINT_URL"
    }

    # The sizes, counts and times are the defaults, so a changed default cannot leave the dev loop on the
    # old one.
    numbers = {
        name.upper(): field.default
        for name, field in Settings.model_fields.items()
        if type(field.default) in (int, float)
    }
    assert numbers and {key: exports[key] for key in numbers} == {
        key: str(value) for key, value in numbers.items()
    }

    for key in SETTING_NAMES:
        settings_env.setenv(key, exports[key])
    settings = load_settings()
    assert settings.health_file == exports["HEALTH_FILE"]


def test_dockerfile_pins_its_base_and_installs_dependencies_before_the_code() -> None:
    """Every stage starts from the same base, named by digest; the dependencies are installed (pinned by
    constraints.txt) before the code or the README is copied, so editing those reuses that layer."""
    stages = dockerfile_stages()
    bases = {last(stage, "FROM").split(" AS ")[0] for stage in stages}
    assert len(bases) == 1
    assert re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", bases.pop())

    steps = [(keyword, arguments) for keyword, arguments in stages[0] if keyword in ("COPY", "RUN")]
    installs = [
        i for i, (keyword, arguments) in enumerate(steps) if re.search(r"\bpip3? install\b", arguments)
    ]
    first, final = installs[0], installs[-1]
    copied_first = " ".join(arguments for keyword, arguments in steps[:first] if keyword == "COPY")
    assert "archiver" not in copied_first and "README" not in copied_first, copied_first
    assert "-c constraints.txt" in steps[first][1]
    assert first < final and "--no-deps" in steps[final][1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dockerfile_install_runs_a_request_and_passes_its_healthcheck(stack: Stack, tmp_path: Path) -> None:
    """The Dockerfile's install gives a working `archiver worker`: a request archived, then healthy."""
    stages = dockerfile_stages()
    final = stages[-1]
    command = [*exec_form(last(final, "ENTRYPOINT")), *exec_form(last(final, "CMD"))]
    assert command == ["archiver", "worker"]
    healthcheck = exec_form(last(final, "HEALTHCHECK").split(" CMD ", 1)[1].strip())
    assert last(final, "STOPSIGNAL") == "SIGTERM"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installs = install_like_the_dockerfile(venv, tmp_path / "rootfs")
    assert installs, "the Dockerfile has no RUN pip install"
    assert any("-c constraints.txt" in line for line in installs)
    moto = subprocess.run([venv / "bin" / "python", "-c", "import moto"], capture_output=True, check=False)
    assert moto.returncode != 0, "the image must not carry the demo/dev extras"

    stack.put("hello.txt", b"hello from the dev loop\n")
    request_id = f"dev-loop-{uuid.uuid4().hex[:8]}"
    stack.send({"request_id": request_id, "files": [{"source": "hello.txt", "destination": "greetings"}]})
    env = {
        **base_env(),
        **image_env(final),
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "SQS_SOURCE_QUEUE": stack.source_queue,
        "SQS_DESTINATION_QUEUE": stack.destination_url,
        "S3_SOURCE_BUCKET": stack.source_bucket,
        "S3_DESTINATION_BUCKET": stack.destination_bucket,
        "ALLOWED_SOURCE_BUCKETS": f"{stack.source_bucket},{stack.other_bucket}",
        "HEALTH_FILE": stack.health_file,
        "VISIBILITY_TIMEOUT": "30",
        "DEV_MODE": "1",
    }
    env.pop("VIRTUAL_ENV", None)
    program = shutil.which(command[0], path=str(venv / "bin"))
    assert program, f"{command[0]} is not installed in the image's environment"

    worker = subprocess.run(
        [program, *command[1:], "--burst"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180
    )
    assert worker.returncode == 0, worker.stderr[-3000:]
    notifications = stack.notifications(1)
    assert [(n["status"], n["request_id"]) for n in notifications] == [("completed", request_id)]
    archive = zipfile.ZipFile(io.BytesIO(stack.download(notifications[0]["archive"]["key"])))
    assert archive.read("greetings/hello.txt") == b"hello from the dev loop\n"
    assert Path(stack.health_file).exists(), "the worker did not touch HEALTH_FILE"

    checker = shutil.which(healthcheck[0], path=str(venv / "bin"))
    assert checker, f"{healthcheck[0]} is not installed in the image's environment"
    health = subprocess.run(
        [checker, *healthcheck[1:]], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert health.returncode == 0, health.stderr
