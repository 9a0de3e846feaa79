"""Read-ahead of sources: in order, within the byte window, big objects streamed, errors surfaced, and no
entry ever kept waiting by later ones (room in the window is given in request order)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest

from archiver.models import SourceRef
from archiver.prefetch import Planned, Prefetcher, Resolved
from archiver.sources import Fetched, SourceObject


def ref(index: int) -> SourceRef:
    return SourceRef(source=f"k{index}", bucket="b", key=f"k{index}")


def source(index: int, size: int) -> SourceObject:
    return SourceObject(
        ref=ref(index),
        size=size,
        etag='"e"',
        last_modified=datetime(2026, 1, 1, tzinfo=UTC),
        content_type="",
        crc32=None,
    )


def body(index: int, size: int) -> bytes:
    return bytes([index % 256]) * size


class Store:
    """Sources of given sizes, fetched as archiver.sources.fetch_small does: the size is learnt first,
    the body read once `admit` returns; bigger than the limit, only the metadata. Counts the bytes held
    (admitted and not yet handed out), the quantity the window bounds."""

    def __init__(self, sizes: dict[int, int | None], limit: int, *, jitter: float = 0.0) -> None:
        self.sizes, self.limit, self.jitter = sizes, limit, jitter
        self.lock = threading.Lock()
        self.held = 0
        self.peak = 0
        self.rng = random.Random(5)

    def fetch(self, planned: Planned, admit: Callable[[int], None]) -> Resolved:
        assert isinstance(planned, SourceRef)
        index = int(planned.key[1:])
        if self.jitter:
            with self.lock:
                delay = self.rng.random() * self.jitter
            time.sleep(delay)  # answers arrive out of order
        size = self.sizes[index]
        if size is None:
            return None
        if size > self.limit:
            return source(index, size)
        admit(size)
        with self.lock:
            self.held += size
            self.peak = max(self.peak, self.held)
        return Fetched(source(index, size), [body(index, size)])

    def stream(self, obj: SourceObject) -> Iterator[bytes]:
        yield body(int(obj.ref.key[1:]), obj.size)

    def prefetcher(self, window: int, workers: int = 8) -> Prefetcher:
        return Prefetcher(
            [ref(index) for index in self.sizes],
            fetch=self.fetch,
            stream=self.stream,
            window_bytes=window,
            small_limit=self.limit,
            workers=workers,
        )

    def drain(self, prefetcher: Prefetcher) -> list[bytes | None]:
        return self.drain_from(prefetcher, 0)

    def drain_from(self, prefetcher: Prefetcher, start: int) -> list[bytes | None]:
        out: list[bytes | None] = []
        for index in list(self.sizes)[start:]:
            if prefetcher.resolve(index) is None:
                out.append(None)
                continue
            out.append(b"".join(prefetcher.open(index)))
            with self.lock:
                size = self.sizes[index] or 0
                self.held -= size if size <= self.limit else 0
        return out


def test_bytes_come_out_in_order_and_whole() -> None:
    """Each source's bytes come out whole and in request order, whatever answered first; missing ones
    resolve to None."""
    sizes: dict[int, int | None] = {i: (None if i % 17 == 5 else 1000 + i * 37) for i in range(200)}
    store = Store(sizes, limit=12_500, jitter=0.002)
    prefetcher = store.prefetcher(window=50_000, workers=16)
    try:
        result = store.drain(prefetcher)
        assert prefetcher.missing(5) == [5, 22, 39, 56, 73]
    finally:
        prefetcher.close()
    assert result == [None if size is None else body(i, size) for i, size in sizes.items()]


def test_window_bounds_what_is_held_and_later_entries_never_block_the_next() -> None:
    """With 64 readers and answers out of order, no more than the window is held, it is really used,
    and the writer always gets its next entry (room goes in request order: no deadlock)."""
    rng = random.Random(1)
    sizes: dict[int, int | None] = {i: rng.randint(1, 16_000) for i in range(600)}
    store = Store(sizes, limit=16_000, jitter=0.003)
    prefetcher = store.prefetcher(window=64_000, workers=64)
    try:
        done = threading.Event()
        threading.Thread(target=lambda: (store.drain(prefetcher), done.set()), daemon=True).start()
        assert done.wait(60), "the writer waited forever for an entry"
    finally:
        prefetcher.close()
    assert store.peak <= 64_000
    assert store.peak > 32_000  # it did read ahead


def test_big_objects_are_streamed_not_buffered() -> None:
    """An object over the small limit is resolved to its metadata and read by the writer's own stream."""
    store = Store({0: 100, 1: 5_000_000, 2: 100}, limit=250_000)
    prefetcher = store.prefetcher(window=1_000_000, workers=2)
    try:
        assert isinstance(prefetcher.resolve(0), Fetched)
        assert b"".join(prefetcher.open(0)) == body(0, 100)
        assert isinstance(prefetcher.resolve(1), SourceObject)
        store.held -= 100
        result = [body(0, 100), *store.drain_from(prefetcher, 1)]
    finally:
        prefetcher.close()
    assert result == [body(0, 100), body(1, 5_000_000), body(2, 100)]
    assert store.peak == 200


def test_a_failed_read_surfaces_in_order() -> None:
    """A source that fails while read ahead raises when the writer reaches it, not before."""
    store = Store({i: 1000 for i in range(5)}, limit=10_000)

    def fetch(planned: Planned, admit: Callable[[int], None]) -> Resolved:
        assert isinstance(planned, SourceRef)
        if planned.key == "k3":
            raise ConnectionResetError("gone")
        return store.fetch(planned, admit)

    prefetcher = Prefetcher(
        [ref(i) for i in range(5)],
        fetch=fetch,
        stream=store.stream,
        window_bytes=100_000,
        small_limit=10_000,
        workers=4,
    )
    try:
        for index in range(3):
            assert b"".join(prefetcher.open(index)) == body(index, 1000)
        with pytest.raises(ConnectionResetError):
            prefetcher.resolve(3)
    finally:
        prefetcher.close()


def test_known_sources_from_heads_are_not_guessed() -> None:
    """Sources HEADed first: a missing one is None without a read, a big one streamed without a read,
    a small one read (with what the HEAD saw)."""
    seen: list[Planned] = []

    def fetch(planned: Planned, admit: Callable[[int], None]) -> Resolved:
        seen.append(planned)
        assert isinstance(planned, SourceObject)
        admit(planned.size)
        return Fetched(planned, [body(0, planned.size)])

    planned: list[Planned] = [source(0, 10), None, source(2, 10_000_000)]
    prefetcher = Prefetcher(
        planned, fetch=fetch, stream=lambda obj: iter([b"s"]), window_bytes=1000, small_limit=250, workers=2
    )
    try:
        assert [prefetcher.resolve(i) is None for i in range(3)] == [False, True, False]
        assert b"".join(prefetcher.open(2)) == b"s"
    finally:
        prefetcher.close()
    assert seen == [planned[0]]
