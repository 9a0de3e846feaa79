"""`archiver schema` stays in step with the models and with the contract's own examples."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from archiver.models import json_schemas
from archiver.notices import ArchiveInfo, CompletedNotification, ManifestInfo, RenamedEntry, SkippedSource
from archiver.notify import fit

CONTRACT = Path(__file__).parent.parent / "docs" / "contract.md"


def contract_examples() -> list[dict[str, Any]]:
    """Every ```json block of docs/contract.md that is a complete JSON object."""
    examples = []
    for block in re.findall(r"```json\n(.*?)```", CONTRACT.read_text(encoding="utf-8"), flags=re.DOTALL):
        try:
            document = json.loads(block)
        except ValueError:
            continue  # an excerpt with an ellipsis, not a whole message
        if isinstance(document, dict):
            examples.append(document)
    return examples


def test_contract_examples_validate_against_the_schema() -> None:
    """Each request and notification example of the contract is valid under `archiver schema`."""
    schemas = json_schemas()
    examples = contract_examples()
    requests = [e for e in examples if "files" in e]
    notifications = [e for e in examples if e.get("status") in ("completed", "failed")]
    assert requests, "the contract shows a request"
    assert {n["status"] for n in notifications} == {"completed", "failed"}
    for example in requests:
        jsonschema.validate(example, schemas["request"])
    for example in notifications:
        jsonschema.validate(example, schemas["notification"])


@pytest.mark.parametrize(
    "bad",
    [
        {"file": [{"source": "a"}]},
        {"files": []},
        {"files": [{"source": "a", "dest": "x"}]},
        {"files": [{"source": "a"}], "on_missing": "ignore"},
    ],
)
def test_schema_rejects_what_the_worker_rejects(bad: dict[str, Any]) -> None:
    """Producers validating with the published schema refuse the same typos the worker refuses."""
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, json_schemas()["request"])


def test_oversized_notifications_are_cut_to_fit() -> None:
    """50,000 renames do not fit an SQS message: the lists are cut, `truncated` says so, the rest stays,
    the archive's link and CRC-32 and the manifest's link whole (presigned with a session token, a link is
    a few KiB). The 50,000 entries themselves are in manifest.json, never in the notification."""
    link = "https://zip-storage.s3.amazonaws.com/download/r/r.zip?X-Amz-Security-Token=" + "t" * 2000
    notification = CompletedNotification(
        request_id="r",
        archive=ArchiveInfo(bucket="b", key="k", url=link, size=1, entries=50_000, crc32="8EnnOw=="),
        manifest=ManifestInfo(bucket="b", key="download/r/manifest.json", url=link + "m", entries=50_000),
        renamed=[RenamedEntry(source=f"src/{i}/photo.jpg", name=f"photo ({i}).jpg") for i in range(50_000)],
        skipped=[SkippedSource(source=f"gone/{i}", reason="not_found") for i in range(10)],
        metadata={"user": "someone"},
        created_at="2026-11-21T00:00:00Z",
    )
    fitted = fit(notification)
    assert len(fitted.model_dump_json().encode()) <= 256 * 1024
    assert fitted.truncated is True
    assert 0 < len(fitted.renamed) < 50_000
    assert fitted.renamed == notification.renamed[: len(fitted.renamed)]
    assert fitted.metadata == {"user": "someone"}
    assert fitted.archive == notification.archive
    assert fitted.manifest == notification.manifest
    small = notification.model_copy(update={"renamed": notification.renamed[:3]})
    assert fit(small) == small
