"""Fan-out (issue #15): one archive built in segments by several workers, byte for byte the archive one
worker writes. Workers are real `archiver worker` processes on moto's server (each process is one worker:
claims and leases tell workers apart by process)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import random
import subprocess
import sys
import threading
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archiver import queue
from archiver.errors import PermanentError, TransientError
from archiver.fanout.coordinator import Coordinator
from archiver.fanout.directory import directory_bound, end_records, needs_zip64, relocate
from archiver.fanout.layout import plan_layout
from archiver.fanout.segment import _WithoutDirectory
from archiver.fanout.tasks import SegmentTask, run_task
from archiver.models import SourceRef, parse_request, plan_archive
from archiver.parts import PartLedger, parts_of
from archiver.settings import MiB, Settings, load_settings
from archiver.sources import SourceObject
from archiver.status import LeaseLost, Progress
from archiver.zipping import ZipEntry, zip_chunks
from tests.conftest import Stack, wait_for
from tests.faultproxy import FaultProxy, Faults, Seen
from tests.zipcheck import check_archive

FANOUT = {"FANOUT_SEGMENT_BYTES": str(6 * MiB), "PART_SIZE": str(5 * MiB), "VISIBILITY_TIMEOUT": "10"}


# ------------------------------------------------------------------------------------------- in memory


def _source(index: int, data: bytes, *, crc: bool) -> SourceObject:
    return SourceObject(
        ref=SourceRef(source=f"k{index}", bucket="b", key=f"k{index}"),
        size=len(data),
        etag='"e"',
        last_modified=datetime(2024, 1, 2, 3, 4, 6, tzinfo=UTC),
        content_type="",
        crc32=zlib.crc32(data) if crc else None,
        crc_of_bytes=crc,
    )


def _chunks(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), 65536):
        yield data[start : start + 65536]


def _segmented(entries: list[ZipEntry], datas: list[bytes], cuts: list[int]) -> bytes:
    """The archive as fan-out assembles it: each run zipped on its own, its directory moved into place."""
    out, directory = bytearray(), bytearray()
    offset, count, zip64 = 0, 0, False
    for first, end in itertools.pairwise(cuts):
        run, held = entries[first:end], datas[first:end]
        stripped = _WithoutDirectory(held=directory_bound([entry.path for entry in run]))
        zipped = zip_chunks(
            run, open_source=lambda i, _, held=held: _chunks(held[i]), compression="auto", base_offset=offset
        )
        body = b"".join(stripped.strip(zipped))
        found = stripped.directory
        assert found is not None and len(body) == found.entries_length
        out += body
        directory += relocate(found.records, offset)
        zip64 = zip64 or needs_zip64(found.records)
        offset += found.entries_length
        count += found.count
    return bytes(out + directory + end_records(count=count, size=len(directory), start=offset, zip64=zip64))


@given(
    files=st.lists(
        st.tuples(
            st.sampled_from([0, 1, 100, 65536, 65537, 200_000]),
            st.sampled_from(["jpg", "txt", "bin"]),
            st.booleans(),
            st.text(
                alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=8
            ),
        ),
        min_size=1,
        max_size=12,
    ),
    cuts=st.lists(st.integers(min_value=1, max_value=11), max_size=5),
    seed=st.integers(min_value=0, max_value=2**16),
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_segments_join_into_the_archive_one_run_writes(
    files: list[tuple[int, str, bool, str]], cuts: list[int], seed: int
) -> None:
    """Whatever the entries (media STORED with or without a CRC, text deflated, empty ones, non-ASCII
    names) and wherever the segments are cut, the joined archive is the one-run archive, byte for byte."""
    rng = random.Random(seed)
    datas, entries = [], []
    for index, (size, extension, crc, name) in enumerate(files):
        data = rng.randbytes(size) if extension != "txt" else (b"lorem ipsum " * (size // 12 + 1))[:size]
        datas.append(data)
        entries.append(ZipEntry(path=f"{index}/{name}.{extension}", source=_source(index, data, crc=crc)))
    whole = b"".join(zip_chunks(entries, open_source=lambda i, _: _chunks(datas[i]), compression="auto"))
    bounds = sorted({0, len(entries), *(cut for cut in cuts if cut < len(entries))})
    assert _segmented(entries, datas, bounds) == whole


def test_the_end_records_follow_stream_zip_past_65535_entries() -> None:
    """Past 65,535 entries stream-zip writes zip64 end records though no entry needs zip64: so does the
    joined directory."""
    datas = [b""] * 65_537
    entries = [ZipEntry(path=f"{i}.txt", source=_source(i, b"", crc=True)) for i in range(len(datas))]
    whole = b"".join(zip_chunks(entries, open_source=lambda i, _: iter(()), compression="auto"))
    assert _segmented(entries, datas, [0, 30_000, 65_537]) == whole


def test_a_segment_placed_past_4_gib_reads_back_at_its_offsets(tmp_path: Path) -> None:
    """A segment that starts past 4 GiB: its entries get zip64 fields and its directory records keep
    their offsets in zip64 extra fields, which `relocate` moves. Written at 5 GiB into a sparse file,
    zipfile reads every entry back where the directory says it is."""
    rng = random.Random(7)
    datas = [rng.randbytes(1000), b"text " * 5000, b""]
    entries = [
        ZipEntry(path="a.jpg", source=_source(0, datas[0], crc=True)),
        ZipEntry(path="b.txt", source=_source(1, datas[1], crc=False)),
        ZipEntry(path="c/", source=_source(2, datas[2], crc=True)),
    ]
    base = 5 * 1024 * MiB
    stripped = _WithoutDirectory(held=directory_bound([entry.path for entry in entries]))
    zipped = zip_chunks(
        entries, open_source=lambda i, _: _chunks(datas[i]), compression="auto", base_offset=base
    )
    body = b"".join(stripped.strip(zipped))
    found = stripped.directory
    assert found is not None and needs_zip64(found.records)
    records = relocate(found.records, base)
    path = tmp_path / "sparse.zip"
    with path.open("wb") as out:
        out.seek(base)
        out.write(body + records)
        out.write(end_records(count=3, size=len(records), start=base + len(body), zip64=True))
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == ["a.jpg", "b.txt", "c/"]
        assert [info.header_offset >= base for info in archive.infolist()] == [True] * 3
        assert [archive.read(name) for name in archive.namelist()] == datas
    assert relocate(records, -base) == found.records


def test_layout_places_segments_around_4_gib() -> None:
    """Segments that stay below 4 GiB whatever comes before, or start past it, are placed; one that may
    straddle it is chained. Part ranges do not overlap and fit in 10,000."""
    settings = load_settings(
        sqs_source_queue="q", sqs_destination_queue="d", s3_source_bucket="src", s3_destination_bucket="dst"
    )
    gib = 1024 * MiB
    entries = [
        ZipEntry(path=f"{i}.mp4", source=dataclasses.replace(_source(i, b"", crc=True), size=gib))
        for i in range(10)
    ]
    layout = plan_layout(entries, settings, "auto", gib)
    placements = [segment.base for segment in layout.segments]
    assert placements[:3] == [0, gib, 2 * gib]
    assert placements[3] is None  # 3 GiB + headers: may end past 4 GiB
    assert all(base is not None and base >= 4 * gib - 1 for base in placements[5:])
    ranges = [(segment.first_part, segment.last_part) for segment in layout.segments]
    assert all(a[1] < b[0] for a, b in itertools.pairwise(ranges))
    assert layout.final_part <= 10_000


# ------------------------------------------------------------------------------------------- on moto


@dataclass
class Fleet:
    """Worker processes on one stack; stopped (SIGKILL) at the end of the test."""

    stack: Stack
    tmp_path: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, endpoint: str | None = None, **settings: str) -> subprocess.Popen[bytes]:
        env = self.stack.worker_env(**{**FANOUT, **settings})
        if endpoint is not None:
            env["AWS_ENDPOINT_URL"] = endpoint
        log = open(self.tmp_path / f"worker-{len(self.processes)}.log", "wb")  # noqa: SIM115
        process = subprocess.Popen(
            [sys.executable, "-m", "archiver", "worker"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        self.processes.append(process)
        return process

    def logs(self) -> str:
        return "\n".join((self.tmp_path / f"worker-{i}.log").read_text() for i in range(len(self.processes)))

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()


@pytest.fixture
def fleet(stack: Stack, tmp_path: Path) -> Iterator[Fleet]:
    running = Fleet(stack, tmp_path)
    try:
        yield running
    finally:
        running.stop()


def photos(stack: Stack, count: int, size: int, *, seed: int = 0) -> dict[str, bytes]:
    rng = random.Random(seed)
    found = {}
    for index in range(count):
        body = rng.randbytes(size)
        stack.put(f"album/p{index:03d}.jpg", body)
        found[f"p{index:03d}.jpg"] = body
    return found


def request(request_id: str, names: list[str]) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "files": [{"source": f"album/{name}"} for name in names],
        "metadata": {"n": 1},
    }


def archive_of(stack: Stack, notice: dict[str, Any]) -> bytes:
    return stack.download(notice["archive"]["key"])


def one_notification(stack: Stack, fleet: Fleet, *, timeout: float = 120) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def arrived() -> bool:
        found.extend(stack.notifications(1, max_polls=1))
        return bool(found)

    wait_for(
        arrived, timeout=timeout, what=f"the notification; worker logs:\n{fleet.logs()[-6000:]}", interval=0.5
    )
    return found[0]


def single_worker_archive(stack: Stack, names: list[str], **settings: str) -> bytes:
    stack.send(request("single", names))
    done = stack.run_burst_process(**{"PART_SIZE": str(5 * MiB), **settings})
    assert done.returncode == 0, done.stderr[-3000:]
    (notice,) = stack.notifications(1)
    assert notice["status"] == "completed", notice
    return archive_of(stack, notice)


def test_segments_built_by_several_workers_make_the_single_worker_archive(
    stack: Stack, fleet: Fleet, tmp_path: Path
) -> None:
    """Three workers, 24 MiB of photos in 6 MiB segments: one notification, the status reports the
    segments, the archive is the one a single worker writes with fan-out off, every temporary object is
    gone and the upload completed."""
    files = photos(stack, 12, 2 * MiB)
    names = sorted(files)
    expected = single_worker_archive(stack, names)
    for _ in range(3):
        fleet.start()
    stack.send(request("fanned", names))
    notice = one_notification(stack, fleet)
    assert notice["status"] == "completed", notice
    assert notice["archive"]["entries"] == 12 and notice["metadata"] == {"n": 1}
    data = archive_of(stack, notice)
    check_archive(data, files, tmp_path)
    assert hashlib.sha256(data).digest() == hashlib.sha256(expected).digest()
    status = stack.status("fanned")
    assert status["status"] == "completed"
    assert status["segments_total"] == 4 and status["segments_done"] == 4
    assert not [key for key in stack.archive_keys() if "/fanout/" in key]
    assert stack.incomplete_uploads() == []
    built = _events(fleet.logs(), "segment.built")
    assert sorted({event["segment"] for event in built}) == [0, 1, 2, 3]


def _events(logs: str, event: str) -> list[dict[str, Any]]:
    found = []
    for line in logs.splitlines():
        if f'"{event}"' in line:
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


def text(size: int, seed: int) -> bytes:
    """Highly compressible: deflate makes a few KiB of it."""
    return (f"line {seed} of a log that repeats itself\n".encode() * (size // 30 + 1))[:size]


def test_small_segments_and_a_tail_after_a_copy_make_the_single_worker_archive(
    stack: Stack, fleet: Fleet, tmp_path: Path
) -> None:
    """Segments whose output is far under S3's 5 MiB part minimum (text deflates to almost nothing) are
    joined to their neighbours, and a segment whose last bytes follow a server-side copy keeps them as
    its tail: the archive is still the single worker's, byte for byte."""
    rng = random.Random(5)
    files: dict[str, bytes] = {}
    layout = [
        ("t0.txt", text(3 * MiB, 0)),
        ("t1.txt", text(3 * MiB, 1)),
        ("big.mp4", rng.randbytes(20 * MiB)),
    ]
    layout += [("s.jpg", rng.randbytes(100 * 1024)), ("p1.jpg", rng.randbytes(2 * MiB))]
    layout += [(f"q{i}.jpg", rng.randbytes(2 * MiB)) for i in range(8)]
    layout += [(f"t{i}.txt", text(3 * MiB, i)) for i in range(2, 6)]
    for name, body in layout:
        extra = {"ChecksumAlgorithm": "CRC32"} if name == "big.mp4" else {}
        stack.put(f"album/{name}", body, **extra)
        files[name] = body
    names = [name for name, _ in layout]
    copy = {"SERVER_SIDE_COPY_MIN_BYTES": str(16 * MiB)}
    expected = single_worker_archive(stack, names, **copy)
    for _ in range(2):
        fleet.start(FANOUT_SEGMENT_BYTES=str(24 * MiB), **copy)
    stack.send(request("fanned", names))
    notice = one_notification(stack, fleet)
    assert notice["status"] == "completed", notice
    data = archive_of(stack, notice)
    check_archive(data, files, tmp_path)
    assert data == expected
    built = {event["segment"]: event for event in _events(fleet.logs(), "segment.built")}
    assert sorted(built) == [0, 1, 2, 3]
    # s.jpg and p1.jpg after big.mp4's copy: a tail exists only where the part before it was copied.
    assert built[1]["tail_bytes"] > 0
    # 6 MiB of text each, deflated to a few KiB: their whole output is a head far under 5 MiB.
    assert built[0]["head_bytes"] < MiB and built[3]["head_bytes"] < MiB


