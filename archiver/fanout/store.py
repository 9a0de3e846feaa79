"""Where a fanned-out request's plan and records live: JSON documents (and a segment's head and tail
bytes) under `<prefix>/<request_id>/fanout/` in the destination bucket, next to status.json.

    plan.json              the plan, written last: a plan that exists is whole
    entries-NNNNN.json     a segment's entries, as rows (entry_row)
    segment-NNNNN.claim    a worker's claim on building it (archiver.fanout.claims)
    segment-NNNNN.json     its record once built (parts, length, central directory), or its failure
    segment-NNNNN.head     its first part's bytes, and .tail a short last part after a copy
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from archiver import checksums
from archiver.aws import retry_transient
from archiver.fanout.layout import Segment
from archiver.models import SourceRef, utc_timestamp
from archiver.sources import SourceObject
from archiver.status import put_document, read_document
from archiver.zipping import ZipEntry

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

PLAN_VERSION = 1
PLAN_NAME = "plan.json"


def record_name(index: int) -> str:
    return f"segment-{index:05d}.json"


def claim_name(index: int) -> str:
    return f"segment-{index:05d}.claim"


def head_name(index: int) -> str:
    return f"segment-{index:05d}.head"


def tail_name(index: int) -> str:
    return f"segment-{index:05d}.tail"


def entries_name(index: int) -> str:
    return f"entries-{index:05d}.json"


@dataclass(frozen=True)
class Store:
    """Where a fanned-out request's plan and records are: `<prefix>/<request_id>/fanout/`."""

    s3: S3Client
    bucket: str
    directory: str  # `<prefix>/<request_id>`

    @property
    def root(self) -> str:
        return f"{self.directory}/fanout"

    def key(self, name: str) -> str:
        return f"{self.root}/{name}"

    def read(self, name: str) -> dict[str, Any] | None:
        return self.read_versioned(name)[0]

    def read_versioned(self, name: str) -> tuple[dict[str, Any] | None, str | None]:
        """The JSON document (None if absent or unreadable) and the object's ETag (None if absent)."""
        return read_document(self.s3, self.bucket, self.key(name))

    def read_bytes(self, name: str) -> bytes:
        return get_bytes(self.s3, self.bucket, self.key(name))

    def write(self, name: str, document: dict[str, Any], **condition: str) -> str:
        return put_document(self.s3, self.bucket, self.key(name), json.dumps(document).encode(), condition)

    def names(self, start: str = "") -> dict[str, datetime]:
        """The names under the fanout/ directory that begin with `start`, and when each was last written:
        one LIST per 1,000."""
        found: dict[str, datetime] = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.root}/{start}"
        ):
            found.update(
                (item["Key"][len(self.root) + 1 :], item["LastModified"]) for item in page.get("Contents", [])
            )
        return found

    def delete(self, name: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self.key(name))

    def clear(self) -> None:
        """Delete the plan and everything beside it (best effort: a lifecycle rule is the safety net)."""
        keys = [self.key(name) for name in self.names()]
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            self.s3.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
            )


@retry_transient
def get_bytes(s3: S3Client, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def entry_row(entry: ZipEntry, copy: bool) -> list[Any]:
    """One entry of a segment as the plan stores it, with whether S3 may copy it."""
    obj = entry.source
    return [
        obj.ref.source,
        obj.ref.bucket,
        obj.ref.key,
        entry.path,
        obj.size,
        obj.etag,
        utc_timestamp(obj.last_modified),
        obj.content_type,
        obj.crc32,
        copy,
    ]


def entry_of_row(row: list[Any]) -> tuple[ZipEntry, bool]:
    source, bucket, key, path, size, etag, modified, content_type, crc32, copy = row
    obj = SourceObject(
        ref=SourceRef(source=source, bucket=bucket, key=key),
        size=int(size),
        etag=str(etag),
        last_modified=datetime.strptime(modified, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC),
        content_type=str(content_type),
        crc32=None if crc32 is None else int(crc32),
    )
    return ZipEntry(path=str(path), source=obj), bool(copy)


@dataclass(frozen=True)
class StoredPlan:
    document: dict[str, Any]
    resumed: bool = True  # read back, not just written

    @property
    def upload_id(self) -> str:
        return str(self.document["upload_id"])

    @property
    def segments(self) -> list[Segment]:
        return [Segment(**row) for row in self.document["segments"]]

    @property
    def algorithm(self) -> checksums.Algorithm:
        """The archive's checksum algorithm (ARCHIVE_CHECKSUM when planned; CRC-32 in older plans)."""
        return checksums.ALGORITHMS[self.document.get("checksum", "CRC32")]

    @property
    def aborted(self) -> bool:
        return bool(self.document.get("aborted"))

    def is_own(self, record: dict[str, Any] | None) -> bool:
        """Whether a segment record belongs to this plan's upload (not to an earlier, aborted one)."""
        return record is not None and record.get("upload_id") == self.upload_id


def read_plan(store: Store, digest: str | None = None) -> StoredPlan | None:
    """The stored plan (of the request with this digest, when given), if there is one."""
    document = store.read(PLAN_NAME)
    if document is None or document.get("version") != PLAN_VERSION:
        return None
    if digest is not None and document.get("digest") != digest:
        return None
    return StoredPlan(document)
