"""The manifest next to an archive (`<prefix>/<request_id>/manifest.json`): every entry's name in the
archive, its source (bucket, key, ETag), size and CRC-32, in archive order, so a consumer can check one
entry, or find where it came from, without opening the zip. Written once the archive is complete and
before its status says so; the completed notification links it (contract §4, notification)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from archiver import checksums, crc
from archiver.aws import retry_transient

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from archiver.sources import SourceObject

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True, slots=True)
class Row:
    """One archived entry, as the manifest lists it."""

    name: str  # its path in the archive
    bucket: str
    key: str
    etag: str  # of the source object read, which every read of it had to match
    size: int  # uncompressed
    crc32: int

    def document(self) -> list[Any]:
        return [self.name, self.bucket, self.key, self.etag, self.size, self.crc32]

    @classmethod
    def from_document(cls, row: list[Any]) -> Row:
        name, bucket, key, etag, size, crc32 = row
        return cls(str(name), str(bucket), str(key), str(etag), int(size), int(crc32))


@dataclass
class Rows:
    """The rows of a zip stream's entries, by position, as their bytes pass: each entry's CRC-32 is that
    of its bytes; one copied inside S3 has S3's, which a copy requires."""

    found: dict[int, Row] = field(default_factory=dict)

    def over(self, position: int, name: str, obj: SourceObject, chunks: Iterator[bytes]) -> Iterator[bytes]:
        running = checksums.Running(checksums.CRC32)
        yield from running.over(chunks)
        self.found[position] = _row(name, obj, running.value)

    def copied(self, position: int, name: str, obj: SourceObject) -> None:
        if obj.crc32 is not None:
            self.found[position] = _row(name, obj, obj.crc32)

    def listed(self, count: int) -> list[Row] | None:
        """The first `count` entries' rows in order; None if one is not known."""
        rows = [self.found.get(position) for position in range(count)]
        return None if None in rows else rows  # type: ignore[return-value]


def _row(name: str, obj: SourceObject, crc32: int) -> Row:
    return Row(name=name, bucket=obj.ref.bucket, key=obj.ref.key, etag=obj.etag, size=obj.size, crc32=crc32)


def manifest_key(archive_key: str) -> str:
    return f"{archive_key.rsplit('/', 1)[0]}/{MANIFEST_NAME}" if "/" in archive_key else MANIFEST_NAME


def document(request_id: str, *, bucket: str, key: str, size: int, rows: Sequence[Row]) -> bytes:
    """The manifest as JSON, one entry a line, so that 50,000 of them stay readable with line tools."""
    head = json.dumps({"request_id": request_id, "archive": {"bucket": bucket, "key": key, "size": size}})
    lines = [
        json.dumps(
            {
                "name": row.name,
                "bucket": row.bucket,
                "key": row.key,
                "etag": row.etag,
                "size": row.size,
                "crc32": crc.to_base64(row.crc32),
            },
            ensure_ascii=False,
        )
        for row in rows
    ]
    return (head[:-1] + ', "entries": [\n' + ",\n".join(lines) + "\n]}\n").encode()


@retry_transient
def write(s3: S3Client, *, bucket: str, key: str, body: bytes) -> None:
    s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json")