def test_forged_and_repeated_tasks_rebuild_nothing_wrong(stack: Stack, tmp_path: Path) -> None:
    """A task for a request that has no plan, for a segment the plan does not have, a task's body sent
    without the task attribute, a request sent with it, and every segment task sent twice: one archive,
    the single worker's; each request is answered as a request; no stray objects."""
    files = photos(stack, 8, 2 * MiB)
    names = sorted(files)
    expected = single_worker_archive(stack, names)
    sqs, url = stack.clients.sqs, stack.source_url
    queue.send_task(sqs, url, SegmentTask("nobody", 0).body(), kind="segment")
    queue.send_task(sqs, url, SegmentTask("fanned", 99).body(), kind="segment")
    stack.send(SegmentTask("fanned", 0).body())  # no attribute: a request, and an invalid one
    queue.send_task(sqs, url, json.dumps(request("marked", names[:1])), kind="segment")
    stack.send(request("fanned", names))
    settings = {**FANOUT, "FANOUT_SEGMENT_BYTES": str(5 * MiB)}
    # The coordinator builds every segment itself, then the same burst run takes its own tasks: dropped.
    done = stack.run_burst_process(**settings)
    assert done.returncode == 0, done.stderr[-3000:]
    for index in range(4):  # repeated after completion: nothing to rebuild
        queue.send_task(sqs, url, SegmentTask("fanned", index).body(), kind="segment")
    again = stack.run_burst_process(**settings)
    assert again.returncode == 0, again.stderr[-3000:]
    notices = stack.notifications(3, max_polls=3)
    assert len(notices) == 3
    by_id = {notice["request_id"]: notice for notice in notices}
    assert by_id["fanned"]["status"] == "completed" and by_id["marked"]["status"] == "completed"
    (failed,) = [notice for notice in notices if notice["request_id"] not in ("fanned", "marked")]
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_request"
    assert stack.download(by_id["fanned"]["archive"]["key"]) == expected
    assert not [key for key in stack.archive_keys() if "/fanout/" in key]
    assert stack.queue_depth() == 0 and stack.queue_depth(stack.dlq_url) == 0
    tasks = _events(done.stdout + done.stderr + again.stdout + again.stderr, "segment_task.done")
    # The two forged ones, the coordinator's own four (it built every segment itself), the four repeated.
    assert len(tasks) == 10 and {task["outcome"] for task in tasks} == {"dropped"}
    reasons = {task["reason"] for task in tasks}
    assert reasons <= {"no live plan for this request", "segment already recorded"}


