"""CRC-32 arithmetic for bytes the worker never holds: a whole object's CRC from its parts' CRCs, the CRC
after a run of zeros, and four bytes that bring a CRC to a chosen value.

All of it rests on CRC-32 being linear over GF(2): isal's crc32_combine (zlib's algorithm) does the
joining, and forging solves a 32x32 linear system.
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Iterable

from isal import isal_zlib


def from_base64(value: str | None) -> int | None:
    """A CRC-32 as S3 sends it (`ChecksumCRC32`: base64 of 4 big-endian bytes); None if it is not one."""
    if not value:
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        return None
    return int.from_bytes(raw, "big") if len(raw) == 4 else None


def to_base64(crc: int) -> str:
    """A CRC-32 as S3 writes it: base64 of its 4 big-endian bytes."""
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


def of(chunks: Iterable[bytes | bytearray | memoryview], previous: int = 0) -> int:
    """The CRC-32 of chunks held in memory, one after another (after bytes whose CRC-32 is `previous`)."""
    crc = previous
    for chunk in chunks:
        crc = isal_zlib.crc32(chunk, crc)  # 4x zlib's speed here
    return int(crc)


def combine(crc: int, next_crc: int, next_length: int) -> int:
    """The CRC-32 of A + B, from the CRC-32 of A, that of B, and the length of B."""
    return int(isal_zlib.crc32_combine(crc, next_crc, next_length))


def joined(pieces: Iterable[tuple[int, int]]) -> int:
    """The CRC-32 of consecutive pieces given as (crc, length)."""
    crc = 0
    for piece_crc, length in pieces:
        crc = combine(crc, piece_crc, length)
    return crc


def of_zeros(length: int) -> int:
    """The CRC-32 of `length` zero bytes, in log2(length) steps instead of reading them."""
    crc, piece_crc, piece_length = 0, zlib.crc32(b"\0"), 1
    while length:
        if length & 1:
            crc = combine(crc, piece_crc, piece_length)
        piece_crc = combine(piece_crc, piece_crc, piece_length)
        piece_length *= 2
        length >>= 1
    return crc


def forge(crc: int, target: int) -> bytes:
    """Four bytes that, appended to data whose CRC-32 is `crc`, make it `target`."""
    base = zlib.crc32(bytes(4), crc)
    # Each input bit flips a fixed set of output bits; find the input bits whose flips make target.
    basis: list[tuple[int, int]] = []  # (output bits, input bits), distinct leading output bits
    for bit in range(32):
        flips, inputs = zlib.crc32((1 << bit).to_bytes(4, "little"), crc) ^ base, 1 << bit
        for known_flips, known_inputs in basis:
            if flips ^ known_flips < flips:
                flips, inputs = flips ^ known_flips, inputs ^ known_inputs
        if flips:
            basis.append((flips, inputs))
            basis.sort(reverse=True)
    wanted, chosen = target ^ base, 0
    for known_flips, known_inputs in basis:
        if wanted ^ known_flips < wanted:
            wanted, chosen = wanted ^ known_flips, chosen ^ known_inputs
    if wanted:
        raise ArithmeticError("CRC-32 forging found no solution")  # impossible: the system is invertible
    return chosen.to_bytes(4, "little")
