"""The `archiver` command line (contract §6): schema, check, submit."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from archiver.cli import HEALTH_MAX_AGE, main
from tests.conftest import Stack


@pytest.fixture
def required_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name, value in {
        "SQS_SOURCE_QUEUE": "q",
        "SQS_DESTINATION_QUEUE": "n",
        "S3_SOURCE_BUCKET": "src",
        "S3_DESTINATION_BUCKET": "dst",
        "HEALTH_FILE": str(tmp_path / "beat"),
    }.items():
        monkeypatch.setenv(name, value)
    return tmp_path / "beat"


def test_schema_prints_request_and_notification(capsys: pytest.CaptureFixture[str]) -> None:
    """`archiver schema` prints both JSON Schemas, the notification as completed-or-failed."""
    assert main(["schema"]) == 0
    schemas = json.loads(capsys.readouterr().out)
    assert schemas["request"]["required"] == ["files"]
    statuses = {s["properties"]["status"]["const"] for s in schemas["notification"]["oneOf"]}
    assert statuses == {"completed", "failed"}


def test_check_is_healthy_only_with_a_fresh_heartbeat(required_env: Path) -> None:
    """`archiver check` exits 1 without a heartbeat or with a stale one, 0 with a fresh one."""
    assert main(["check"]) == 1
    required_env.touch()
    assert main(["check"]) == 0
    stale = time.time() - HEALTH_MAX_AGE - 5
    os.utime(required_env, (stale, stale))
    assert main(["check"]) == 1


def test_submit_validates_before_sending(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`archiver submit` refuses an invalid request locally and sends a valid one to the source queue."""
    monkeypatch.setenv("SQS_SOURCE_QUEUE", stack.source_queue)
    monkeypatch.setenv("SQS_DESTINATION_QUEUE", stack.destination_url)
    monkeypatch.setenv("S3_SOURCE_BUCKET", stack.source_bucket)
    monkeypatch.setenv("S3_DESTINATION_BUCKET", stack.destination_bucket)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"file": []}))
    assert main(["submit", str(bad)]) == 1
    assert "invalid request" in capsys.readouterr().err
    assert stack.queue_depth() == 0

    good = tmp_path / "good.json"
    good.write_text(json.dumps({"files": [{"source": "a.png"}], "request_id": "sub-1"}))
    assert main(["submit", str(good)]) == 0
    assert json.loads(capsys.readouterr().out)["request_id"] == "sub-1"
    assert stack.queue_depth() == 1


def test_check_with_bad_settings_is_unhealthy_not_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """`archiver check` reports bad settings as unhealthy (1): Docker reserves health status 2."""
    monkeypatch.delenv("SQS_SOURCE_QUEUE", raising=False)
    assert main(["check"]) == 1
