"""Synthetic source objects for tests that need gigabytes without storing them: a known block of
pseudo-random bytes cycled to any size, and the SourceObject a HEAD of it would give."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from isal import isal_zlib

from archiver.models import SourceRef
from archiver.settings import MiB
from archiver.sources import SourceObject
from archiver.zipping import CHUNK_SIZE

MODIFIED = datetime(2024, 5, 6, 7, 8, 10, tzinfo=UTC)
# One pseudo-random (incompressible) block, cut into stream-zip sized chunks once: synthetic sources cycle
# through these, starting at a chunk that depends on the entry's index so entries differ from each other.
BLOCK = random.Random(20240506).randbytes(MiB)
BLOCK_CHUNKS = tuple(BLOCK[start : start + CHUNK_SIZE] for start in range(0, MiB, CHUNK_SIZE))


@dataclass(frozen=True)
class Synthetic:
    """One source object: `text` when given, else `size` bytes cycled from BLOCK."""

    path: str
    content_type: str
    size: int = 0
    text: bytes | None = None
    known_crc: bool = False  # whether "S3" gave its CRC-32 (media with one is STORED, without one deflated)

    @property
    def length(self) -> int:
        return len(self.text) if self.text is not None else self.size

    def chunks(self, index: int) -> Iterator[bytes]:
        if self.text is not None:
            yield self.text
            return
        remaining, position = self.size, index
        while remaining > 0:
            chunk = BLOCK_CHUNKS[position % len(BLOCK_CHUNKS)]
            if len(chunk) > remaining:
                chunk = chunk[:remaining]
            remaining -= len(chunk)
            position += 1
            yield chunk

    def crc32(self, index: int, *, skip_chunks: int = 0) -> int:
        """The CRC-32 of the bytes, or of those after the first `skip_chunks` 64 KiB chunks."""
        crc = 0
        for chunk in itertools.islice(self.chunks(index), skip_chunks, None):
            crc = isal_zlib.crc32(chunk, crc)
        return crc

    def source(self, index: int) -> SourceObject:
        return SourceObject(
            ref=SourceRef(source=f"s3://synthetic/{self.path}", bucket="synthetic", key=self.path),
            size=self.length,
            etag='"x"',
            last_modified=MODIFIED,
            content_type=self.content_type,
            crc32=self.crc32(index) if self.known_crc else None,
        )
