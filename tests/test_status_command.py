"""`archiver status REQUEST_ID` on the command line (contract §7): a request's state read from its status
document, for a producer that can read the bucket and would rather ask than wait on the queue."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
from hypothesis import given
from hypothesis import strategies as st

from archiver import status, worker
from archiver.cli import main
from archiver.models import archive_key
from archiver.status_view import human_bytes
from tests.conftest import Stack
from tests.test_cli import use_stack
from tests.zipcheck import check_with_zipfile


def run_status(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # what the worker logged before
    code = main(["status", *args])
    captured = capsys.readouterr()
    return code, _without_server_log(captured.out), _without_server_log(captured.err)


def _without_server_log(text: str) -> str:
    """The command's own lines: the moto server runs in this process, and its request log lines (JSON
    events through the command's logging set-up) land on the same stream."""
    return "".join(
        line for line in text.splitlines(keepends=True) if not line.startswith('{"event": "127.0.0.1')
    )


def test_a_completed_request_shows_its_link_and_its_document(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Completed: size, entries and a link that downloads the archive; `--json` is the stored document."""
    use_stack(stack, monkeypatch)
    stack.put("a.txt", b"alpha" * 1000)
    stack.put("b.txt", b"beta")
    stack.send({"request_id": "st-done", "files": [{"source": "a.txt"}, {"source": "b.txt"}]})
    worker.run(worker.connect(stack.settings()), burst=True)
    (note,) = stack.notifications(1)
    assert note["status"] == "completed"

    code, out, _ = run_status(capsys, "st-done")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "request st-done: completed"
    assert "  files 2 of 2, bytes 4.9 KiB of 4.9 KiB" in lines
    assert f"  size {human_bytes(note['archive']['size'])}, 2 entries" in lines
    (link,) = [line.removeprefix("  link ") for line in lines if line.startswith("  link ")]
    with urllib.request.urlopen(link, timeout=10) as response:
        check_with_zipfile(response.read(), {"a.txt": b"alpha" * 1000, "b.txt": b"beta"})

    code, out, _ = run_status(capsys, "st-done", "--json")
    assert code == 0
    assert json.loads(out) == stack.status("st-done")


def test_a_failed_request_shows_its_error(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use_stack(stack, monkeypatch)
    stack.send({"request_id": "st-failed", "files": [{"source": "nowhere.txt"}]})
    worker.run(worker.connect(stack.settings()), burst=True)
    (note,) = stack.notifications(1)
    assert note["status"] == "failed"
    code, out, _ = run_status(capsys, "st-failed")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "request st-failed: failed"
    assert any(line.startswith("  error source_not_found: ") for line in lines), lines
    assert not any(line.startswith("  link ") for line in lines)


def test_a_request_in_progress_shows_files_bytes_and_segments(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a worker's lease writes while it builds (a fanned-out request, 1 of 4 segments done)."""
    use_stack(stack, monkeypatch)
    progress = status.Progress(
        files_total=5, bytes_total=3 * 1024 * 1024, files_done=2, bytes_done=1024 * 1024, segments_total=4
    )
    progress.segments_done = 1
    key = archive_key("download", "st-busy", "st-busy.zip")
    seen = status.read_stored(stack.clients.s3, bucket=stack.destination_bucket, archive_key=key)
    lease = status.claim(
        stack.clients.s3,
        bucket=stack.destination_bucket,
        archive_key=key,
        request_id="st-busy",
        progress=progress,
        seen=seen,
        terms=status.LeaseTerms(message_id="m-1", digest="d", seconds=30),
    )
    assert lease is not None
    code, out, _ = run_status(capsys, "st-busy")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "request st-busy: processing"
    assert "  files 2 of 5, bytes 1.0 MiB of 3.0 MiB" in lines
    assert "  segments 1 of 4" in lines
    assert any(
        re.fullmatch(r"  worker \S+, lease until \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", line) for line in lines
    )


@pytest.mark.parametrize("request_id", ["never-sent", "../etc"])
def test_an_unknown_request_is_one_line_and_exit_1(
    request_id: str, stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use_stack(stack, monkeypatch)
    code, out, err = run_status(capsys, request_id)
    assert code == 1
    assert len((out + err).splitlines()) == 1
    assert request_id in out + err


@given(st.integers(min_value=0, max_value=1 << 50))
def test_human_bytes_names_the_size_in_its_largest_unit(count: int) -> None:
    shown = human_bytes(count)
    number, unit = shown.split(" ")
    scale = 1024 ** ["B", "KiB", "MiB", "GiB", "TiB"].index(unit)
    assert float(number) * scale == pytest.approx(count, rel=0.05, abs=0.05 * scale)
    assert unit == "B" or count >= 0.99 * scale  # 1023.96 MiB is shown as 1.0 GiB
    assert float(number) < 1024 or unit == "TiB"
