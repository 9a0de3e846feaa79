"""Nothing read that should not be, nothing written outside the prefix, limits with clear failures."""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archiver import worker
from archiver.request import MAX_POINTER_BYTES
from tests.conftest import Stack, report_stages
from tests.zipcheck import check_with_zipfile

POINTER = "software.amazon.payloadoffloading.PayloadS3Pointer"


def test_extended_client_pointer_is_followed(stack: Stack, tmp_path: Path) -> None:
    """A request offloaded to S3 by the extended client is read from its (allowed) bucket and archived."""
    files = [{"source": f"many/{i}.txt"} for i in range(300)]
    for i in range(300):
        stack.put(f"many/{i}.txt", str(i).encode())
    stack.put("offloaded/req.json", json.dumps({"request_id": "big-1", "files": files}).encode())
    stack.send(json.dumps([POINTER, {"s3BucketName": stack.source_bucket, "s3Key": "offloaded/req.json"}]))
    worker.run(worker.connect(stack.settings()), burst=True)

    (note,) = stack.notifications(1)
    assert note["status"] == "completed"
    assert note["archive"]["entries"] == 300
    check_with_zipfile(
        stack.download("download/big-1/big-1.zip"), {f"{i}.txt": str(i).encode() for i in range(300)}
    )


@pytest.mark.parametrize(
    ("pointer", "code"),
    [
        ({"s3BucketName": "someone-elses-bucket", "s3Key": "req.json"}, "forbidden_source"),
        ({"s3BucketName": "SOURCE", "s3Key": "no/such/req.json"}, "invalid_request"),
    ],
)
def test_bad_pointers_fail_permanently(stack: Stack, pointer: dict[str, str], code: str) -> None:
    """A pointer to a bucket outside the allow-list, or to nothing, is a permanent failure."""
    if pointer["s3BucketName"] == "SOURCE":
        pointer = {**pointer, "s3BucketName": stack.source_bucket}
    stack.send(json.dumps([POINTER, pointer]))
    worker.run(worker.connect(stack.settings()), burst=True)
    (note,) = stack.notifications(1)
    assert note["status"] == "failed"
    assert note["error"]["code"] == code
    assert stack.queue_depth() == 0


