"""The notifications archiver sends to the destination queue (contract §4): one model per status, and
`Notification`, the union a consumer validates against (`archiver schema`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator

from archiver.errors import MAX_ERROR_MESSAGE, ErrorCode, clip


class ArchiveChecksum(BaseModel):
    """The archive's FULL_OBJECT checksum (ARCHIVE_CHECKSUM) over its bytes, in the form S3 writes one.
    A single worker's is the object's S3 checksum, which S3 verified against the bytes it got when the
    upload completed (HeadObject with ChecksumMode=ENABLED gives the same value and type); a fanned-out
    archive's is joined from its segments' by the workers that built them, and S3 has none."""

    algorithm: Literal["CRC32", "CRC64NVME"]
    type: Literal["FULL_OBJECT"] = "FULL_OBJECT"
    value: str = Field(description="base64 of the checksum's big-endian bytes (4 for CRC32, 8 for CRC64NVME)")
    s3_verified: bool = Field(
        default=True,
        description=(
            "true: S3 verified this checksum at completion and stores it as the object's; false: a fanned-out"
            " archive's, computed by the workers that built it (S3 stores no checksum for it)"
        ),
    )


class ArchiveInfo(BaseModel):
    bucket: str
    key: str
    url: str
    size: int
    entries: int
    crc32: str | None = Field(
        default=None,
        description=(
            "the CRC-32 (zlib's, IEEE 802.3) of the archive's bytes, base64 of its 4 big-endian bytes as S3"
            " writes a FULL_OBJECT CRC32 checksum; computed from the stream, not by reading the archive"
        ),
    )
    checksum: ArchiveChecksum | None = Field(
        default=None,
        description=(
            "the archive's FULL_OBJECT checksum in the algorithm ARCHIVE_CHECKSUM names, verified by S3 at"
            " completion unless s3_verified is false (a fanned-out archive's); null when it is not known"
        ),
    )


class ManifestInfo(BaseModel):
    """Where the archive's manifest is (archiver.manifest): every entry's name, source, size and CRC-32."""

    bucket: str
    key: str
    url: str
    entries: int


class SkippedSource(BaseModel):
    source: str
    reason: Literal["not_found"]


class RenamedEntry(BaseModel):
    source: str
    name: str


class ErrorInfo(BaseModel):
    code: ErrorCode
    message: str = Field(max_length=MAX_ERROR_MESSAGE)
    retryable: bool

    @field_validator("message", mode="before")
    @classmethod
    def _clipped(cls, value: Any) -> Any:
        return clip(value) if isinstance(value, str) else value


class CompletedNotification(BaseModel):
    """Sent to the destination queue when the archive is complete."""

    status: Literal["completed"] = "completed"
    request_id: str
    archive: ArchiveInfo
    skipped: list[SkippedSource] = Field(default_factory=list)
    renamed: list[RenamedEntry] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: str
    manifest: ManifestInfo | None = Field(default=None, description="the archive's manifest.json")
    truncated: bool = Field(
        default=False,
        description=(
            "true when `skipped`/`renamed` were cut to fit an SQS message (status.json has them all), or"
            " the metadata left out because SQS refused the full notification"
        ),
    )


class FailedNotification(BaseModel):
    """Sent when a request can never succeed, or on its last delivery before the DLQ."""

    status: Literal["failed"] = "failed"
    request_id: str
    error: ErrorInfo
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: str
    truncated: bool = Field(
        default=False,
        description="true when the metadata was left out because SQS refused the full notification",
    )


class CancelledNotification(BaseModel):
    """Sent when a cancel decided the request's end (contract §4): no archive exists for it."""

    status: Literal["cancelled"] = "cancelled"
    request_id: str
    cancelled_at: str = Field(description="when the cancel was decided (decision.json)")
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: str
    truncated: bool = Field(
        default=False,
        description="true when the metadata was left out because SQS refused the full notification",
    )


Notification = Annotated[
    CompletedNotification | FailedNotification | CancelledNotification, Field(discriminator="status")
]
