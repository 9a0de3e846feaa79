"""Small sources are read by one GET each and no HEAD (issue 14), and the contract still holds: missing
sources fail or are skipped, MAX_ARCHIVE_BYTES holds, a source that changes mid-read fails the attempt,
and nothing partial is ever visible. The worker's clients go through tests/faultproxy.py, which counts
what they send."""

from __future__ import annotations

import io
import json
import random
import struct
import threading
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archiver import worker
from archiver.assembly import PartBudget, Replan
from archiver.models import SourceRef
from archiver.settings import MiB
from archiver.sources import SourceObject, head_small, head_source, obstore_can_name
from archiver.zipping import ZipEntry
from tests.conftest import Stack
from tests.faultproxy import FaultProxy, Seen
from tests.zipcheck import check_archive

DATA_DESCRIPTOR_FLAG = 0x0008


def run_once(stack: Stack, request: dict[str, Any], **settings: Any) -> dict[str, Any]:
    stack.send(request)
    assert worker.run(worker.connect(stack.settings(**settings)), burst=True) == 0
    (note,) = stack.notifications(1)
    return note


def local_flags(data: bytes) -> dict[str, int]:
    """Each entry's general-purpose flags in its local header."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
    flags = {}
    for info in infos:
        (flag,) = struct.unpack_from("<H", data, info.header_offset + 6)
        flags[info.filename] = flag
    return flags


def test_one_get_per_small_source_and_stored_with_its_crc(
    stack: Stack, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """Each small source costs one GET and no HEAD; media without an S3 CRC-32 (moto stores none
    unless asked) is STORED with the CRC computed from its bytes, in the local header, with no data
    descriptor; text is deflated."""
    rng = random.Random(14)
    files = {f"p{i}.jpg": rng.randbytes(20_000 + i) for i in range(12)} | {"notes.txt": b"words\n" * 5000}
    for name, body in files.items():
        stack.put(f"album/{name}", body)
    note = run_once(stack, {"request_id": "one-get", "files": [{"source": f"album/{n}"} for n in files]})
    assert note["status"] == "completed", note

    data = stack.download("download/one-get/one-get.zip")
    check_archive(data, files, tmp_path)
    reads = fault_proxy.requests_matching(service="s3", path_contains="/album/")
    assert sorted(r.operation for r in reads) == ["GetObject"] * len(files)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        methods = {info.filename: info.compress_type for info in archive.infolist()}
    assert methods == {name: zipfile.ZIP_STORED for name in files if name.endswith(".jpg")} | {
        "notes.txt": zipfile.ZIP_DEFLATED
    }
    assert [name for name, flag in local_flags(data).items() if flag & DATA_DESCRIPTOR_FLAG] == ["notes.txt"]


def test_a_missing_small_source_fails_with_its_upload_aborted(stack: Stack, fault_proxy: FaultProxy) -> None:
    """`on_missing: fail`: a GET's 404 is source_not_found, naming the source; the upload begun meanwhile
    is aborted and no archive appears."""
    stack.put("a.jpg", b"a" * 1000)
    note = run_once(stack, {"files": [{"source": "a.jpg"}, {"source": "gone.jpg"}]})
    assert (note["status"], note["error"]["code"]) == ("failed", "source_not_found")
    assert note["error"]["message"] == "1 source(s) not found: gone.jpg"  # as when HEADed first (§3, archive)
    assert stack.archive_keys() == [] and stack.incomplete_uploads() == []
    assert stack.queue_depth() == 0
    assert fault_proxy.requests_matching(operation="HeadObject", path_contains="a.jpg") == []


def test_a_missing_small_source_is_skipped_and_listed(
    stack: Stack, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """`on_missing: skip`: the source is left out and listed, and the archive's `entries` metadata is
    the number it has (the attempt started over with HEADs once the GET found it missing)."""
    stack.put("a.jpg", b"a" * 1000)
    stack.put("c.jpg", b"c" * 1000)
    request = {
        "request_id": "skip-small",
        "on_missing": "skip",
        "files": [{"source": f"{n}.jpg"} for n in "abc"],
    }
    note = run_once(stack, request)
    assert note["status"] == "completed", note
    assert note["skipped"] == [{"source": "b.jpg", "reason": "not_found"}]
    assert note["archive"]["entries"] == 2
    key = "download/skip-small/skip-small.zip"
    check_archive(stack.download(key), {"a.jpg": b"a" * 1000, "c.jpg": b"c" * 1000}, tmp_path)
    head = stack.clients.s3.head_object(Bucket=stack.destination_bucket, Key=key)
    assert head["Metadata"]["entries"] == "2"
    assert stack.incomplete_uploads() == []


def test_max_archive_bytes_holds_for_small_sources(stack: Stack) -> None:
    """Sizes learnt from the GETs add up past MAX_ARCHIVE_BYTES: too_large, upload aborted."""
    for name in "abc":
        stack.put(f"{name}.jpg", name.encode() * 600)
    note = run_once(stack, {"files": [{"source": f"{n}.jpg"} for n in "abc"]}, max_archive_bytes=1000)
    assert (note["status"], note["error"]["code"]) == ("failed", "too_large")
    assert "MAX_ARCHIVE_BYTES" in note["error"]["message"]
    assert stack.archive_keys() == [] and stack.incomplete_uploads() == []


def test_a_small_source_that_changes_mid_read_fails_the_attempt(
    stack: Stack, fault_proxy: FaultProxy
) -> None:
    """The body is cut, and the object replaced before the read resumes: the resumed answer is another
    version, so the attempt fails (transient: the message is released, the upload aborted), never an
    archive mixing two versions."""
    key = "moving/photo.jpg"
    stack.put(key, random.Random(1).randbytes(2 * MiB))
    replaced: list[bool] = []

    def replace_on_resume(seen: Seen) -> bool:
        if seen.operation == "GetObject" and seen.path.endswith(key):
            if "range" in seen.headers and not replaced:
                stack.put(key, random.Random(2).randbytes(2 * MiB))  # a new version, before the resume
                replaced.append(True)
            return "range" not in seen.headers
        return False

    fault_proxy.configure(rate=1.0, kinds=("cut",), limit=1, cut_after=MiB // 2, match=replace_on_resume)
    stack.send({"request_id": "moving", "files": [{"source": key}]})
    assert worker.run(worker.connect(stack.settings()), burst=True) == 0

    assert replaced
    assert stack.notifications(1, max_polls=2) == []
    assert stack.queue_depth() == 1  # released for a redelivery, which will read the new version
    assert stack.archive_keys() == [] and stack.incomplete_uploads() == []


def test_small_and_big_sources_in_one_request(stack: Stack, fault_proxy: FaultProxy, tmp_path: Path) -> None:
    """A source bigger than half of PREFETCH_BYTES is found big by its GET's answer, which is
    dropped; it is HEADed and streamed (with If-Match) when the writer reaches it."""
    rng = random.Random(3)
    files = {"small.jpg": rng.randbytes(10_000), "big.jpg": rng.randbytes(600_000), "tail.txt": b"t" * 999}
    for name, body in files.items():
        stack.put(f"mix/{name}", body)
    note = run_once(
        stack, {"request_id": "mix", "files": [{"source": f"mix/{n}"} for n in files]}, prefetch_bytes=MiB
    )
    assert note["status"] == "completed", note
    check_archive(stack.download("download/mix/mix.zip"), files, tmp_path)
    big = fault_proxy.requests_matching(service="s3", path_contains="mix/big.jpg")
    assert [r.operation for r in big] == ["GetObject", "HeadObject", "GetObject"]
    assert "if-match" not in big[0].headers and big[2].headers["if-match"]
    small = fault_proxy.requests_matching(service="s3", path_contains="mix/small.jpg")
    assert [r.operation for r in small] == ["GetObject"]


def entry(size: int, name: str = "clip.mp4") -> ZipEntry:
    ref = SourceRef(source=name, bucket="b", key=name)
    return ZipEntry(path=name, source=SourceObject(ref, size, '"e"', None, "video/mp4", None))  # type: ignore[arg-type]


def test_the_part_budget_grows_into_a_replan(stack: Stack) -> None:
    """Unseen sources count as small; a source seen to be huge makes the archive outgrow 10,000 parts of
    the size chosen, which starts the job over with HEADs (Replan), while a big one that fits is copied."""
    settings = stack.settings(
        part_size=5 * MiB, max_archive_bytes=10**12, server_side_copy_min_bytes=16 * MiB
    )
    budget = PartBudget.unknown(["clip.mp4"] * 3, settings, "auto", small_limit=4 * MiB)
    assert budget.part_size == 5 * MiB
    budget.admit(0, 0, entry(100 * MiB))
    assert budget.copyable == {0}
    with pytest.raises(Replan):
        budget.admit(1, 1, entry(60_000 * MiB))
    capped = stack.settings(part_size=5 * MiB, max_archive_bytes=20 * 1024 * MiB)
    budget = PartBudget.unknown(["a.jpg"] * 50_000, capped, "auto", small_limit=8 * MiB)
    assert budget.part_size == 5 * MiB  # bounded by MAX_ARCHIVE_BYTES, not by 50,000 x 8 MiB


TASK_KEY_ID = "ASIATASKROLE00000001"
TASK_TOKEN = "task-role-session-token"


@pytest.fixture
def task_role_endpoint() -> Iterator[str]:
    """An ECS container credentials endpoint on 127.0.0.1 (what AWS_CONTAINER_CREDENTIALS_FULL_URI points
    a task at), handing out temporary credentials of a task role."""

    class Credentials(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            expires = (datetime.now(UTC) + timedelta(hours=6)).strftime("%Y-%m-%dT%H:%M:%SZ")
            body = json.dumps(
                {
                    "AccessKeyId": TASK_KEY_ID,
                    "SecretAccessKey": "task-role-secret",
                    "Token": TASK_TOKEN,
                    "Expiration": expires,
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Credentials)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v2/credentials/task"
    finally:
        server.shutdown()
        server.server_close()


def test_source_gets_sign_with_the_task_roles_credentials(
    stack: Stack,
    fault_proxy: FaultProxy,
    task_role_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """On ECS the credentials come from the task role, through boto3's container provider: the source GETs,
    which obstore sends, carry that role's key and session token, as boto3's own requests do."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", task_role_endpoint)
    stack.put("album/one.jpg", b"one" * 1000)
    note = run_once(stack, {"request_id": "task-role", "files": [{"source": "album/one.jpg"}]})

    assert note["status"] == "completed", note
    check_archive(stack.download("download/task-role/task-role.zip"), {"one.jpg": b"one" * 1000}, tmp_path)
    (get,) = fault_proxy.requests_matching(operation="GetObject", path_contains="album/one.jpg")
    assert f"Credential={TASK_KEY_ID}/" in get.headers["authorization"]
    assert get.headers["x-amz-security-token"] == TASK_TOKEN
    upload = fault_proxy.requests_matching(operation="CreateMultipartUpload")
    assert upload and f"Credential={TASK_KEY_ID}/" in upload[0].headers["authorization"]