def plan_exists(stack: Stack, request_id: str) -> bool:
    key = f"download/{request_id}/fanout/plan.json"
    return bool(stack.clients.s3.list_objects_v2(Bucket=stack.destination_bucket, Prefix=key).get("KeyCount"))


def records(stack: Stack, request_id: str) -> list[str]:
    prefix = f"download/{request_id}/fanout/segment-"
    listing = stack.clients.s3.list_objects_v2(Bucket=stack.destination_bucket, Prefix=prefix)
    return [item["Key"] for item in listing.get("Contents", []) if item["Key"].endswith(".json")]


@pytest.mark.slow
def test_a_segment_worker_killed_mid_segment_costs_one_visibility_timeout(
    stack: Stack, fleet: Fleet, moto_endpoint: str, tmp_path: Path
) -> None:
    """SIGKILL of a worker holding a segment (stuck writing it): its claim expires, the coordinator
    builds that segment itself, and the archive is the single worker's; what the dead worker sent
    never reached S3."""
    files = photos(stack, 12, 2 * MiB)
    names = sorted(files)
    expected = single_worker_archive(stack, names)
    never, victim_holds_one = threading.Event(), threading.Event()

    def source_get(seen: Seen) -> bool:
        return seen.method == "GET" and seen.path.startswith(f"/{stack.source_bucket}/")

    def head_put(seen: Seen) -> bool:
        return seen.method == "PUT" and seen.path.endswith(".head")

    with (
        # The coordinator's source GETs wait until the victim holds a segment (its head PUT is stuck):
        # a coordinator free to read could build every segment before a victim, started after the plan
        # and slow to import on a loaded machine, polled for one: the likely reason two fresh-clone runs
        # on a slow day never saw the victim's head.
        FaultProxy(moto_endpoint, Faults(match=source_get, hold=victim_holds_one)) as coordinators,
        FaultProxy(moto_endpoint, Faults(match=head_put, hold=never)) as stuck,
    ):
        try:
            fleet.start(endpoint=coordinators.url)
            stack.send(request("fanned", names))
            wait_for(lambda: plan_exists(stack, "fanned"), timeout=60, what="the plan")
            victim = fleet.start(endpoint=stuck.url)
            wait_for(lambda: stuck.requests_matching(where=head_put), timeout=120, what="the victim's head")
            victim_holds_one.set()
            victim.kill()
            victim.wait()
            (held,) = stuck.requests_matching(where=head_put)
            notice = one_notification(stack, fleet)
        finally:
            victim_holds_one.set()
            never.set()
        assert not [seen for seen in stuck.requests_forwarded("PutObject") if seen.path.endswith(".head")]
    assert notice["status"] == "completed", notice
    data = archive_of(stack, notice)
    check_archive(data, files, tmp_path)
    assert data == expected
    segment = int(held.path.rsplit("segment-", 1)[1].split(".")[0])
    rebuilt = [event for event in _events(fleet.logs(), "segment.built") if event["segment"] == segment]
    assert len(rebuilt) == 1  # by the coordinator, once the dead worker's claim ran out
    assert stack.incomplete_uploads() == []


