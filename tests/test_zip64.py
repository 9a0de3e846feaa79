"""ZIP64 only where it is needed, and archives past 4 GiB or 65,535 entries that every reader accepts.

Archives are streamed from `zip_chunks` straight into `upload_stream` against moto, from synthetic sources
generated on the fly (a 1 MiB pseudo-random block, repeated), then fetched with one streamed GET to a file
and checked from disk: the layout of every local header and central directory record, the end records, and
zipfile, Info-ZIP `unzip -t`, 7-Zip `t`, `bsdtar -tf` and Java (`ZipInputStream` and `ZipFile`). Nothing of
archive size is held in the test's memory (moto, in this process, does hold the archive).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from archiver.multipart import choose_part_size, upload_stream
from archiver.settings import MiB
from archiver.sources import SourceObject
from archiver.zipping import ZipEntry, archive_size_bound, zip_chunks
from tests.conftest import Stack
from tests.synthetic import Synthetic
from tests.zipcheck import seven_zip

GiB = 1024 * MiB
FOUR_GIB = 4 * GiB  # the first offset zip32 cannot express is 0xFFFFFFFF + 1
ZIP32_MAX_ENTRIES = 0xFFFF
PART_SIZE = 32 * MiB
CONCURRENCY = 3
JAVA_CHECK = Path(__file__).parent / "java" / "ZipCheck.java"
READER_TIMEOUT = 240
# Each 4 GiB archive goes through moto (in this process) at ~40-60 MB/s on this shared 2-core machine.
BIG_ARCHIVE_TIMEOUT = 600

ZIP64_EXTRA_ID = 0x0001
DATA_DESCRIPTOR_FLAG = 0x0008
LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
END_OF_CENTRAL_DIRECTORY = struct.Struct("<4sHHHHIIH")
ZIP64_LOCATOR = struct.Struct("<4sIQI")
ZIP64_END_OF_CENTRAL_DIRECTORY = struct.Struct("<4sQHHIIQQQQ")


@dataclass(frozen=True)
class Built:
    path: Path
    specs: tuple[Synthetic, ...]
    crcs: tuple[int, ...]  # every entry's real CRC-32, for the readers' checks

    @property
    def names(self) -> list[str]:
        return [spec.path for spec in self.specs]


@pytest.fixture
def build(stack: Stack, tmp_path: Path) -> Iterator[Callable[[Sequence[Synthetic]], Built]]:
    """Stream an archive of synthetic sources into moto and fetch it to a file; both are deleted after the
    test, so gigabytes neither stay in moto's memory nor in pytest's kept temporary directories."""
    # moto assembles a completed multipart upload in memory, which for 4 GiB took longer here than the
    # worker clients' 60 s read timeout: botocore then sent CompleteMultipartUpload again while moto was
    # still busy with the first (twice the memory, and a KeyError from moto once the first had finished).
    s3 = boto3.session.Session().client(
        "s3",
        config=Config(
            read_timeout=900, retries={"mode": "standard", "max_attempts": 3}, signature_version="s3v4"
        ),
    )
    made: list[tuple[str, Path]] = []

    def _build(specs: Sequence[Synthetic]) -> Built:
        key = f"archive-{len(made)}.zip"
        path = tmp_path / key
        made.append((key, path))
        sources = [spec.source(index) for index, spec in enumerate(specs)]
        entries = [ZipEntry(spec.path, source) for spec, source in zip(specs, sources, strict=True)]

        def open_source(index: int, obj: SourceObject) -> Iterator[bytes]:
            assert obj is sources[index]
            return specs[index].chunks(index)

        uploaded = upload_stream(
            s3,
            zip_chunks(entries, open_source=open_source, compression="auto"),
            bucket=stack.destination_bucket,
            key=key,
            part_size=choose_part_size(archive_size_bound(entries), PART_SIZE),
            concurrency=CONCURRENCY,
            metadata={},
        )
        body = s3.get_object(Bucket=stack.destination_bucket, Key=key)["Body"]
        with path.open("wb") as file:
            for chunk in body.iter_chunks(MiB):
                file.write(chunk)
        assert path.stat().st_size == uploaded.size
        crcs = tuple(
            source.crc32 if source.crc32 is not None else spec.crc32(index)
            for index, (spec, source) in enumerate(zip(specs, sources, strict=True))
        )
        return Built(path=path, specs=tuple(specs), crcs=crcs)

    yield _build
    for key, path in made:
        s3.delete_object(Bucket=stack.destination_bucket, Key=key)
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """What the local header and the central directory record of one entry say."""

    name: str
    offset: int  # of the local header
    data_offset: int  # of the entry's (compressed) bytes, after the local header
    compress_type: int
    compress_size: int
    file_size: int
    flag_bits: int
    zip64_local: bool  # the local header carries a zip64 extra field
    zip64_central: bool
    version_local: int
    version_central: int
    local_crc: int
    local_sizes: tuple[int, int]  # compressed, uncompressed, as the local header's 32-bit fields say

    @property
    def zip64(self) -> bool:
        assert self.zip64_local == self.zip64_central, f"{self.name}: local and central zip64 disagree"
        return self.zip64_local

    @property
    def end(self) -> int:
        """Where the entry's bytes end (its data descriptor, if any, follows)."""
        return self.data_offset + self.compress_size


