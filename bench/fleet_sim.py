"""The engine of bench/fleet.py's model: costs and settings, a clock, links and cores shared by their
flows, and one worker's build of a segment (or of a whole archive, with fan-out off)."""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass

from archiver.job import PLAN_HEAD_CONCURRENCY, SOURCE_GETS
from archiver.settings import MIN_PART_SIZE

__all__ = ["PLAN_HEAD_CONCURRENCY", "SOURCE_GETS"]

MiB = 1024 * 1024
MIN_PART = MIN_PART_SIZE
ENTRY_OVERHEAD = 120  # a local header, a data descriptor and a directory record per entry, about
JOIN_CONCURRENCY = 8  # archiver.fanout.joining's pool


@dataclass(frozen=True)
class Costs:
    """What a request and a byte cost: measured in one bench run (bench/fleet_costs.py), or assumed."""

    get_latency_s: float  # to a GET's first byte
    put_latency_s: float  # a PUT's answer after its last byte (UploadPart, a head, CompleteMultipartUpload)
    head_latency_s: float
    link_bytes_per_s: float  # one task's link, each way
    cpu_s_per_mib: float  # a worker's CPU per MiB zipped through it
    cores: float | None = None  # CPU the whole fleet shares (the bench's machine); None: a core per task
    plan_fixed_s: float = 0.0  # coordinator, received → planned, beyond its HEADs
    plan_cpu_s_per_source: float = 0.0  # the HEADs' client, parsing, the entries: per source
    start_s: float = 0.0  # fan-out off: received → first GET
    segment_overhead_s: float = 0.0  # per segment task, beyond building it
    join_fixed_s: float = 0.0  # last segment built → completed, beyond the copies and the last part
    finish_s: float = 0.0  # send → receive, plus completed → notification
    copy_bytes_per_s: float = 100e6  # one UploadPartCopy inside S3
    origin: str = ""  # where the numbers come from


@dataclass(frozen=True)
class Knobs:
    """archiver's settings that shape the run."""

    part_size: int = 8 * MiB
    upload_concurrency: int = 4
    prefetch_bytes: int = 12 * MiB
    segment_bytes: int = 64 * MiB  # 0: fan-out off
    copy_min_bytes: int | None = None  # sources this big are copied server-side; None: none is


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0

    def after(self, delay: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (self.now + max(0.0, delay), self._seq, action))
        self._seq += 1

    def run(self) -> None:
        while self._events:
            self.now, _, action = heapq.heappop(self._events)
            action()


class Shared:
    """A capacity (bytes/s of a link, CPU-s/s of cores) shared equally by the flows on it, each flow at
    most `per_flow`: processor sharing, advanced at every start and end."""

    def __init__(self, clock: Clock, capacity: float, per_flow: float = math.inf) -> None:
        self.clock, self.capacity, self.per_flow = clock, capacity, per_flow
        self._flows: dict[int, list[float | Callable[[], None]]] = {}
        self._ids = self._version = 0
        self._last = 0.0

    def _rate(self) -> float:
        return min(self.per_flow, self.capacity / len(self._flows)) if self._flows else 0.0

    def start(self, amount: float, done: Callable[[], None]) -> None:
        if amount <= 0:
            self.clock.after(0.0, done)
            return
        self._advance()
        self._ids += 1
        self._flows[self._ids] = [amount, done]
        self._schedule()

    def _advance(self) -> None:
        step = self._rate() * (self.clock.now - self._last)
        for flow in self._flows.values():
            flow[0] = float(flow[0]) - step  # type: ignore[arg-type]
        self._last = self.clock.now

    def _schedule(self) -> None:
        self._version += 1
        if self._flows:
            version, least = self._version, min(float(f[0]) for f in self._flows.values())  # type: ignore[arg-type]
            self.clock.after(least / self._rate(), lambda: self._fire(version))

    def _fire(self, version: int) -> None:
        if version != self._version:
            return
        self._advance()
        close = 1e-9 * self._rate()
        finished = [key for key, flow in self._flows.items() if float(flow[0]) <= close]  # type: ignore[arg-type]
        actions = [self._flows.pop(key)[1] for key in finished]
        self._schedule()
        for action in actions:
            action()  # type: ignore[operator]