def test_a_pointer_over_the_limit_is_too_large(stack: Stack) -> None:
    """An offloaded body over 8 MiB fails with too_large, naming the limit, without being decoded."""
    stack.put("offloaded/huge.json", b"[" + b"{}," * (MAX_POINTER_BYTES // 3) + b"{}]")
    stack.send(json.dumps([POINTER, {"s3BucketName": stack.source_bucket, "s3Key": "offloaded/huge.json"}]))
    worker.run(worker.connect(stack.settings()), burst=True)
    (note,) = stack.notifications(1)
    assert note["error"]["code"] == "too_large"
    assert f"is over {MAX_POINTER_BYTES} bytes" in note["error"]["message"]
    assert stack.queue_depth() == 0


def test_max_archive_bytes_is_checked_before_upload(stack: Stack) -> None:
    """Sources adding up past MAX_ARCHIVE_BYTES fail with too_large and no upload is started."""
    stack.put("a.bin", b"a" * 600)
    stack.put("b.bin", b"b" * 600)
    stack.send({"request_id": "huge", "files": [{"source": "a.bin"}, {"source": "b.bin"}]})
    worker.run(worker.connect(stack.settings(max_archive_bytes=1000)), burst=True)
    (note,) = stack.notifications(1)
    assert note["error"]["code"] == "too_large"
    assert "MAX_ARCHIVE_BYTES" in note["error"]["message"]
    assert stack.archive_keys() == []
    assert stack.incomplete_uploads() == []


def test_max_files_is_enforced(stack: Stack) -> None:
    """More files than MAX_FILES fail with too_large, naming the limit."""
    stack.send({"files": [{"source": f"{i}.txt"} for i in range(6)]})
    worker.run(worker.connect(stack.settings(max_files=5)), burst=True)
    (note,) = stack.notifications(1)
    assert note["error"]["code"] == "too_large"
    assert "MAX_FILES" in note["error"]["message"]


def test_logs_hold_no_credentials_or_signatures(stack: Stack) -> None:
    """A real worker's log lines never show the secret key or a presigned URL's signature."""
    stack.put("a.txt", b"a")
    stack.send({"request_id": "logs-1", "files": [{"source": "a.txt"}]})
    done = stack.run_burst_process(APP_DEBUG="1")
    assert done.returncode == 0, done.stderr
    (note,) = stack.notifications(1)
    signature = note["archive"]["url"].split("X-Amz-Signature=")[1]
    logs = done.stdout + done.stderr
    assert "request.done" in logs
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in logs
    assert signature not in logs


json_leaf = st.none() | st.booleans() | st.integers() | st.text(max_size=20)
json_value = st.recursive(
    json_leaf,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=10,
)
tricky_text = st.sampled_from(
    [
        "..",
        "../..",
        "/etc/passwd",
        "a\\b",
        "C:x",
        "\x00",
        "\u202e",
        "e\u0301",
        "É",
        "ｆｉｌｅ",
        "a" * 2000,
        "",
        " ",
    ]
)
file_entry = st.fixed_dictionaries(
    {"source": st.text(max_size=30) | tricky_text | st.sampled_from(["a.txt", "s3://evil/a.txt", "dir/"])},
    optional={
        "destination": st.text(max_size=20) | tricky_text | json_value,
        "name": st.text(max_size=20) | tricky_text,
        "extra": json_value,
    },
)
hostile_body = st.one_of(
    st.text(max_size=200),
    json_value.map(json.dumps),
    st.fixed_dictionaries(
        {"files": st.lists(file_entry, max_size=4)},
        optional={
            "request_id": st.text(max_size=20) | tricky_text,
            "archive_name": tricky_text | st.text(max_size=20),
            "on_missing": st.sampled_from(["skip", "fail", "SKIP", 1]),
            "metadata": json_value,
            "Files": json_value,
            "ﬁles": json_value,  # NFKC folds the ligature to "files": still an unknown field
        },
    ).map(json.dumps),
    st.integers(1, 5000).map(lambda depth: "[" * depth + "]" * depth),
    st.just('{"files": [{"source": "a.txt"}], "files": []}'),
    st.just('{"files": [{"source": "a.txt"}], "FILES": []}'),
)


@pytest.mark.slow
def test_hostile_bodies_never_crash_or_escape(stack: Stack) -> None:
    """300 generated hostile bodies, junk mostly, each end in a failed notification or a valid archive
    under the prefix; the worker never crashes and every message is settled. (Mostly valid requests with
    hostile parts, which reach the archive, are tests/test_fuzz.py's.)"""
    stack.put("a.txt", b"a")
    w = worker.connect(stack.settings())
    sent: list[str] = []

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(hostile_body)
    def send(body: str) -> None:
        sent.append(body)
        stack.send(body)

    send()
    assert len(sent) >= 250
    worker.run(w, burst=True)

    notes: list[dict[str, Any]] = stack.notifications(len(sent), max_polls=len(sent))
    assert len(notes) == len(sent)
    assert {n["status"] for n in notes} <= {"completed", "failed"}
    for note in notes:
        if note["status"] == "failed":
            assert note["error"]["code"] in {
                "invalid_request",
                "forbidden_source",
                "source_not_found",
                "too_large",
            }
            assert note["error"]["retryable"] is False
    for key in stack.archive_keys():
        assert key.startswith("download/") and ".." not in key.split("/")
    for note in notes:
        if note["status"] == "completed":
            assert note["archive"]["key"].startswith("download/")
            data = stack.download(note["archive"]["key"])
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                names = archive.namelist()
            check_with_zipfile(data, dict.fromkeys(names, b"a"))  # every source is a.txt
    assert stack.queue_depth() == 0
    outcomes = Counter(
        n["status"] if n["status"] == "completed" else f"failed ({n['error']['code']})" for n in notes
    )
    report_stages("hostile bodies through the worker", {"sent": len(sent), **outcomes})
