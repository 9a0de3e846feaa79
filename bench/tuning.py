"""The knobs every method shares, set in one place so the raw copy uses archiver's part size and
concurrency: a faster baseline that merely used bigger parts or more threads would say nothing."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

MiB = 1024 * 1024


def _archiver_default(name: str) -> Any:
    # Read from the settings model rather than copied here, so the bench follows archiver's defaults
    # when they change. A field that no longer exists gives None and is simply not passed on.
    from archiver.settings import Settings

    field = Settings.model_fields.get(name)
    return None if field is None else field.default


def server_side_copy_min_bytes() -> int | None:
    """archiver's default SERVER_SIDE_COPY_MIN_BYTES (None: a version without server-side assembly)."""
    value = _archiver_default("server_side_copy_min_bytes")
    return None if value is None else int(value)


@dataclass(frozen=True)
class Tuning:
    part_size: int
    upload_concurrency: int
    prefetch_bytes: int | None

    @classmethod
    def archiver_defaults(
        cls,
        *,
        part_size: int | None = None,
        upload_concurrency: int | None = None,
        prefetch_bytes: int | None = None,
    ) -> Tuning:
        """archiver's defaults, with any explicit override from the command line."""
        return cls(
            part_size=part_size or int(_archiver_default("part_size")),
            upload_concurrency=upload_concurrency or int(_archiver_default("upload_concurrency")),
            prefetch_bytes=prefetch_bytes
            if prefetch_bytes is not None
            else _archiver_default("prefetch_bytes"),
        )

    def worker_env(self) -> dict[str, str]:
        """The worker's environment variables for these knobs (pydantic-settings reads them upper-case)."""
        env = {"PART_SIZE": str(self.part_size), "UPLOAD_CONCURRENCY": str(self.upload_concurrency)}
        if self.prefetch_bytes is not None:
            env["PREFETCH_BYTES"] = str(self.prefetch_bytes)
        return env

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        prefetch = "unset" if self.prefetch_bytes is None else f"{self.prefetch_bytes / MiB:g} MiB"
        return (
            f"PART_SIZE {self.part_size / MiB:g} MiB, UPLOAD_CONCURRENCY {self.upload_concurrency}, "
            f"PREFETCH_BYTES {prefetch}"
        )
