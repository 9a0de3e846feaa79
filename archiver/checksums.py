"""The archive's S3 checksum (ARCHIVE_CHECKSUM): the algorithm a single worker's multipart upload is
created with as a FULL_OBJECT checksum, each part's value, and the whole object's, joined from its parts'
instead of reading the archive again, which S3 verifies at CompleteMultipartUpload.

CRC-32 is also each ZIP entry's checksum (archiver.crc); CRC64NVME is S3's default for new objects, the
one it computes when a writer sends none. Both are CRCs, so the checksum of A + B follows from A's, B's and
B's length: awscrt (AWS's own C library, the one botocore uses for CRC64NVME; the `crc64nvme` extra)
computes and joins them. It is imported only when used: botocore loads it anyway once it is installed,
and a worker without it (the default install) is ~6 MiB smaller.
"""

from __future__ import annotations

import base64
import importlib.util
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from archiver import crc

AlgorithmName = Literal["CRC32", "CRC64NVME"]


@dataclass(frozen=True)
class Algorithm:
    name: AlgorithmName
    width: int  # bytes of the value, as S3 writes it (base64 of them, big-endian)
    _of: Callable[[bytes, int], int]
    _combine: Callable[[int, int, int], int]

    @property
    def field(self) -> str:
        """The name boto3 gives this checksum in requests and answers (`ChecksumCRC64NVME`)."""
        return f"Checksum{self.name}"

    def of(self, data: bytes | bytearray | memoryview, previous: int = 0) -> int:
        return int(self._of(data, previous))  # type: ignore[arg-type]  # any bytes-like object

    def combine(self, value: int, next_value: int, next_length: int) -> int:
        """The checksum of A + B, from A's, B's and the length of B."""
        return int(self._combine(value, next_value, next_length))

    def joined(self, pieces: Iterable[tuple[int, int]]) -> int:
        """The checksum of consecutive pieces given as (checksum, length)."""
        value = 0
        for piece, length in pieces:
            value = self.combine(value, piece, length)
        return value

    def encode(self, value: int) -> str:
        return base64.b64encode(value.to_bytes(self.width, "big")).decode()

    def decode(self, text: object) -> int | None:
        """The value S3 sent as `text`; None if it is not one of this algorithm's."""
        if not isinstance(text, str) or not text:
            return None
        try:
            raw = base64.b64decode(text, validate=True)
        except ValueError:
            return None
        return int.from_bytes(raw, "big") if len(raw) == self.width else None


@dataclass
class Running:
    """The checksum in `algorithm` and the length of a stream, as it passes (`over`)."""

    algorithm: Algorithm
    value: int = 0
    length: int = 0

    def over(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.value = self.algorithm.of(chunk, self.value)
            self.length += len(chunk)
            yield chunk


def awscrt_installed() -> bool:
    return importlib.util.find_spec("awscrt") is not None


def _crt() -> Any:
    from awscrt import checksums  # type: ignore[import-untyped]

    return checksums


CRC32 = Algorithm("CRC32", 4, lambda data, previous: crc.of([data], previous), crc.combine)
CRC64NVME = Algorithm(
    "CRC64NVME",
    8,
    lambda data, previous: _crt().crc64nvme(data, previous),
    lambda value, next_value, length: _crt().combine_crc64nvme(value, next_value, length),
)
ALGORITHMS: dict[AlgorithmName, Algorithm] = {a.name: a for a in (CRC32, CRC64NVME)}
