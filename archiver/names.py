"""Entry names inside the archive: the safety rules, the portable spelling, and the renaming of
duplicates (contract §2).

Pure functions over strings, so they can be property-tested without any AWS. Every rule is a regular
expression over the whole path: a request body of megabytes holds hundreds of thousands of segments,
and a Python loop per character or segment would take seconds.
"""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_left
from collections.abc import Sequence

from archiver.errors import shown

MAX_PATH_BYTES = 1024
_DOUBLE_EXTENSIONS = (".tar.gz", ".tar.bz2", ".tar.xz", ".tar.zst")


class UnsafeNameError(ValueError):
    """An entry path that would be unsafe or unreadable when extracted."""


# ------------------------------------------------------------------------------------- rejected names

# Control characters (Cc) and lone surrogates (Cs); U+2028/U+2029 break a name across lines like \n does.
_LINE_BREAKING = "\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029"
# Characters that only steer bidirectional display: with them `gpj.exe` can show as `exe.jpg`.
_BIDI_CONTROLS = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_FORBIDDEN_CHARACTER = re.compile(f"[{_LINE_BREAKING}{_BIDI_CONTROLS}]")
# A segment of dots and spaces only: `.`, `..`, and what Windows turns into them or into nothing (`.. `,
# `...`, ` `), since it drops a name's trailing dots and spaces.
_DOTS_ONLY = re.compile(r"(?:^|/)[. ]+(?:/|$)")
_DRIVE_LETTER = re.compile(r"(?:^|/)[A-Za-z]:")

# What an extractor that folds look-alikes may read: NFKC turns `．．／` into `../`; Windows' best-fit
# code-page conversion turns these slashes into `/` or `\`; HFS+ ignores these invisible characters, so
# `.\u200c.` is `..` there. ¥ and ₩ (the backslash of Japanese and Korean code pages) are left out: they
# are in too many real file names.
_HFS_IGNORABLE_RANGES = ((0xAD, 0xAD), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x2064), (0x206A, 0x206F))
_IGNORED_BY_HFS = str.maketrans(
    dict.fromkeys([0xFEFF, *(point for low, high in _HFS_IGNORABLE_RANGES for point in range(low, high + 1))])
)
_SLASHES = str.maketrans(dict.fromkeys(map(ord, "\\\u2215\u2044\u29f8\u2216\u29f9"), "/"))


def _describe(char: str) -> str:
    point = f"U+{ord(char):04X}"
    if re.fullmatch(f"[{_BIDI_CONTROLS}]", char):
        return f"a bidirectional control character ({point}), which can make a name display as another"
    if char in "\u2028\u2029":
        return f"a line separator ({point})"
    return f"a control character ({point})"


def _check_layout(path: str, shown_path: str, *, folded: bool) -> None:
    """The segment rules, on the path as written or as a folding extractor reads it. Each regex runs only
    where a plain substring test finds what it looks for: a search anchored at every `/` costs ~15 µs on
    a path of 500 one-letter folders, the substring test well under one."""
    how = " once look-alike characters are folded" if folded else ""
    if path.startswith("/"):
        raise UnsafeNameError(f"{shown_path} is an absolute path{how}")
    starts_a_segment = path.startswith((".", " ")) or "/." in path or "/ " in path
    if starts_a_segment and (found := _DOTS_ONLY.search(path)):
        segment = found.group().strip("/")
        if segment in (".", ".."):
            raise UnsafeNameError(f"{shown_path} has a {shown(segment)} segment{how}")
        raise UnsafeNameError(
            f"{shown_path} has a segment of dots and spaces only{how}, which Windows reads as '.' or '..'"
        )
    if ":" in path and _DRIVE_LETTER.search(path):
        raise UnsafeNameError(f"{shown_path} starts a segment with a drive letter{how}")