@pytest.mark.slow
def test_a_killed_coordinator_is_resumed_from_its_plan_with_the_same_upload(
    stack: Stack, fleet: Fleet, moto_endpoint: str, tmp_path: Path
) -> None:
    """SIGKILL of the coordinator mid-way: the redelivered request finds the plan, keeps the segments
    already recorded and the one upload (no second CreateMultipartUpload), builds what is left; one
    notification, the single worker's archive."""
    files = photos(stack, 18, 2 * MiB)
    names = sorted(files)
    expected = single_worker_archive(stack, names)

    def source_get(seen: Seen) -> bool:
        return seen.method == "GET" and seen.path.startswith(f"/{stack.source_bucket}/")

    with (
        FaultProxy(moto_endpoint, Faults(match=source_get, throttle=2 * MiB)) as slow,
        FaultProxy(moto_endpoint) as other,
    ):
        coordinator = fleet.start(endpoint=slow.url)
        stack.send(request("fanned", names))
        wait_for(lambda: plan_exists(stack, "fanned"), timeout=60, what="the plan")
        fleet.start(endpoint=other.url)
        wait_for(lambda: records(stack, "fanned"), timeout=60, what="a segment record")
        coordinator.kill()
        coordinator.wait()
        notice = one_notification(stack, fleet)
        creates = [
            *slow.requests_matching(operation="CreateMultipartUpload"),
            *other.requests_matching(operation="CreateMultipartUpload"),
        ]
    assert notice["status"] == "completed", notice
    data = archive_of(stack, notice)
    check_archive(data, files, tmp_path)
    assert data == expected
    assert len(creates) == 1
    assert _events(fleet.logs(), "fanout.resumed")
    assert stack.incomplete_uploads() == []
    assert stack.notifications(1, max_polls=2) == []  # one notification only