@dataclass
class Task:
    """One worker: its links, its CPU."""

    clock: Clock
    down: Shared
    up: Shared
    cpu: Shared
    costs: Costs
    knobs: Knobs


def join_work_s(segment_sizes: list[int], part_size: int, costs: Costs) -> float:
    """The coordinator's join beyond `join_fixed_s`: each head (a segment's first part) copied in,
    JOIN_CONCURRENCY at once; heads under 5 MiB read one by one and uploaded again, joined into parts of
    at least 5 MiB, through its links; then the last part (the directory)."""
    heads = [min(size, part_size) for size in segment_sizes]
    copied = [head for head in heads if head >= MIN_PART]
    small = [head for head in heads if head < MIN_PART]
    seconds = -(-len(copied) // JOIN_CONCURRENCY) * costs.put_latency_s
    seconds += sum(copied) / JOIN_CONCURRENCY / costs.copy_bytes_per_s
    if small:
        joined = max(1, sum(small) // MIN_PART)
        seconds += len(small) * costs.get_latency_s + joined * costs.put_latency_s
        seconds += 2 * sum(small) / costs.link_bytes_per_s
    return seconds + costs.put_latency_s


def new_task(clock: Clock, costs: Costs, knobs: Knobs, shared_cpu: Shared | None) -> Task:
    link = costs.link_bytes_per_s
    cpu = shared_cpu if shared_cpu is not None else Shared(clock, 1.0)
    return Task(clock, Shared(clock, link), Shared(clock, link), cpu, costs, knobs)


class Build:
    """One worker building one run of entries: GETs ahead of the writer, the writer zipping in order,
    parts uploaded behind it; `done` once the last part (or copy) is answered. `known`: the sizes came
    from HEADs (fan-out), so GETs are sent only while their bodies fit the window; unknown (fan-out off),
    the first ones count as empty, so up to SOURCE_GETS go at once."""

    def __init__(
        self, task: Task, sizes: list[int], part_size: int, *, known: bool, done: Callable[[], None]
    ) -> None:
        self.task, self.sizes, self.part_size, self.known, self.done = task, sizes, part_size, known, done
        knobs = task.knobs
        self.small_limit = knobs.prefetch_bytes // 2
        if knobs.copy_min_bytes is not None:
            self.small_limit = min(self.small_limit, knobs.copy_min_bytes - 1)
        self.window = max(knobs.prefetch_bytes, 2 * self.small_limit)
        self.next_get = self.writing = 0  # the next entry to GET, the entry the writer is at
        self.in_flight = self.held = 0  # GETs sent and not arrived; window bytes reserved
        self.seen = 0  # bodies arrived: until one has, an unknown size counts as 0
        self.arrived: set[int] = set()
        self.busy = False
        self.buffer = 0  # zipped bytes not yet cut into a part
        self.uploads = 0  # parts and copies in flight
        self.resume: Callable[[], None] | None = None  # the writer, waiting for an upload slot
        self.finished = False

    def begin(self) -> None:
        self._fill()
        self._write()

    def _copied(self, index: int) -> bool:
        minimum = self.task.knobs.copy_min_bytes
        return minimum is not None and self.sizes[index] >= minimum

    def _fill(self) -> None:
        while self.next_get < len(self.sizes):
            index, size = self.next_get, self.sizes[self.next_get]
            if size > self.small_limit:
                self.next_get += 1  # streamed (or copied) by the writer when it gets there
                continue
            cost = size if self.known or self.seen else 0
            turn = index == self.writing
            if not turn and (self.in_flight >= SOURCE_GETS or self.held + cost > self.window):
                return
            self.next_get += 1
            self.in_flight += 1
            self.held += cost
            self.task.clock.after(self.task.costs.get_latency_s, self._body(index, cost))

    def _body(self, index: int, cost: int) -> Callable[[], None]:
        """After the first byte: the body on the down link, shared with every other in flight."""
        return lambda: self.task.down.start(self.sizes[index], lambda: self._arrive(index, cost))

    def _arrive(self, index: int, cost: int) -> None:
        self.in_flight -= 1
        self.seen += 1
        self.held += self.sizes[index] - cost
        self.arrived.add(index)
        self._fill()
        if index == self.writing:
            self._write()

    def _write(self) -> None:
        if self.busy or self.resume is not None or self.finished:
            return
        if self.writing == len(self.sizes):
            self._end()
            return
        index = self.writing
        size = self.sizes[index]
        if size > self.small_limit:
            self.busy = True
            self._stream(index)
            return
        if index not in self.arrived:
            return  # _arrive calls again
        self.busy = True
        self.task.cpu.start(size / MiB * self.task.costs.cpu_s_per_mib, lambda: self._zipped(index, size))

    def _stream(self, index: int) -> None:
        """A big source: one GET streamed by the writer a part's worth at a time, each zipped and cut
        while the parts before it upload (only its first 5 MiB when the rest is copied server-side)."""
        size, task = self.sizes[index], self.task
        streamed = min(size, MIN_PART) if self._copied(index) else size
        if self._copied(index):
            self._flush_part()
            for piece in _pieces(size - streamed, self.part_size):
                self._upload(0, copy_bytes=piece)

        def chunk(left: int) -> None:
            if left <= 0:
                self.writing += 1
                self.busy = False
                self._fill()
                self._write()
                return
            step = min(left, self.part_size)

            def zipped() -> None:
                self.buffer += step
                self._cut(lambda: chunk(left - step))

            task.down.start(step, lambda: task.cpu.start(step / MiB * task.costs.cpu_s_per_mib, zipped))

        task.clock.after(task.costs.get_latency_s, lambda: chunk(streamed))

    def _zipped(self, index: int, size: int) -> None:
        self.held -= size
        self.arrived.discard(index)
        self.writing += 1
        self.buffer += size
        self.busy = False
        self._fill()
        self._cut(self._write)

    def _cut(self, then: Callable[[], None]) -> None:
        """Parts out of the buffer while an upload slot is free; the writer waits for one otherwise."""
        while self.buffer >= self.part_size:
            if self.uploads >= self.task.knobs.upload_concurrency:
                self.resume = then
                return
            self.buffer -= self.part_size
            self._upload(self.part_size)
        then()

    def _flush_part(self) -> None:
        if self.buffer:
            self._upload(self.buffer)
            self.buffer = 0

    def _upload(self, size: int, copy_bytes: int = 0) -> None:
        task = self.task
        self.uploads += 1
        if copy_bytes:
            seconds = task.costs.put_latency_s + copy_bytes / task.costs.copy_bytes_per_s
            task.clock.after(seconds, self._uploaded)
            return
        task.up.start(size, lambda: task.clock.after(task.costs.put_latency_s, self._uploaded))

    def _uploaded(self) -> None:
        self.uploads -= 1
        if self.resume is not None:
            then, self.resume = self.resume, None
            self._cut(then)
        elif self.writing == len(self.sizes):
            self._end()

    def _end(self) -> None:
        self._flush_part()
        if self.uploads == 0 and not self.finished:
            self.finished = True
            self.done()


def _pieces(size: int, piece: int) -> list[int]:
    """A copied source's UploadPartCopy pieces, about `piece` bytes each."""
    if size <= 0:
        return []
    count = max(1, size // piece)
    return [size // count + (1 if i < size % count else 0) for i in range(count)]
