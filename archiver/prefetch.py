"""Upcoming small sources fetched concurrently, within a byte window, while the zip writer consumes
them in order.

Many small objects are bound by request latency, not bandwidth: read one after another, 2,000 objects
of 100 KiB spend most of their time waiting for first bytes. So objects that fit the window are read
ahead by a few threads; a big object is not buffered but streamed when the writer reaches it (one GET
is fast enough for one stream), while smaller ones behind it are read ahead meanwhile. Memory held here
never exceeds `window_bytes` plus one 64 KiB chunk per stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from archiver.sources import SourceObject

# How far ahead of the writer to look for objects to prefetch, in entries: bounds the bookkeeping.
MAX_LOOKAHEAD = 1024


class Prefetcher:
    """Hands out each source's bytes in order, from a read-ahead buffer or a live stream."""

    def __init__(
        self,
        objects: Sequence[SourceObject],
        *,
        read: Callable[[SourceObject], Iterator[bytes]],
        window_bytes: int,
        workers: int,
        skip: frozenset[int] = frozenset(),
    ) -> None:
        self._objects = objects
        self._skip = skip  # entries never read ahead: S3 copies them, unless it cannot
        self._read = read
        self._window = window_bytes
        # An object bigger than a quarter of the window is streamed: buffering it would stall the others.
        self._largest = window_bytes // 4
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="prefetch")
        self._pending: dict[int, Future[list[bytes]]] = {}
        self._reserved = 0  # bytes buffered or being read for entries not yet handed out
        self._next = 0  # the next entry to consider for read-ahead

    def open(self, index: int) -> Iterator[bytes]:
        """The bytes of entry `index`; entries must be opened in order."""
        self._fill(index)
        future = self._pending.pop(index, None)
        if future is None:
            yield from self._read(self._objects[index])
            return
        chunks = future.result()
        chunks.reverse()  # pop from the end: each chunk is freed as soon as it is handed out
        while chunks:
            yield chunks.pop()
        # Only now is its room in the window free: released earlier, the window would be read full again
        # while this object is still held.
        self._reserved -= self._objects[index].size
        self._fill(index + 1)

    def _fill(self, current: int) -> None:
        self._next = max(self._next, current)
        while self._next < len(self._objects) and self._next - current < MAX_LOOKAHEAD:
            obj = self._objects[self._next]
            if obj.size > self._largest or self._next in self._skip:
                self._next += 1  # streamed when reached
                continue
            if self._reserved + obj.size > self._window:
                return
            self._reserved += obj.size
            self._pending[self._next] = self._pool.submit(self._read_all, obj)
            self._next += 1

    def _read_all(self, obj: SourceObject) -> list[bytes]:
        return list(self._read(obj))

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