def test_a_segment_that_cannot_be_read_fails_the_request_and_aborts_the_upload(
    stack: Stack, fleet: Fleet, moto_endpoint: str
) -> None:
    """One source denied at its GET (it passed its HEAD): whoever builds its segment records the
    failure, the request ends `failed` naming it, the upload is aborted: no archive with a hole."""
    files = photos(stack, 12, 2 * MiB)
    names = sorted(files)
    denied = f"/{stack.source_bucket}/album/p005.jpg"

    def denied_get(seen: Seen) -> bool:
        return seen.method == "GET" and seen.path == denied

    with FaultProxy(moto_endpoint, Faults(match=denied_get, rate=1.0, kinds=("403",))) as proxy:
        for _ in range(2):
            fleet.start(endpoint=proxy.url)
        stack.send(request("fanned", names))
        notice = one_notification(stack, fleet)
        assert proxy.requests_matching(operation="CreateMultipartUpload")
        assert proxy.requests_matching(operation="AbortMultipartUpload")
    assert notice["status"] == "failed", notice
    assert notice["error"]["code"] == "forbidden_source"
    assert "album/p005.jpg" in notice["error"]["message"]
    assert stack.incomplete_uploads() == []
    assert not [key for key in stack.archive_keys() if key.endswith(".zip")]
    assert stack.status("fanned")["status"] == "failed"


