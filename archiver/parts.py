"""Byte chunks -> numbered parts: the part assembler, and the ledger of the numbers an upload has given
out, streamed or reserved for parts uploaded apart from the stream (server-side copies).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from archiver.errors import JobAbandoned
from archiver.settings import MAX_PART_SIZE, MIN_PART_SIZE, MiB

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
                size = part_size if sizes is None else sizes.at(ledger.position)
                part, filled = bytearray(size), 0
    yield from _last_part(held, part[:filled], ledger, emitted=emitted, join_short_last=join_short_last)


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