def extra_field_ids(extra: bytes) -> list[int]:
    ids, position = [], 0
    while position + 4 <= len(extra):
        field_id, length = struct.unpack_from("<HH", extra, position)
        ids.append(field_id)
        position += 4 + length
    assert position == len(extra), f"malformed extra field {extra.hex()}"
    return ids


def layout(path: Path) -> list[Layout]:
    found = []
    with zipfile.ZipFile(path) as archive, path.open("rb") as raw:
        for info in archive.infolist():
            raw.seek(info.header_offset)
            header = LOCAL_HEADER.unpack(raw.read(LOCAL_HEADER.size))
            signature, version, _flags, _method, _time, _date, crc, csize, usize, name_len, extra_len = header
            assert signature == b"PK\x03\x04", f"{info.filename}: no local header at {info.header_offset}"
            assert raw.read(name_len) == info.orig_filename.encode("utf-8")
            local_extra = raw.read(extra_len)
            found.append(
                Layout(
                    name=info.filename,
                    offset=info.header_offset,
                    data_offset=raw.tell(),
                    compress_type=info.compress_type,
                    compress_size=info.compress_size,
                    file_size=info.file_size,
                    flag_bits=info.flag_bits,
                    zip64_local=ZIP64_EXTRA_ID in extra_field_ids(local_extra),
                    zip64_central=ZIP64_EXTRA_ID in extra_field_ids(info.extra),
                    version_local=version,
                    version_central=info.extract_version,
                    local_crc=crc,
                    local_sizes=(csize, usize),
                )
            )
    return found


def assert_zip32(entry: Layout) -> None:
    assert not entry.zip64, f"{entry.name} at {entry.offset} is zip64 but needs not be"
    assert (entry.version_local, entry.version_central) == (20, 20), entry


def assert_zip64(entry: Layout) -> None:
    assert entry.zip64, f"{entry.name} at {entry.offset} needs zip64 but is not"
    assert (entry.version_local, entry.version_central) == (45, 45), entry
    assert entry.local_sizes == (0xFFFFFFFF, 0xFFFFFFFF), entry


@dataclass(frozen=True)
class EndRecords:
    zip64: bool
    entries: int  # from the zip64 record when there is one
    zip32_entries: int
    central_directory_offset: int


def end_records(path: Path) -> EndRecords:
    size = path.stat().st_size
    with path.open("rb") as raw:
        raw.seek(size - END_OF_CENTRAL_DIRECTORY.size)
        signature, _, _, _, total, _, offset, comment = END_OF_CENTRAL_DIRECTORY.unpack(
            raw.read(END_OF_CENTRAL_DIRECTORY.size)
        )
        assert (signature, comment) == (b"PK\x05\x06", 0)
        raw.seek(size - END_OF_CENTRAL_DIRECTORY.size - ZIP64_LOCATOR.size)
        locator = ZIP64_LOCATOR.unpack(raw.read(ZIP64_LOCATOR.size))
        if locator[0] != b"PK\x06\x07":
            return EndRecords(
                zip64=False, entries=total, zip32_entries=total, central_directory_offset=offset
            )
        raw.seek(locator[2])
        record = ZIP64_END_OF_CENTRAL_DIRECTORY.unpack(raw.read(ZIP64_END_OF_CENTRAL_DIRECTORY.size))
        assert record[0] == b"PK\x06\x06"
        return EndRecords(
            zip64=True, entries=record[7], zip32_entries=total, central_directory_offset=record[9]
        )