def test_planning_heads_small_sources_with_obstore_and_only_big_ones_with_boto3(
    stack: Stack, fleet: Fleet, moto_endpoint: str, tmp_path: Path
) -> None:
    """The coordinator HEADs every source once through obstore, and again through boto3 (S3's checksums
    and storage class, asked with `x-amz-checksum-mode`) only the one bigger than a small source: the
    archive is still the single worker's, the big source STORED with S3's CRC-32."""
    files = photos(stack, 12, 2 * MiB)
    files["video.mp4"] = random.Random(7).randbytes(8 * MiB)
    stack.put("album/video.mp4", files["video.mp4"], ChecksumAlgorithm="CRC32")
    names = sorted(files)
    expected = single_worker_archive(stack, names)
    with FaultProxy(moto_endpoint) as proxy:
        for _ in range(2):
            fleet.start(endpoint=proxy.url)
        stack.send(request("fanned", names))
        notice = one_notification(stack, fleet)
        heads = proxy.requests_matching(operation="HeadObject", path_contains="/album/")
    assert notice["status"] == "completed", notice
    data = archive_of(stack, notice)
    check_archive(data, files, tmp_path)
    assert data == expected
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.getinfo("video.mp4").compress_type == zipfile.ZIP_STORED
    by_boto3 = [seen.path.rpartition("/")[2] for seen in heads if "x-amz-checksum-mode" in seen.headers]
    by_obstore = [seen.path.rpartition("/")[2] for seen in heads if "x-amz-checksum-mode" not in seen.headers]
    assert by_boto3 == ["video.mp4"]
    assert sorted(by_obstore) == names


def test_an_archived_small_source_fails_a_fanned_out_request_at_its_get(stack: Stack, fleet: Fleet) -> None:
    """obstore's HEAD does not tell the storage class, so a small GLACIER source is found at its GET, as a
    single worker finds it: `source_archived` naming it, the upload aborted, no archive."""
    files = photos(stack, 12, 2 * MiB)
    stack.put("album/cold.jpg", b"frozen", StorageClass="GLACIER")
    for _ in range(2):
        fleet.start()
    stack.send(request("fanned", [*sorted(files), "cold.jpg"]))
    notice = one_notification(stack, fleet)
    assert (notice["status"], notice["error"]["code"]) == ("failed", "source_archived"), notice
    assert "album/cold.jpg" in notice["error"]["message"]
    assert notice["error"]["retryable"] is False
    assert stack.incomplete_uploads() == []
    assert not [key for key in stack.archive_keys() if key.endswith(".zip")]
    assert stack.status("fanned")["status"] == "failed"


def coordinator_of(
    stack: Stack, settings: Settings, document: dict[str, Any], *, confirm: Any, last_delivery: bool
) -> Coordinator:
    """The coordinator of a request, in this process, as the worker that received it makes it."""
    plan = plan_archive(parse_request(document), settings=settings, message_id="m-1")
    return Coordinator(
        clients=stack.clients,
        settings=settings,
        plan=plan,
        source_url=stack.source_url,
        progress=Progress(),
        abandoned=lambda: False,
        confirm=confirm,
        last_delivery=last_delivery,
    )


