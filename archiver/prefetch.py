"""Upcoming sources fetched concurrently while the zip writer consumes them in order: small ones read whole
into a byte window, each by one GET that also says what the object is; big ones only identified, and
streamed by the writer when it reaches them.

Many small objects are bound by request latency, not bandwidth: S3 takes tens of milliseconds to a first
byte, so 2,000 objects read one after another spend most of their time waiting. So up to `workers` GETs
are in flight at once, ahead of the writer. A source's size is learnt from its GET's answer, before its
body is read: a small body is read only once the window has room for it, and room is given in request
order, so the entry the writer needs next is never kept waiting by later ones (when the writer asks for
entry i, every entry before it has been handed out and its room freed, and no later entry holds room
before i got its own). Memory held here: the window, plus one 64 KiB chunk per stream. A big source's
GET is dropped after its answer and the source HEADed instead (fetch's business): one stream is fast
enough for one big object, and reading it ahead would stall the small ones behind it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from archiver.errors import JobAbandoned
from archiver.models import SourceRef
from archiver.sources import Fetched, SourceObject

# How far ahead of the writer to look for objects to fetch, in entries: bounds the bookkeeping.
MAX_LOOKAHEAD = 1024

# What an entry turns out to be: read whole (Fetched), to be streamed or copied (SourceObject), or missing.
Resolved = Fetched | SourceObject | None
# What the caller knows of an entry before any GET: only where it is (SourceRef), or a HEAD's answer
# (SourceObject, or None for a source the HEAD found missing).
Planned = SourceRef | SourceObject | None
Fetch = Callable[[Planned, Callable[[int], None]], Resolved]


class Prefetcher:
    """Hands out each entry's metadata (`resolve`) and bytes (`open`) in request order."""

    def __init__(
        self,
        planned: Sequence[Planned],
        *,
        fetch: Fetch,
        stream: Callable[[SourceObject], Iterator[bytes]],
        window_bytes: int,
        small_limit: int,
        workers: int,
    ) -> None:
        self._planned = planned
        self._fetch, self._stream = fetch, stream
        self._window, self._small_limit = window_bytes, small_limit
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="prefetch")
        self._futures: dict[int, Future[Resolved]] = {}
        self._next = 0  # the next entry to consider for fetching
        self._lock = threading.Lock()
        # Reader threads waiting, each for its own turn: woken one by one, lowest entry first, only when
        # it may go on (waking all 64 at every change cost more than the GETs themselves).
        self._waiting: dict[int, tuple[threading.Event, Callable[[], bool]]] = {}
        self._reserved = 0  # bytes of the window given to entries not yet handed out
        self._turn = 0  # the lowest entry that has not passed the window's gate
        self._passed: set[int] = set()  # entries past the gate, above the turn
        self._sizes: dict[int, int] = {}  # room each entry holds in the window
        # GETs sent whose body has no room yet, with the body's size when a HEAD told it (None: unknown)
        self._getting: dict[int, int | None] = {}
        self._seen = [0, 0]  # small bodies admitted: how many, how many bytes
        self._workers = max(1, workers)
        self._closed = False

    def resolve(self, index: int) -> Resolved:
        """What entry `index` is, once its GET (or HEAD) has answered; its error, if the read failed.
        Entries must be resolved, then opened, in order."""
        self._fill(index)
        future = self._futures.get(index)
        if future is not None:
            return future.result()
        return self._known(index)

    def open(self, index: int) -> Iterator[bytes]:
        """The bytes of entry `index`, which `resolve` found to exist."""
        resolved = self.resolve(index)
        self._futures.pop(index, None)
        if isinstance(resolved, Fetched):
            chunks = resolved.chunks
            chunks.reverse()  # pop from the end: each chunk is freed as soon as it is handed out
            while chunks:
                yield chunks.pop()
            # Only now is its room in the window free: released earlier, the window would be read full
            # again while this object is still held.
            self._release(index)
            self._fill(index + 1)
        elif resolved is not None:
            yield from self._stream(resolved)

    def missing(self, limit: int) -> list[int]:
        """Up to `limit` entries already found missing, in order."""
        found = [
            index
            for index, planned in enumerate(self._planned)
            if (index in self._futures and _done_missing(self._futures[index]))
            or (index < self._next and planned is None)
        ]
        return found[:limit]

    def _known(self, index: int) -> Resolved:
        planned = self._planned[index]
        return planned if isinstance(planned, SourceObject) else None

    def _fill(self, current: int) -> None:
        self._next = max(self._next, current)
        while self._next < len(self._planned) and self._next - current < MAX_LOOKAHEAD:
            index, planned = self._next, self._planned[self._next]
            self._next += 1
            if planned is None or (isinstance(planned, SourceObject) and planned.size > self._small_limit):
                self._pass(index)  # missing, or big: nothing to read ahead
                continue
            self._futures[index] = self._pool.submit(self._read, index, planned)

    def _read(self, index: int, planned: Planned) -> Resolved:
        self._start(index)
        try:
            return self._fetch(planned, lambda size: self._admit(index, size))
        finally:
            with self._lock:
                self._getting.pop(index, None)
                if index not in self._sizes:
                    self._pass_locked(index)
                self._wake_locked()

    def _start(self, index: int) -> None:
        """Wait until this GET may be sent: an answer waiting for room holds a connection, and the start
        of its body in the client's buffers, so GETs are sent only while the bodies they should bring
        (their HEADed sizes, or the mean size of those seen so far) fit the window beside what it holds.
        Known sizes matter where bandwidth is the limit: 32 GETs sent at once share it, and the body the
        writer waits for arrives with the 31 others, not before them. The entry whose turn it is always
        goes."""
        planned = self._planned[index]
        size = planned.size if isinstance(planned, SourceObject) else None

        def may() -> bool:
            count, total = self._seen
            mean = total // count if count else 0
            sizes = [*self._getting.values(), size]
            waiting = sum(mean if known is None else known for known in sizes)
            return index == self._turn or (
                len(self._getting) < self._workers and self._reserved + waiting <= self._window
            )

        with self._lock:
            self._wait_locked(index, may)
            self._getting[index] = size

    def _admit(self, index: int, size: int) -> None:
        """Wait for room in the window, given in request order."""
        with self._lock:
            self._wait_locked(index, lambda: self._turn == index and self._reserved + size <= self._window)
            self._reserved += size
            self._sizes[index] = size
            self._getting.pop(index, None)
            self._seen[0] += 1
            self._seen[1] += size
            self._pass_locked(index)
            self._wake_locked()

    def _wait_locked(self, index: int, ready: Callable[[], bool]) -> None:
        while not (self._closed or ready()):
            event = threading.Event()
            self._waiting[index] = (event, ready)
            self._lock.release()
            try:
                event.wait()
            finally:
                self._lock.acquire()
                self._waiting.pop(index, None)
        if self._closed:
            raise JobAbandoned("the read-ahead was stopped")

    def _wake_locked(self) -> None:
        """Wake the waiting readers that may now go on: from the lowest entry up, to the first that may
        not (the later ones wait for room or a turn behind it)."""
        for index in sorted(self._waiting):
            event, ready = self._waiting[index]
            if not ready():
                return
            event.set()

    def _pass(self, index: int) -> None:
        with self._lock:
            self._pass_locked(index)
            self._wake_locked()

    def _pass_locked(self, index: int) -> None:
        self._passed.add(index)
        while self._turn in self._passed:
            self._passed.remove(self._turn)
            self._turn += 1

    def _release(self, index: int) -> None:
        with self._lock:
            self._reserved -= self._sizes.pop(index, 0)
            self._wake_locked()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for event, _ in self._waiting.values():
                event.set()
        for future in self._futures.values():
            future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._futures.clear()


def _done_missing(future: Future[Resolved]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None and future.result() is None