AWKWARD_KEYS = [
    *("a b.jpg", "a+b.jpg", "a%2Fb.jpg", "ü.jpg", "a#b?c.jpg", "x%y.jpg", "a~b", "a=b&c"),
    *("dir/a b/c.jpg", "a%20b", "é/ñ.png", "[x]", "100%", "%41", "q'uote"),
]


def test_keys_that_need_encoding_are_read_by_one_get_each(
    stack: Stack, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """obstore encodes keys its own way: spaces, `+`, `%`, `#`, `?`, `=`, `&`, non-ASCII and an encoded
    slash each reach the object they name (a wrong encoding would read as a 404, a missing source), by one
    GET and no HEAD."""
    bodies = {key: f"body of {key}".encode() * 50 for key in AWKWARD_KEYS}
    for key, body in bodies.items():
        stack.put(f"odd/{key}", body)
    note = run_once(stack, {"request_id": "odd-keys", "files": [{"source": f"odd/{key}"} for key in bodies]})

    assert note["status"] == "completed", note
    renamed = {entry["source"]: entry["name"] for entry in note["renamed"]}
    expected = {renamed.get(f"odd/{key}", key.rsplit("/", 1)[-1]): body for key, body in bodies.items()}
    check_archive(stack.download("download/odd-keys/odd-keys.zip"), expected, tmp_path)
    assert fault_proxy.requests_matching(operation="HeadObject") == []
    gets = fault_proxy.requests_matching(operation="GetObject", path_contains="/odd/")
    assert sorted(get.path.split("/odd/", 1)[1] for get in gets) == sorted(bodies)


KEY_SEGMENT = st.text(
    alphabet=st.sampled_from("ab z09-_.~+%#?=&'[]()!$,;@üé中"), min_size=1, max_size=12
).filter(lambda segment: segment not in (".", ".."))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    segments=st.lists(KEY_SEGMENT, min_size=1, max_size=3),
    size=st.integers(0, 3000),
    content_type=st.sampled_from(["image/jpeg", "text/plain; charset=utf-8", "application/octet-stream"]),
)
def test_obstores_head_says_what_boto3s_says_but_the_checksum(
    stack: Stack, segments: list[str], size: int, content_type: str
) -> None:
    """A fanned-out request's small sources are HEADed through obstore: size, ETag, Last-Modified and
    Content-Type as boto3's HEAD reads them, for keys obstore must encode; no checksum."""
    key = "heads/" + "/".join(segments)
    assert obstore_can_name(key)
    stack.put(key, random.Random(size).randbytes(size), ContentType=content_type, ChecksumAlgorithm="CRC32")
    clients = worker.connect(stack.settings()).clients
    ref = SourceRef(source=key, bucket=stack.source_bucket, key=key)

    def not_this_path() -> SourceObject | None:
        raise AssertionError(f"obstore answered for another path than {key!r}")

    seen = head_small(clients.source_store(ref.bucket), ref, otherwise=not_this_path)
    headed = head_source(clients.s3, ref)
    assert seen is not None and headed is not None
    assert (seen.size, seen.etag, seen.last_modified, seen.content_type) == (
        headed.size,
        headed.etag,
        headed.last_modified,
        headed.content_type,
    )
    assert seen.crc32 is None and headed.crc32 is not None
    missing = SourceRef(source=key + "-gone", bucket=stack.source_bucket, key=key + "-gone")
    assert head_small(clients.source_store(ref.bucket), missing, otherwise=not_this_path) is None
