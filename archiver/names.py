"""Entry names inside the archive: the safety rules and the renaming of duplicates (contract §2).

Pure functions over strings, so they can be property-tested without any AWS.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence

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


def numbered(path: str, number: int) -> str:
    """`album/photo.jpg`, 2 -> `album/photo (2).jpg`."""
    folder, _, name = path.rpartition("/")
    stem, extension = _split_extension(name)
    renamed = f"{stem} ({number}){extension}"
    return f"{folder}/{renamed}" if folder else renamed


def _folders(path: str) -> Iterable[str]:
    segments = path.split("/")
    for end in range(1, len(segments)):
        yield "/".join(segments[:end])


def deduplicate(paths: Sequence[str]) -> list[str]:
    """Rename colliding paths `x (1).ext`, `x (2).ext` in order; a path that collides with nothing keeps
    its name, and so does the first of each group. A file that has the name of another entry's folder is
    renamed too, since it could not be extracted beside it."""
    originals = {collision_key(p) for p in paths}
    taken = {collision_key(folder) for p in paths for folder in _folders(p)}
    result: list[str] = []
    for path in paths:
        chosen = path
        number = 0
        while collision_key(chosen) in taken or (chosen != path and collision_key(chosen) in originals):
            number += 1
            chosen = numbered(path, number)
        taken.add(collision_key(chosen))
        result.append(check_entry_path(chosen))
    return result
