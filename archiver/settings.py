"""Typed settings from the environment, validated once at start-up (contract §6)."""

from __future__ import annotations

import importlib.util
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from archiver.errors import SettingsError

MiB = 1024 * 1024
# S3's own limits on multipart uploads.
MIN_PART_SIZE = 5 * MiB
MAX_PART_SIZE = 5 * 1024 * MiB
MAX_PARTS = 10_000
# The smallest object worth copying server-side: its first 5 MiB stream, the copy must be >= 5 MiB too.
MIN_COPIED_OBJECT = 16 * MiB
# SQS caps a message's total invisibility at 12 hours from its first receipt.
SQS_MAX_RETENTION = 14 * 24 * 3600  # seconds: SQS's longest MessageRetentionPeriod
SQS_MAX_VISIBILITY = 43_200
# SigV4 presigned URLs live at most 7 days.
MAX_PRESIGN_SECONDS = 604_800


class Settings(BaseSettings):
    """Every setting of the worker; field `x_y` is read from the environment variable `X_Y`."""

    # An empty variable (`EXPECTED_BUCKET_OWNER=` in an env file) means "unset", as operators expect.
    model_config = SettingsConfigDict(
        case_sensitive=False, extra="forbid", frozen=True, env_ignore_empty=True
    )

    # From the original service, same names and defaults.
    archive_base_url: str | None = None
    sqs_destination_queue: str = Field(min_length=1)
    sqs_source_queue: str = Field(min_length=1)
    s3_destination_bucket: str = Field(min_length=3, max_length=63)
    s3_source_bucket: str = Field(min_length=3, max_length=63)
    s3_file_prefix: str = "download"
    app_debug: bool = False
    dev_mode: bool = False

    # Added by archiver.
    allowed_source_buckets: Annotated[tuple[str, ...], NoDecode] = ()
    expected_bucket_owner: str | None = Field(default=None, pattern=r"^\d{12}$")
    # Where presigned links are signed for, when the browser reaches S3 by another name than the worker
    # (compose: the worker calls http://localstack:4566, the host opens http://localhost:4566).
    archive_link_endpoint: str | None = None
    archive_url_expires: int = Field(default=MAX_PRESIGN_SECONDS, ge=1, le=MAX_PRESIGN_SECONDS)
    max_files: int = Field(default=50_000, ge=1)
    max_archive_bytes: int = Field(default=100 * 1024 * 1024 * 1024, ge=1)
    # 8 MiB, not the 16 MiB first suggested: measured the same throughput, and it keeps a worker with
    # 4 uploads in flight under 150 MiB (docs/performance.md).
    part_size: int = Field(default=8 * MiB, ge=MIN_PART_SIZE, le=MAX_PART_SIZE)
    # 12 MiB: with 32-64 GETs in flight the window stays full (at 32 MiB, 400 x 3 MiB peaked at 161 MiB of
    # RSS; at 16 MiB, 2,000 x 100 KiB at 145-151 MiB; at 12 MiB 138-144 MiB), and 12 MiB still holds 120
    # objects of 100 KiB or 4 of 3 MiB, enough to hide S3's latency (docs/performance.md).
    prefetch_bytes: int = Field(default=12 * MiB, ge=0)
    upload_concurrency: int = Field(default=4, ge=1, le=64)
    # Uncompressed entries at least this big are copied inside S3 (UploadPartCopy) instead of streamed;
    # 0 turns server-side assembly off. Each still streams its first 5 MiB (docs/assembly.md).
    server_side_copy_min_bytes: int = Field(default=64 * MiB, ge=0)
    # The archive's FULL_OBJECT checksum, which S3 verifies at completion (docs/settings.md): CRC-32, the
    # checksum copied parts share with ZIP entries, or CRC64NVME, S3's default for new objects.
    archive_checksum: Literal["CRC32", "CRC64NVME"] = "CRC32"
    # Fan-out (docs/fanout.md): a request whose sources add up to more than twice this many bytes is cut
    # into segments of about this many source bytes, built by any worker on the source queue. 0 = off.
    fanout_segment_bytes: int = Field(default=0, ge=0)
    visibility_timeout: int = Field(default=120, ge=10, le=SQS_MAX_VISIBILITY)
    job_timeout: int = Field(default=21_600, ge=1, lt=SQS_MAX_VISIBILITY)
    shutdown_grace: int = Field(default=25, ge=0)
    # How long a cancel cancels a request that has not arrived yet (archiver.decision): by default as long
    # as SQS can keep a message, so no copy of the request still in a queue escapes it.
    cancel_retention: int = Field(default=SQS_MAX_RETENTION, ge=1)
    # Where notifications go besides the destination queue (archiver.publish): an SNS topic, an
    # EventBridge bus (name or ARN) with the events' `source`.
    notify_sns_topic_arn: str | None = Field(
        default=None,
        pattern=r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:[0-9]{12}:[A-Za-z0-9_-]+(\.fifo)?$",
        max_length=512,
    )
    notify_event_bus: str | None = Field(default=None, min_length=1, max_length=1600)
    notify_event_source: str = Field(default="archiver", pattern=r"^[A-Za-z0-9_.-]+$", max_length=256)
    health_file: str = "/tmp/archiver.heartbeat"  # noqa: S108 - a heartbeat, not a secret

    @field_validator("notify_event_source")
    @classmethod
    def _not_aws(cls, value: str) -> str:
        if value.startswith("aws."):
            raise ValueError("must not begin with 'aws.', which EventBridge keeps for AWS's own events")
        return value

    @field_validator("server_side_copy_min_bytes")
    @classmethod
    def _check_copy_min(cls, value: int) -> int:
        if 0 < value < MIN_COPIED_OBJECT:
            raise ValueError(f"must be 0 (off) or at least {MIN_COPIED_OBJECT} (16 MiB)")
        return value

    @field_validator("archive_checksum")
    @classmethod
    def _check_checksum_library(cls, value: str) -> str:
        if value == "CRC64NVME" and importlib.util.find_spec("awscrt") is None:
            raise ValueError("CRC64NVME needs awscrt: pip install 'archiver[crc64nvme]'")
        return value

    @field_validator("fanout_segment_bytes")
    @classmethod
    def _check_segment_bytes(cls, value: int) -> int:
        if 0 < value < MIN_PART_SIZE:
            raise ValueError(f"must be 0 (off) or at least {MIN_PART_SIZE} (5 MiB)")
        return value

    @field_validator("allowed_source_buckets", mode="before")
    @classmethod
    def _split_buckets(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("archive_base_url", "archive_link_endpoint")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("https://", "http://")):
            raise ValueError("must start with https:// or http://")
        return value.rstrip("/")

    @field_validator("s3_file_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        prefix = value.strip("/")
        if ".." in prefix.split("/") or "\\" in prefix:
            raise ValueError("must be a plain key prefix without '..' or backslashes")
        return prefix

    @property
    def source_buckets(self) -> frozenset[str]:
        """Buckets a request may read from: the allow-list plus the default source bucket, always."""
        return frozenset((*self.allowed_source_buckets, self.s3_source_bucket))


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment, raising `SettingsError` with one line naming each bad one."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(describe_settings_error(exc)) from None


def describe_settings_error(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        name = str(error["loc"][0]).upper() if error["loc"] else "settings"
        reason = "is required" if error["type"] == "missing" else error["msg"]
        problems.append(f"{name} {reason}")
    return "invalid setting: " + "; ".join(problems)
