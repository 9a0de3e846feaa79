"""Is the archive right? Downloaded whole (to disk, not memory) and read back with `zipfile`."""

from __future__ import annotations

import hashlib
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from boto3.s3.transfer import TransferConfig

from archiver import checksums
from bench.scenarios import Source

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

# Reading every entry back to check its CRC costs ~1 s per GiB plus the download; it is done for
# archives up to this size (every scenario's, the 4 GiB one whose data S3 assembles by copying included),
# and the CRCs recorded in the central directory are compared with the sources' for all of them.
FULL_CHECK_MAX_BYTES = 4200 * 1024 * 1024

_METHOD_NAMES = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}


@dataclass
class ArchiveCheck:
    size: int
    problems: list[str] = field(default_factory=list)
    methods: dict[str, int] = field(default_factory=dict)
    compressed_ratio: float | None = None
    data_checked: bool = False
    sha256: str | None = None  # of the whole object, when asked for (the fan-out scenario compares them)

    def as_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "problems": self.problems[:20],
            "methods": self.methods,
            "compressed_ratio": self.compressed_ratio,
            "crc_data_checked": self.data_checked,
            "sha256": self.sha256,
        }


def check_archive(
    s3: S3Client, *, notified: dict[str, Any], sources: list[Source], workdir: Path, digest: bool = False
) -> ArchiveCheck:
    """The archive a notification names (`notified`: its `archive`): entry count, names, sizes and
    CRC-32s against the sources, every byte too when it is small enough; the notification's size, entry
    count, `crc32` and `checksum` against the object's; and with `digest`, the SHA-256 of the whole object,
    to tell whether two runs made the same bytes."""
    path = workdir / "archive-under-test.zip"
    s3.download_file(notified["bucket"], notified["key"], str(path), Config=TransferConfig(max_concurrency=8))
    try:
        check = _check_file(path, sources)
        _check_notified(check, path, notified, len(sources), digest=digest)
        return check
    finally:
        path.unlink(missing_ok=True)


def _check_notified(
    check: ArchiveCheck, path: Path, notified: dict[str, Any], entries: int, *, digest: bool
) -> None:
    """What the notification says of the archive against its bytes, read once (the proof a consumer
    checks a download with: contract §4, notification)."""
    if notified["size"] != check.size:
        check.problems.append(f"notified size {notified['size']}, object has {check.size}")
    if notified["entries"] != entries:
        check.problems.append(f"notified {notified['entries']} entries, expected {entries}")
    checksum = notified.get("checksum") or {}
    algorithm = checksums.ALGORITHMS[checksum.get("algorithm", "CRC32")]
    hasher, crc32, other = hashlib.sha256(), 0, 0
    with path.open("rb") as archive:
        while chunk := archive.read(1024 * 1024):
            crc32 = zlib.crc32(chunk, crc32)
            if algorithm is not checksums.CRC32:
                other = algorithm.of(chunk, other)
            if digest:
                hasher.update(chunk)
    check.sha256 = hasher.hexdigest() if digest else None
    if notified.get("crc32") != checksums.CRC32.encode(crc32):
        check.problems.append(
            f"notified crc32 {notified.get('crc32')}, the bytes' is {checksums.CRC32.encode(crc32)}"
        )
    actual = algorithm.encode(crc32 if algorithm is checksums.CRC32 else other)
    if checksum and checksum.get("value") != actual:
        check.problems.append(f"notified checksum {checksum}, the bytes' {algorithm.name} is {actual}")


def _check_file(path: Path, sources: list[Source]) -> ArchiveCheck:
    check = ArchiveCheck(size=path.stat().st_size)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        check.problems.append(f"not a readable zip: {exc}")
        return check
    with archive:
        infos = archive.infolist()
        if len(infos) != len(sources):
            check.problems.append(f"{len(infos)} entries, expected {len(sources)}")
        for info, source in zip(infos, sources, strict=False):
            if info.filename != source.entry_name:
                check.problems.append(f"entry {info.filename!r} where {source.entry_name!r} was expected")
            if info.file_size != source.size:
                check.problems.append(f"{info.filename}: {info.file_size} bytes, source has {source.size}")
            if source.crc32 != info.CRC:
                check.problems.append(f"{info.filename}: CRC {info.CRC:08x}, source has {source.crc32:08x}")
        check.methods = dict(
            Counter(_METHOD_NAMES.get(info.compress_type, str(info.compress_type)) for info in infos)
        )
        uncompressed = sum(info.file_size for info in infos)
        if uncompressed:
            check.compressed_ratio = round(sum(info.compress_size for info in infos) / uncompressed, 3)
        if check.size <= FULL_CHECK_MAX_BYTES:
            check.data_checked = True
            bad = archive.testzip()  # reads every entry; zipfile checks each one's CRC as it goes
            if bad is not None:
                check.problems.append(f"{bad}: its bytes do not match its CRC")
    return check