def test_a_segment_task_that_keeps_failing_ends_the_request_on_its_last_delivery(stack: Stack) -> None:
    """A segment whose source changed after the plan (its GET finds another version) fails the same way
    on every delivery: released until its last, where the failure is recorded; the coordinator then
    fails the request and aborts the upload, leaving no plan behind."""
    photos(stack, 12, 2 * MiB)
    settings = stack.settings(fanout_segment_bytes=6 * MiB)
    document = request("changing", [f"p{i:03d}.jpg" for i in range(12)])
    coordinator = coordinator_of(stack, settings, document, confirm=lambda: None, last_delivery=False)
    stored = coordinator._plan()
    assert stored is not None and len(stored.segments) == 4
    stack.put("album/p004.jpg", b"another version")  # in segment 1
    task = SegmentTask("changing", 1)
    with pytest.raises(TransientError, match=r"p004\.jpg changed"):
        run_task(stack.clients, settings, task, abandoned=lambda: False, last_delivery=False)
    assert records(stack, "changing") == []
    last = run_task(stack.clients, settings, task, abandoned=lambda: False, last_delivery=True)
    assert last.outcome == "failed" and "p004.jpg changed" in last.reason
    # The request's next delivery: its coordinator resumes the stored plan and finds the failure.
    resumed = coordinator_of(stack, settings, document, confirm=lambda: None, last_delivery=False)
    assert resumed.resumed is not None and resumed.resumed.upload_id == stored.upload_id
    with pytest.raises(PermanentError, match="segment 1: kept failing") as failed:
        resumed.build()
    assert failed.value.code == "internal"
    assert stack.incomplete_uploads() == []
    assert not [key for key in stack.archive_keys() if "/fanout/" in key]


@given(
    length=st.integers(min_value=0, max_value=30 * MiB),
    part_size=st.sampled_from([5 * MiB, 8 * MiB]),
    chunk=st.sampled_from([1000, 65536, 3 * MiB]),
    first_size=st.sampled_from([0, 5 * MiB]),
    known=st.sampled_from([0.0, 0.5, 1.0]),
)
@settings(max_examples=40, deadline=None)
def test_a_segments_parts_are_all_at_least_5_mib_unless_it_is_one_part(
    length: int, part_size: int, chunk: int, first_size: int, known: float
) -> None:
    """With `join_short_last`, whatever the stream's length, how it is cut, the first part's size and
    how much of the length is known beforehand, the parts are its bytes in order, consecutive numbers,
    each at least S3's 5 MiB, but for a stream that is one part; and where the length is known (STORED
    entries), the last part, uploaded after the last read, is under 10 MiB, not a full one and the rest."""
    data = bytes(range(256)) * (length // 256) + bytes(length % 256)
    ledger = PartLedger(last_number=40)
    chunks = (data[i : i + chunk] for i in range(0, len(data), chunk))
    parts = list(
        parts_of(
            chunks,
            part_size,
            lambda: False,
            ledger,
            join_short_last=True,
            first_size=first_size,
            at_least=int(length * known),
        )
    )
    assert b"".join(bytes(body) for _, body in parts) == data
    assert [number for number, _ in parts] == list(range(41, 41 + len(parts)))
    assert len(parts) == 1 or all(len(body) >= 5 * MiB for _, body in parts)
    assert ledger.short_last == 0
    if known == 1.0:
        assert len(parts[-1][1]) < 10 * MiB


def test_a_coordinator_that_lost_its_lease_leaves_the_upload_to_the_new_holder(stack: Stack) -> None:
    """On its last delivery too: the worker that took the lease completes this very plan and upload, so
    the one that lost it (finding out just before completing) must abort nothing."""
    photos(stack, 12, 2 * MiB)
    settings = stack.settings(fanout_segment_bytes=6 * MiB)

    def taken() -> None:
        raise LeaseLost("request taken: the status document is another worker's now")

    document = request("taken", [f"p{i:03d}.jpg" for i in range(12)])
    coordinator = coordinator_of(stack, settings, document, confirm=taken, last_delivery=True)
    with pytest.raises(LeaseLost):
        coordinator.build()
    assert stack.incomplete_uploads() == ["download/taken/taken.zip"]
    assert plan_exists(stack, "taken") and len(records(stack, "taken")) == 4
