"""Read-ahead of small sources: in order, within the byte window, big objects streamed, errors surfaced."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from archiver.models import SourceRef
from archiver.prefetch import Prefetcher
from archiver.sources import SourceObject


def source(index: int, size: int) -> SourceObject:
    return SourceObject(
        ref=SourceRef(source=f"k{index}", bucket="b", key=f"k{index}"),
        size=size,
        etag='"e"',
        last_modified=datetime(2026, 1, 1, tzinfo=UTC),
        content_type="",
        crc32=None,
    )


class Reads:
    """Counts bytes being read or buffered at once, the quantity the window bounds."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buffered = 0
        self.peak = 0
        self.streamed: list[int] = []

    def read(self, obj: SourceObject) -> Iterator[bytes]:
        index = int(obj.ref.key[1:])
        with self.lock:
            self.buffered += obj.size
            self.peak = max(self.peak, self.buffered)
        if not threading.current_thread().name.startswith("prefetch"):
            self.streamed.append(index)
        remaining = obj.size
        while remaining:
            step = min(remaining, 65536)
            remaining -= step
            yield bytes([index % 256]) * step

    def consumed(self, obj: SourceObject) -> None:
        with self.lock:
            self.buffered -= obj.size


def drain(prefetcher: Prefetcher, objects: list[SourceObject], reads: Reads) -> list[bytes]:
    out = []
    for index, obj in enumerate(objects):
        out.append(b"".join(prefetcher.open(index)))
        reads.consumed(obj)
    return out


def test_bytes_come_out_in_order_and_whole() -> None:
    """Each source's bytes come out whole and in request order, whatever finished first."""
    objects = [source(i, 1000 + i * 37) for i in range(200)]
    reads = Reads()
    prefetcher = Prefetcher(objects, read=reads.read, window_bytes=50_000, workers=8)
    try:
        result = drain(prefetcher, objects, reads)
    finally:
        prefetcher.close()
    assert result == [bytes([i % 256]) * obj.size for i, obj in enumerate(objects)]


def test_window_bounds_what_is_buffered() -> None:
    """No more than the window (plus the object being streamed) is ever buffered or in flight."""
    objects = [source(i, 10_000) for i in range(300)]
    reads = Reads()
    prefetcher = Prefetcher(objects, read=reads.read, window_bytes=64_000, workers=8)
    try:
        drain(prefetcher, objects, reads)
    finally:
        prefetcher.close()
    assert reads.peak <= 64_000 + 10_000
    assert reads.peak > 10_000  # it did read ahead


def test_big_objects_are_streamed_not_buffered() -> None:
    """An object over a quarter of the window is read by the writer's own stream, when reached."""
    objects = [source(0, 100), source(1, 5_000_000), source(2, 100)]
    reads = Reads()
    prefetcher = Prefetcher(objects, read=reads.read, window_bytes=1_000_000, workers=2)
    try:
        result = drain(prefetcher, objects, reads)
    finally:
        prefetcher.close()
    assert reads.streamed == [1]
    assert len(result[1]) == 5_000_000


def test_a_failed_read_surfaces_in_order() -> None:
    """A source that fails while read ahead raises when the writer reaches it, not before."""
    objects = [source(i, 1000) for i in range(5)]

    def read(obj: SourceObject) -> Iterator[bytes]:
        if obj.ref.key == "k3":
            raise ConnectionResetError("gone")
        yield b"x" * obj.size

    prefetcher = Prefetcher(objects, read=read, window_bytes=100_000, workers=4)
    try:
        for index in range(3):
            assert b"".join(prefetcher.open(index)) == b"x" * 1000
        with pytest.raises(ConnectionResetError):
            b"".join(prefetcher.open(3))
    finally:
        prefetcher.close()