# ------------------------------------------------------------------------------------------------ readers


def check_with_zipfile(built: Built, spot_checks: Sequence[int]) -> None:
    """Names in order, sizes and CRCs from the central directory, every entry read through (testzip checks
    each CRC), and the bytes of the entries in `spot_checks` compared whole."""
    with zipfile.ZipFile(built.path) as archive:
        infos = archive.infolist()
        assert [info.filename for info in infos] == built.names
        for info, spec, crc in zip(infos, built.specs, built.crcs, strict=True):
            assert (info.file_size, info.CRC) == (spec.length, crc), info.filename
            assert info.flag_bits & 0x800, f"{info.filename}: UTF-8 flag not set"
        assert archive.testzip() is None
        for index in spot_checks:
            spec = built.specs[index]
            with archive.open(infos[index]) as member:
                for expected in spec.chunks(index):
                    assert member.read(len(expected)) == expected, spec.path
                assert member.read(1) == b"", spec.path


@dataclass
class Reader:
    name: str
    process: subprocess.Popen[bytes]
    output: Path
    accepts: Callable[[str], bool]

    def failure(self) -> str | None:
        try:
            code = self.process.wait(timeout=READER_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return f"{self.name}: still running after {READER_TIMEOUT} s"
        text = self.output.read_text("utf-8", errors="replace")
        if code == 0 and self.accepts(text):
            return None
        return f"{self.name} exited {code}:\n{text[-3000:]}"


def start_reader(
    name: str, command: list[str], output: Path, accepts: Callable[[str], bool], env: dict[str, str]
) -> Reader:
    with output.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    return Reader(name, process, output, accepts)


def check_with_every_reader(built: Built, *, spot_checks: Sequence[int] = ()) -> None:
    """zipfile, `unzip -t`, `7z t`, `bsdtar -tf` and Java's ZipInputStream and ZipFile all accept the
    archive with the expected entries. The external readers run side by side while zipfile reads; every
    rejection is reported, not only the first."""
    path, count = built.path, len(built.specs)
    work = path.parent
    java = shutil.which("java")
    assert java, "java is missing: `make tools` installs a headless JRE (scripts/ensure-tools.sh)"
    c_utf8 = {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    listing = work / "bsdtar.out"
    readers = [
        start_reader(
            "unzip -t",
            [shutil.which("unzip") or "unzip", "-t", str(path)],
            work / "unzip.out",
            lambda out: "No errors detected" in out,
            c_utf8,
        ),
        start_reader(
            "7z t",
            [seven_zip(), "t", str(path)],
            work / "7z.out",
            lambda out: "Everything is Ok" in out and (count == 1 or f"Files: {count}" in out),
            c_utf8,
        ),
        start_reader(
            "bsdtar -tf",
            [shutil.which("bsdtar") or "bsdtar", "-tf", str(path)],
            listing,
            lambda out: sorted(out.splitlines()) == sorted(built.names),
            c_utf8,
        ),
    ]
    readers.append(
        start_reader(
            "java ZipCheck (ZipInputStream, ZipFile)",
            [java, str(JAVA_CHECK), str(path), str(count)],
            work / "java.out",
            lambda out: f"ok: {count} entries" in out,
            {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        )
    )
    failures = []
    try:
        check_with_zipfile(built, spot_checks)
    except AssertionError as error:
        failures.append(f"zipfile: {error}")
    failures += [failure for reader in readers if (failure := reader.failure()) is not None]
    assert not failures, "\n\n".join(failures)


# -------------------------------------------------------------------------------------------------- tests


def test_small_archive_has_no_zip64_and_passes_every_reader_and_java(build: Callable[..., Built]) -> None:
    """A small archive mixing STORED-with-CRC, deflate level 0 and isal deflate has no zip64 anywhere."""
    text = b"".join(b"line %d of the notes, compressible text\n" % n for n in range(5000))
    built = build(
        [
            Synthetic("photos/cat.jpg", "image/jpeg", size=MiB + 123, known_crc=True),
            Synthetic("videos/clip.mp4", "video/mp4", size=2 * MiB + 45),
            Synthetic("notes/readme.txt", "text/plain", text=text),
        ]
    )
    stored, level0, text_entry = entries = layout(built.path)
    for entry in entries:
        assert_zip32(entry)
    assert stored.compress_type == zipfile.ZIP_STORED and not stored.flag_bits & DATA_DESCRIPTOR_FLAG
    assert stored.local_crc == built.crcs[0] and stored.local_sizes == (MiB + 123, MiB + 123)
    assert level0.compress_type == zipfile.ZIP_DEFLATED and level0.flag_bits & DATA_DESCRIPTOR_FLAG
    assert level0.file_size <= level0.compress_size < level0.file_size * 1.001  # stored blocks
    assert text_entry.compress_type == zipfile.ZIP_DEFLATED and text_entry.compress_size < len(text) / 4
    data = built.path.read_bytes()  # small: read whole to search it
    assert b"PK\x06\x06" not in data and b"PK\x06\x07" not in data
    assert end_records(built.path) == EndRecords(
        zip64=False, entries=3, zip32_entries=3, central_directory_offset=text_entry.end + 16
    )
    check_with_every_reader(built, spot_checks=range(3))


@pytest.mark.slow
@pytest.mark.timeout(BIG_ARCHIVE_TIMEOUT)
def test_archive_past_4_gib_uses_zip64_only_for_entries_starting_past_it(
    build: Callable[..., Built],
) -> None:
    """Two ~2 GiB deflate-0 entries and a text entry: only the entry starting past 4 GiB is zip64 (STORED
    from memory, no data descriptor), the one crossing 4 GiB stays zip32; the end records are zip64."""
    size = 2100 * MiB
    built = build(
        [
            Synthetic("media/first.jpg", "image/jpeg", size=size),
            Synthetic("media/second.jpg", "image/jpeg", size=size),
            Synthetic("notes/after.txt", "text/plain", text=b"written past the first 4 GiB\n" * 100),
        ]
    )
    first, second, third = layout(built.path)
    assert first.offset == 0 and first.end < FOUR_GIB
    assert second.offset < FOUR_GIB < second.end
    assert third.offset > FOUR_GIB
    assert_zip32(first)
    assert_zip32(second)
    assert_zip64(third)
    assert third.compress_type == zipfile.ZIP_STORED
    records = end_records(built.path)
    assert records.zip64 and records.entries == 3 and records.central_directory_offset > FOUR_GIB
    check_with_every_reader(built, spot_checks=[2])


@pytest.mark.slow
@pytest.mark.timeout(BIG_ARCHIVE_TIMEOUT)
def test_single_stored_entry_over_4_gib_with_known_crc(build: Callable[..., Built]) -> None:
    """A 4 GiB + 64 MiB STORED entry carries its sizes in a zip64 local header, with no data descriptor."""
    size = FOUR_GIB + 64 * MiB
    built = build([Synthetic("video/huge.mp4", "video/mp4", size=size, known_crc=True)])
    (entry,) = layout(built.path)
    assert_zip64(entry)
    assert entry.compress_type == zipfile.ZIP_STORED and not entry.flag_bits & DATA_DESCRIPTOR_FLAG
    assert entry.local_crc == built.crcs[0] and entry.file_size == entry.compress_size == size
    with built.path.open("rb") as raw:  # the local zip64 extra field holds both sizes
        raw.seek(LOCAL_HEADER.size + len(entry.name))
        assert raw.read(20) == struct.pack("<HHQQ", ZIP64_EXTRA_ID, 16, size, size)
    assert end_records(built.path).zip64
    check_with_every_reader(built)


@pytest.mark.slow
def test_more_than_65535_entries(build: Callable[..., Built]) -> None:
    """70,000 tiny deflated entries: the first 65,535 are zip32, the end records count all 70,000."""
    count = 70_000
    built = build(
        [
            Synthetic(f"batch-{i // 1000:02d}/note-{i:05d}.txt", "text/plain", text=b"note %d\n" % i)
            for i in range(count)
        ]
    )
    entries = layout(built.path)
    assert len(entries) == count and entries[-1].end < FOUR_GIB
    for entry in entries[:ZIP32_MAX_ENTRIES]:
        assert_zip32(entry)
    assert all(entry.compress_type == zipfile.ZIP_DEFLATED for entry in entries)
    records = end_records(built.path)
    assert records.zip64 and records.entries == count and records.zip32_entries == 0xFFFF
    check_with_every_reader(built, spot_checks=[0, 1, 65_534, 65_535, 65_536, count - 1])
