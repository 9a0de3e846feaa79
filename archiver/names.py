"""Entry names inside the archive: the safety rules and the renaming of duplicates (contract §2).

Pure functions over strings, so they can be property-tested without any AWS.
"""

from __future__ import annotations

import unicodedata
from bisect import bisect_left
from collections.abc import Sequence

from archiver.errors import shown

MAX_PATH_BYTES = 1024
_DOUBLE_EXTENSIONS = (".tar.gz", ".tar.bz2", ".tar.xz", ".tar.zst")


class UnsafeNameError(ValueError):
    """An entry path that would be unsafe or unreadable when extracted."""


def _check_segment(segment: str, path: str) -> None:
    if segment == "":
        raise UnsafeNameError(f"{shown(path)} has an empty path segment")
    if segment in (".", ".."):
        raise UnsafeNameError(f"{shown(path)} has a {shown(segment)} segment")
    if len(segment) >= 2 and segment[1] == ":" and segment[0].isascii() and segment[0].isalpha():
        raise UnsafeNameError(f"{shown(path)} starts a segment with a drive letter")


def check_entry_path(path: str) -> str:
    """Return `path` if it is a safe relative `/`-separated entry path, else raise `UnsafeNameError`."""
    if path == "":
        raise UnsafeNameError("the entry name is empty")
    if path.startswith("/"):
        raise UnsafeNameError(f"{shown(path)} is an absolute path")
    if "\\" in path:
        raise UnsafeNameError(f"{shown(path)} contains a backslash")
    for char in path:
        if unicodedata.category(char) in ("Cc", "Cs"):
            raise UnsafeNameError(f"{shown(path)} contains a control character (U+{ord(char):04X})")
    for segment in path.split("/"):
        _check_segment(segment, path)
    if len(path.encode("utf-8")) > MAX_PATH_BYTES:
        raise UnsafeNameError(f"entry path is over {MAX_PATH_BYTES} bytes in UTF-8")
    return path


def entry_path(destination: str | None, name: str) -> str:
    """Join a destination folder and a file name into one entry path, checking both."""
    if name == "" or "/" in name:
        raise UnsafeNameError(f"file name {shown(name)} must be one non-empty path segment")
    folder = destination or ""
    if len(folder) > 1 and folder.endswith("/"):
        folder = folder[:-1]  # "album_1/" is a natural way to write a folder
    path = f"{folder}/{name}" if folder else name
    return check_entry_path(path)


def collision_key(path: str) -> str:
    """How Windows and macOS would compare two paths: NFC-normalised and case-folded."""
    return unicodedata.normalize("NFC", path).casefold()


def _split_extension(name: str) -> tuple[str, str]:
    lowered = name.lower()
    for double in _DOUBLE_EXTENSIONS:
        if lowered.endswith(double) and len(name) > len(double):
            return name[: -len(double)], name[-len(double) :]
    dot = name.rfind(".")
    if dot <= 0:
        return name, ""
    return name[:dot], name[dot:]


def _split_for_number(path: str) -> tuple[str, str]:
    """`album/photo.jpg` → (`album/photo`, `.jpg`): where a number goes."""
    folder, slash, name = path.rpartition("/")
    stem, extension = _split_extension(name)
    return folder + slash + stem, extension


def numbered(path: str, number: int) -> str:
    """`album/photo.jpg`, 2 -> `album/photo (2).jpg`."""
    head, extension = _split_for_number(path)
    return f"{head} ({number}){extension}"


class _Folders:
    """The collision keys of every entry's folders, without storing them: a folder is a key that some
    entry's key continues with `/`. Storing every prefix of every path cost ~0.3 MiB per 1,000-byte path
    of one-letter folders; a sorted list of the paths' own keys is linear in the request."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = sorted(keys)

    def __contains__(self, key: str) -> bool:
        below = key + "/"
        index = bisect_left(self._keys, below)
        return index < len(self._keys) and self._keys[index].startswith(below)


def deduplicate(paths: Sequence[str]) -> list[str]:
    """Rename colliding paths `x (1).ext`, `x (2).ext` in order; a path that collides with nothing keeps
    its name, and so does the first of each group. A file that has the name of another entry's folder is
    renamed too, since it could not be extracted beside it.

    Linear in the paths (with a sort): the numbers tried for a name are remembered, so the 3,000th
    `photo.jpg` starts at `photo (2999).jpg` rather than probing from 1. Names taken only ever grow, so
    a number found taken once stays taken. Paths share a counter when their keys with the number in
    place are the same for every number: NFC and case folding work per `/`-segment and leave ` (n)`
    and the extension's dot alone, so that is when their heads and extensions have the same keys."""
    keys = [collision_key(path) for path in paths]
    originals = set(keys)
    folders = _Folders(keys)
    taken: set[str] = set()
    tried: dict[tuple[str, str], int] = {}
    result: list[str] = []
    for path, key in zip(paths, keys, strict=True):
        chosen = path
        if key in taken or key in folders:
            head, extension = _split_for_number(path)
            group = (collision_key(head), collision_key(extension))
            number = tried.get(group, 0)
            while True:
                number += 1
                key = f"{group[0]} ({number}){group[1]}"
                if key not in taken and key not in originals and key not in folders:
                    break
            tried[group] = number
            chosen = f"{head} ({number}){extension}"
        taken.add(key)
        result.append(check_entry_path(chosen))
    return result