def check_entry_path(path: str) -> str:
    """Return `path` if it is a safe relative `/`-separated entry path, else raise `UnsafeNameError`."""
    if path == "":
        raise UnsafeNameError("the entry name is empty")
    shown_path = shown(path)
    if path.startswith("/"):
        raise UnsafeNameError(f"{shown_path} is an absolute path")
    if "\\" in path:
        raise UnsafeNameError(f"{shown_path} contains a backslash")
    if found := _FORBIDDEN_CHARACTER.search(path):
        raise UnsafeNameError(f"{shown_path} contains {_describe(found.group())}")
    if "//" in path or path.endswith("/"):
        raise UnsafeNameError(f"{shown_path} has an empty path segment")
    _check_layout(path, shown_path, folded=False)
    if not path.isascii():
        visible = path.translate(_IGNORED_BY_HFS)
        if visible.startswith("/") or "//" in visible or visible.endswith("/") or not visible:
            raise UnsafeNameError(f"{shown_path} has a segment of invisible characters only")
        _check_layout(unicodedata.normalize("NFKC", visible).translate(_SLASHES), shown_path, folded=True)
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


# ------------------------------------------------------------------------------------- portable names

# Invisible, and changing nothing a reader sees: dropped. ZWJ and ZWNJ stay, they shape emoji and scripts.
_INVISIBLE = re.compile("[\u00ad\u200b\u2060-\u2064\ufeff]")
_NOT_ON_WINDOWS = re.compile(r'[<>:"|?*]')
_TRAILING_DOTS = re.compile(r"[. ]+(?=/|$)")
# Device names Windows opens instead of a file, with any extension (`nul.txt`), and trailing spaces.
_DEVICE = re.compile(
    r"(?:^|(?<=/))(?i:con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³]|conin\$|conout\$)(?= *(?:\.|/|$))"
)
_DEVICE_STEMS = ("con", "prn", "aux", "nul", "com", "lpt")


def _needs_porting(path: str) -> bool:
    """Whether `portable_path` changes anything, by substring tests first (see `_check_layout`)."""
    if path.endswith((".", " ")) or "./" in path or " /" in path:
        return True
    if _INVISIBLE.search(path) or _NOT_ON_WINDOWS.search(path):
        return True
    lowered = path.lower()
    return any(stem in lowered for stem in _DEVICE_STEMS) and _DEVICE.search(path) is not None


def portable_path(path: str) -> str:
    """How `path` (already checked) must be spelled to extract as written on Windows, macOS and Linux:
    invisible characters dropped, `<>:"|?*` made `_`, trailing dots and spaces dropped (Windows does that
    itself, so `a.txt.` would land on `a.txt`), and device names given a `_` (`CON.txt` → `CON_.txt`)."""
    if not _needs_porting(path):
        return path
    spelled = _TRAILING_DOTS.sub("", _NOT_ON_WINDOWS.sub("_", _INVISIBLE.sub("", path)))
    return check_entry_path(_DEVICE.sub(lambda device: device.group() + "_", spelled))


# ------------------------------------------------------------------------------------------ duplicates


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


def _utf8_key(path: str) -> bytes:
    """`collision_key` in UTF-8: the same equalities, prefixes and order, in a quarter of the memory for
    a name that holds an emoji (CPython stores all of such a string at 4 bytes a character)."""
    return collision_key(path).encode("utf-8", "surrogatepass")


class _Folders:
    """The collision keys of every entry's folders, without storing them: a folder is a key that some
    entry's key continues with `/`. Storing every prefix of every path cost ~0.3 MiB per 1,000-byte path
    of one-letter folders; a sorted list of the paths' own keys is linear in the request."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        self._keys = sorted(keys)

    def __contains__(self, key: bytes) -> bool:
        below = key + b"/"
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
    keys = [_utf8_key(path) for path in paths]
    originals = set(keys)
    folders = _Folders(keys)
    taken: set[bytes] = set()
    tried: dict[tuple[bytes, bytes], int] = {}
    result: list[str] = []
    for path, key in zip(paths, keys, strict=True):
        chosen = path
        if key in taken or key in folders:
            head, extension = _split_for_number(path)
            group = (_utf8_key(head), _utf8_key(extension))
            number = tried.get(group, 0)
            while True:
                number += 1
                key = b"%s (%d)%s" % (group[0], number, group[1])
                if key not in taken and key not in originals and key not in folders:
                    break
            tried[group] = number
            chosen = f"{head} ({number}){extension}"
        taken.add(key)
        result.append(check_entry_path(chosen))
    return result
