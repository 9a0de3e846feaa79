"""Byte chunks -> numbered parts -> uploaded, a few at a time: the part assembler, the ledger of the
numbers an upload has given out, streamed or reserved for parts uploaded apart from the stream (server-side
copies), and the uploader that keeps the parts in flight within their memory budget.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from archiver.errors import JobAbandoned, PermanentError
from archiver.settings import MAX_PART_SIZE, MAX_PARTS, MIN_PART_SIZE, MiB

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

# The streamed part that may still be numbered before parts uploaded apart from the stream once their
# numbers are reserved: the one being filled, which then runs on to where the apart range starts
# (parts_of). S3 requires the numbers of an upload with part checksums to be consecutive, so the stream
# must fill exactly the numbers below a reservation, no more and no fewer.
RESERVE_GAP = 1
UNTIL_HOLE = 1 << 62  # the end of a part that runs to a hole not added yet

# Past this many bytes of archive, streamed parts grow (PartSizes): an archive this small keeps the
# part size it was planned with, and its uploads start as soon as they do today.
GROW_FROM = 1024 * MiB


@dataclass(frozen=True)
class PartSizes:
    """The size of each streamed part: `base` (the archive's part size) for its first `grow_from`
    bytes, then as big as three parts fit in the memory that `concurrency` + 1 parts of `base` take.
    The parts' memory stays what it was, and past the first GiB two upload at once instead of four:
    a 10 GB archive makes ~780 UploadParts instead of ~1,190 (docs/settings.md)."""

    base: int
    concurrency: int
    grow_from: int = GROW_FROM

    @property
    def budget(self) -> int:
        """The bytes the parts being filled and uploaded may take together."""
        return (self.concurrency + 1) * self.base

    def at(self, position: int) -> int:
        """The size of a part that starts at byte `position` of the archive."""
        if position < self.grow_from:
            return self.base
        grown = self.budget // 3 // MiB * MiB
        return min(MAX_PART_SIZE, max(self.base, grown))


@dataclass(frozen=True)
class Hole:
    """Stream bytes [start, end) that parts first..last fill, uploaded apart from the stream (copied
    inside S3): the stream carries stand-ins there, which parts_of drops."""

    start: int
    end: int
    first: int
    last: int


@dataclass
class PartLedger:
    """Which part numbers an upload has given out and which stream ranges other parts fill. Used by one
    thread: the zip writer reserves numbers and marks holes while the part assembler, pulled by the same
    loop, numbers the streamed parts around them."""

    position: int = 0  # stream bytes the assembler has taken, holes included
    last_number: int = 0  # the highest part number the stream has passed, streamed or apart
    reserved_last: int = 0  # the highest number reserved for parts uploaded apart
    holes: deque[Hole] = field(default_factory=deque)
    pending: int = 0  # the first number of a reservation whose hole is not added yet
    # A fan-out segment's last part, under 5 MiB, that could not be joined to the one before (parts_of)
    short_last: int = 0

    def reserve(self, count: int) -> int:
        """The first of `count` numbers for parts uploaded apart from the stream. The writer reserves
        before the hole's place in the stream is known (its local header is still to be written) and
        while the end of what it wrote before may still be on its way to the assembler: the part being
        filled, or the first after the hole before, is the one that will end where the hole starts, so
        it takes the number right below. Until the hole is added (or the reservation released), that part
        is not cut at the part size."""
        taken = max([self.last_number, self.reserved_last, *(hole.last for hole in self.holes)])
        first = taken + RESERVE_GAP + 1
        self.reserved_last = first + count - 1
        self.pending = first
        return first

    def release(self) -> None:
        """The reserved numbers will not be used apart from the stream after all: it numbers on through
        them (parts uploaded under them already are replaced, or left out of the upload's completion)."""
        self.pending = 0
        self.reserved_last = self.last_number

    def add_hole(self, hole: Hole) -> None:
        self.holes.append(hole)
        self.pending = 0

    def runs_to_hole(self) -> bool:
        """The part being filled is the one right below a reservation or hole: it ends where the hole
        starts, whatever its size."""
        ahead = self.holes[0].first if self.holes else self.pending
        return bool(ahead) and self.last_number + 2 == ahead

    def number_streamed(self) -> int:
        number = self.last_number + 1
        if self.holes and number >= self.holes[0].first:
            raise RuntimeError(f"streamed part {number} would overwrite part {self.holes[0].first}")
        self.last_number = number
        return number

    def passed(self, hole: Hole) -> None:
        if self.holes[0] is not hole:
            raise RuntimeError(f"passed {hole}, but the next hole is {self.holes[0]}")
        self.holes.popleft()
        self.last_number = hole.last


def parts_of(
    chunks: Iterable[bytes],
    part_size: int,
    abandoned: Callable[[], bool],
    ledger: PartLedger,
    *,
    join_short_last: bool = False,
    first_size: int = 0,
    at_least: int = 0,
    sizes: PartSizes | None = None,
) -> Iterator[tuple[int, bytes | bytearray]]:
    """Regroup chunks into numbered parts of `part_size` bytes (the last one shorter), leaving out the
    ranges other parts fill (`ledger.holes`). Each part is filled in place and handed over as it is:
    joining and slicing would hold every part twice. The part numbered right below a hole (or below
    numbers reserved for one) runs on to where the hole starts: it holds the copied object's lead, so it
    is at least 5 MiB, and at most part_size + 5 MiB and a local header.

    For a fan-out segment, whose end is not the archive's: `join_short_last` holds a full part back until
    5 MiB more are written after it, so that a last part under S3's minimum is joined to it (one that
    cannot be, a copy having come between, is numbered in `ledger.short_last`), unless the stream is
    known to be at least `at_least` bytes long and that many follow anyway; `first_size` makes the first
    part smaller, so that its upload starts sooner. `sizes` sizes each later part by where it starts."""
    size = first_size or part_size
    part = bytearray(size)
    filled = 0
    emitted = False
    held: tuple[int, bytearray] | None = None
    for chunk in chunks:
        if abandoned():
            raise JobAbandoned("the job was stopped before its archive was complete")
        data = memoryview(chunk)
        while data:
            hole = ledger.holes[0] if ledger.holes else None
            if hole is not None and ledger.position >= hole.start:
                skip = min(len(data), hole.end - ledger.position)
                data = data[skip:]
                ledger.position += skip
                if ledger.position == hole.end:
                    ledger.passed(hole)
                continue
            end = _part_end(ledger, hole, size, filled)
            take = min(len(data), end - filled)
            part[filled : filled + take] = data[:take]
            filled += take
            ledger.position += take
            data = data[take:]
            if held is not None and filled >= MIN_PART_SIZE:
                yield held
                held = None
            if filled == end:
                del part[filled:]  # a part cut short where a hole starts
                more_follow = ledger.position + MIN_PART_SIZE <= at_least
                if join_short_last and end == size and not more_follow:
                    held = (ledger.number_streamed(), part)
                else:
                    yield ledger.number_streamed(), part
                emitted = True
                size = _next_size(part_size, sizes, ledger.position, at_least if join_short_last else 0)
                part, filled = bytearray(size), 0
    yield from _last_part(held, part[:filled], ledger, emitted=emitted, join_short_last=join_short_last)


def _next_size(part_size: int, sizes: PartSizes | None, position: int, at_least: int) -> int:
    """The size of the part starting at `position`: by where it starts (`sizes`), and in a segment whose
    length is known to be `at_least`, cut short where a whole one would leave fewer than 5 MiB known to
    follow. The segment's last part is then about 5 MiB, handed over at once, instead of a full part held
    back and joined to the rest (up to part size + 5 MiB uploaded after the last read, the link idle on
    the way in). One part number more at most, which the layout's rounding spares hold."""
    size = part_size if sizes is None else sizes.at(position)
    left = at_least - position
    return left - MIN_PART_SIZE if 2 * MIN_PART_SIZE <= left < size + MIN_PART_SIZE else size


def _part_end(ledger: PartLedger, hole: Hole | None, size: int, filled: int) -> int:
    """Where the part being filled ends: at `size`, unless it is the part below a hole, which ends where
    the hole starts (once it is known): its lead makes it at least 5 MiB, and it is at most the part size
    plus the lead and a local header."""
    if not ledger.runs_to_hole():
        return size
    return hole.start - (ledger.position - filled) if hole is not None else UNTIL_HOLE


def _last_part(
    held: tuple[int, bytearray] | None,
    rest: bytearray,
    ledger: PartLedger,
    *,
    emitted: bool,
    join_short_last: bool,
) -> Iterator[tuple[int, bytes | bytearray]]:
    """The stream's end: what is left joined to a held part (it is under 5 MiB, or the part would have
    been handed over), else a part of its own; at least one part, for an empty stream."""
    if held is not None:
        held[1].extend(rest)
        yield held
    elif rest or not emitted:
        number = ledger.number_streamed()
        if join_short_last and emitted and len(rest) < MIN_PART_SIZE:
            ledger.short_last = number
        yield number, bytes(rest)


def upload_threads(concurrency: int) -> int:
    return concurrency


class PartTarget(Protocol):
    """What upload_parts uploads to: a multipart upload (archiver.multipart.MultipartUpload)."""

    ledger: PartLedger

    def upload_part(self, number: int, body: bytes | bytearray) -> CompletedPartTypeDef: ...


PartSender = Callable[[int, "bytes | bytearray"], "CompletedPartTypeDef | None"]


def upload_parts(
    upload: PartTarget,
    numbered_parts: Iterator[tuple[int, bytes | bytearray]],
    *,
    concurrency: int,
    send: PartSender | None = None,
    sizes: PartSizes | None = None,
) -> list[CompletedPartTypeDef]:
    """Upload the parts, `concurrency` at a time; `send` may put a part elsewhere (a fan-out segment
    keeps its first part apart), returning None for a part that is not one of the upload's. `sizes`
    says how big the next part is (parts_of's own), else every part counts as one of concurrency + 1."""
    send = send or upload.upload_part

    # Room for a part is taken before it starts filling and given back when its upload is done, so the
    # parts uploading and the one filling hold at most (concurrency + 1) x part_size, and at most
    # `concurrency` upload at once whatever their size.
    room = _Room(sizes.budget if sizes else concurrency + 1)
    in_flight: set[Future[CompletedPartTypeDef | None]] = set()
    done: list[Future[CompletedPartTypeDef | None]] = []
    with ThreadPoolExecutor(max_workers=upload_threads(concurrency), thread_name_prefix="part") as pool:
        try:
            while True:
                taken = room.take(sizes.at(upload.ledger.position) if sizes else 1)
                numbered = next(numbered_parts, None)
                if numbered is None:
                    room.give(taken)
                    break
                number, body = numbered
                if number > MAX_PARTS:
                    raise PermanentError("too_large", f"the archive needs more than {MAX_PARTS} parts")
                future = pool.submit(send, number, body)
                room.give_when_done(future, taken)
                in_flight.add(future)
                del body, numbered
                finished = {f for f in in_flight if f.done()}
                for f in finished:
                    f.result()  # raises the first failed part's error now, not after the whole stream
                done.extend(finished)
                in_flight -= finished
            finished_all, _ = wait(in_flight, return_when=FIRST_EXCEPTION)
            for f in finished_all:
                f.result()
            done.extend(in_flight)
        finally:
            for f in in_flight:
                f.cancel()
    return [part for part in (f.result() for f in done) if part is not None]


class _Room:
    """Units of memory for parts (bytes, or one per part), taken before a part fills, given back once it
    is uploaded. A taker asking for more than all of it waits until all of it is free, then takes it."""

    def __init__(self, total: int) -> None:
        self._total, self._free = total, total
        self._changed = threading.Condition()

    def take(self, amount: int) -> int:
        amount = min(amount, self._total)
        with self._changed:
            self._changed.wait_for(lambda: self._free >= amount)
            self._free -= amount
        return amount

    def give_when_done(self, future: Future[Any], amount: int) -> None:
        future.add_done_callback(lambda _: self.give(amount))

    def give(self, amount: int) -> None:
        with self._changed:
            self._free += amount
            self._changed.notify_all()
