"""Entry-name rules and duplicate renaming (contract §2), mostly as properties over generated names."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archiver.names import (
    MAX_PATH_BYTES,
    UnsafeNameError,
    _split_for_number,
    check_entry_path,
    collision_key,
    deduplicate,
    entry_path,
    numbered,
    portable_path,
)

segment_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/"), min_size=0, max_size=12
)
# What breaks names somewhere: separators and their look-alikes, bidi controls, invisible characters, line
# separators, Windows' forbidden characters and device names, dots and spaces, drive letters.
hostile_piece = st.sampled_from(
    [".", "..", " ", "\\", ":", "C:", "0:", "?", "*", "<", ">", "|", '"', "\x00", "\t", "\u202e", "\u2066",
     "\u200e", "\u061c", "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u2028", "\u2029",
     "\uff0e", "\uff0f", "\uff3c", "\ufe68", "\u2024", "\u2025", "\u2026", "\u2215", "\u2044", "\u29f8",
     "\uff1a", "\uff23", "CON", "nul", "Com1", "LPT\u00b9", "aux", "conin$", "a", "b.txt", "é", "e\u0301",
     "¥"]
)  # fmt: skip
hostile_segment = st.lists(hostile_piece | segment_text, min_size=1, max_size=4).map("".join)
paths = (
    st.lists(segment_text, min_size=1, max_size=4).map("/".join)
    | st.text(max_size=40)
    | st.lists(hostile_segment, min_size=1, max_size=4).map("/".join)
)

BIDI_CONTROLS = {
    "\u061c",
    "\u200e",
    "\u200f",
    *map(chr, range(0x202A, 0x202F)),
    *map(chr, range(0x2066, 0x206A)),
}
HFS_IGNORED = {"\u00ad", "\ufeff", *map(chr, [*range(0x200B, 0x2010), *range(0x202A, 0x202F)])}
HFS_IGNORED |= set(map(chr, [*range(0x2060, 0x2065), *range(0x206A, 0x2070)]))
LOOKALIKE_SLASHES = "\\\u2215\u2044\u29f8\u2216\u29f9"
DEVICES = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"} | {
    f"{d}{n}" for d in ("COM", "LPT") for n in "0123456789¹²³"
}


DROPPED = set("\u00ad\u200b\u2060\u2061\u2062\u2063\u2064\ufeff")


def is_device(segment: str) -> bool:
    return segment.split(".")[0].rstrip(" ").upper() in DEVICES


def safe_segments(segments: list[str]) -> bool:
    """No traversal, nothing Windows strips to one, no drive letter (`C:` in any segment, not just the
    first; `0:` is no drive: a colon elsewhere is the portable spelling's job)."""
    for segment in segments:
        if segment.strip(". ") == "":
            return False
        if len(segment) >= 2 and segment[0].isascii() and segment[0].isalpha() and segment[1] == ":":
            return False
    return True


def folded(path: str) -> str:
    """The path as an extractor that applies NFKC, best-fit slashes and HFS+'s ignorables reads it."""
    visible = "".join(c for c in path if c not in HFS_IGNORED)
    normalised = unicodedata.normalize("NFKC", visible)
    return "".join("/" if c in LOOKALIKE_SLASHES else c for c in normalised)


@settings(max_examples=500)
@given(paths)
def test_accepted_paths_are_safe_to_extract(path: str) -> None:
    """Whatever is accepted is relative, has no '..', empty, dots-only or drive-letter segment, no
    backslash, control character, line separator or bidi control, not even once look-alikes are folded."""
    try:
        accepted = check_entry_path(path)
    except UnsafeNameError:
        return
    segments = accepted.split("/")
    assert not accepted.startswith("/")
    assert "" not in segments
    assert safe_segments(segments)
    assert "\\" not in accepted
    assert not any(unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") for c in accepted)
    assert not BIDI_CONTROLS & set(accepted)
    assert all(segment.strip("".join(HFS_IGNORED)) for segment in segments)
    reading = folded(accepted)
    assert not reading.startswith("/")
    assert safe_segments([piece for piece in reading.split("/") if piece])
    assert len(accepted.encode()) <= MAX_PATH_BYTES


@settings(max_examples=500)
@given(paths)
def test_portable_paths_extract_as_written_everywhere(path: str) -> None:
    """An accepted path's portable spelling is accepted too, is its own spelling, keeps its segments, and
    has nothing Windows refuses or changes: no `<>:"|?*`, no trailing dot or space, no device name, and
    none of the invisible characters that are dropped."""
    try:
        accepted = check_entry_path(path)
    except UnsafeNameError:
        return
    spelled = portable_path(accepted)
    assert check_entry_path(spelled) == spelled
    assert portable_path(spelled) == spelled
    assert spelled.count("/") == accepted.count("/")
    for segment in spelled.split("/"):
        assert not set('<>:"|?*') & set(segment)
        assert not segment.endswith((".", " "))
        assert not is_device(segment)
        assert not DROPPED & set(segment)
    if not (set('<>:"|?*') | DROPPED) & set(accepted) and not any(
        segment.endswith((".", " ")) or is_device(segment) for segment in accepted.split("/")
    ):
        assert spelled == accepted


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("../etc/passwd", "'..' segment"),
        ("a/../../b", "'..' segment"),
        ("/abs/path", "absolute"),
        ("a\\b.txt", "backslash"),
        ("C:/windows/x", "drive letter"),
        ("c:evil", "drive letter"),
        ("x:stream", "drive letter"),
        ("album/D:x.txt", "drive letter"),
        ("a/./b", "'.' segment"),
        ("a//b", "empty path segment"),
        ("", "empty"),
        ("nul\x00byte", "control character (U+0000)"),
        ("tab\there", "control character"),
        ("new\nline", "control character"),
        ("a\u2028b.txt", "line separator (U+2028)"),
        ("para\u2029.txt", "line separator (U+2029)"),
        ("invoice\u202egpj.exe", "bidirectional control character (U+202E)"),
        ("x\u2066y\u2069.txt", "bidirectional control character (U+2066)"),
        ("\u200fname.txt", "bidirectional control character (U+200F)"),
        (".. ", "dots and spaces only"),
        ("a/.../b", "dots and spaces only"),
        ("a/ /b", "dots and spaces only"),
        ("\uff0e\uff0e\uff0fetc\uff0fpasswd", "'..' segment once look-alike characters are folded"),
        ("a/\u2025/b", "'..' segment once look-alike characters are folded"),
        ("a/..\u2215x", "'..' segment once look-alike characters are folded"),
        ("\uff3cabs", "absolute path once look-alike characters are folded"),
        ("\uff23\uff1a\uff3cx", "drive letter once look-alike characters are folded"),
        (".\u200c.", "'..' segment once look-alike characters are folded"),
        ("a/\u200b/b", "invisible characters only"),
        ("\ufeff", "invisible characters only"),
        ("é" * 600, "over 1024 bytes"),
    ],
)
def test_hostile_paths_are_rejected(path: str, reason: str) -> None:
    """Zip-slip (also through look-alikes), absolute, drive-letter, control-character, line-breaking,
    bidi-spoofing, empty and over-long paths are refused, saying why."""
    with pytest.raises(UnsafeNameError, match=re.escape(reason)):
        check_entry_path(path)


@pytest.mark.parametrize(
    ("path", "spelled"),
    [
        ("report 10:30.txt", "report 10_30.txt"),
        ("0:x", "0_x"),
        ('what?*<>|".txt', "what______.txt"),
        ("a.txt.", "a.txt"),
        ("notes ", "notes"),
        ("album. /x", "album/x"),
        ("CON", "CON_"),
        ("con.txt", "con_.txt"),
        ("Nul.tar.gz", "Nul_.tar.gz"),
        ("com1", "com1_"),
        ("LPT\u00b9.log", "LPT\u00b9_.log"),
        ("aux/aux.c", "aux_/aux_.c"),
        ("console.txt", "console.txt"),
        ("com10.txt", "com10.txt"),
        ("x\u200b.txt", "x.txt"),
        ("\ufeffbom.csv", "bom.csv"),
        ("soft\u00adhyphen", "softhyphen"),
        ("\U0001f469\u200d\U0001f4bb notes.txt", "\U0001f469\u200d\U0001f4bb notes.txt"),
        (
            "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645.txt",
            "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645.txt",
        ),
        ("\uff21\uff22\uff23\uff0f\uff24\uff25\uff26.txt", "\uff21\uff22\uff23\uff0f\uff24\uff25\uff26.txt"),
        ("Wait\u2026.txt", "Wait\u2026.txt"),
        ("\u00a5100.txt", "\u00a5100.txt"),
    ],
)
def test_names_windows_cannot_create_are_respelled(path: str, spelled: str) -> None:
    """A name that is fine where it came from but that Windows refuses or changes gets the spelling it
    would have there; emoji joiners, Persian ZWNJ, fullwidth slashes in Japanese names, an ellipsis and
    a yen sign are left as they are."""
    assert portable_path(check_entry_path(path)) == spelled


def test_entry_path_joins_folder_and_name() -> None:
    """The destination is a folder; a trailing slash is tolerated, the name must be one segment."""
    assert entry_path("album_1", "a.png") == "album_1/a.png"
    assert entry_path("album_1/", "a.png") == "album_1/a.png"
    assert entry_path("a/b", "c.png") == "a/b/c.png"
    assert entry_path(None, "c.png") == "c.png"
    assert entry_path("", "c.png") == "c.png"
    for destination, name in [("/", "x"), ("/abs", "x"), ("a", "b/c"), ("a", ""), ("..", "x")]:
        with pytest.raises(UnsafeNameError):
            entry_path(destination, name)


def test_numbered_keeps_the_extension() -> None:
    """Renamed duplicates read like a browser's downloads: `photo (1).jpg`, `backup (2).tar.gz`."""
    assert numbered("album/photo.jpg", 1) == "album/photo (1).jpg"
    assert numbered("backup.tar.gz", 2) == "backup (2).tar.gz"
    assert numbered("README", 3) == "README (3)"
    assert numbered(".bashrc", 1) == ".bashrc (1)"


def test_duplicates_are_renamed_in_request_order() -> None:
    """The first keeps its name; later ones get (1), (2); names differing only by case or NFC collide."""
    result = deduplicate(["a/photo.jpg", "a/Photo.JPG", "a/photo.jpg", "b/photo.jpg"])
    assert result == ["a/photo.jpg", "a/Photo (1).JPG", "a/photo (2).jpg", "b/photo.jpg"]
    composed, decomposed = "caf\u00e9.txt", "cafe\u0301.txt"
    assert deduplicate([composed, decomposed]) == [composed, "cafe\u0301 (1).txt"]


def test_renaming_never_takes_a_later_entrys_name() -> None:
    """A rename skips names that other entries have, so no entry that was unique gets renamed."""
    assert deduplicate(["x.jpg", "x.jpg", "x (1).jpg"]) == ["x.jpg", "x (2).jpg", "x (1).jpg"]


def test_a_file_named_like_a_folder_is_renamed() -> None:
    """`a` as a file beside `a/b` could not be extracted; the file is renamed."""
    assert deduplicate(["a", "a/b"]) == ["a (1)", "a/b"]


safe_segment = st.text(alphabet=st.sampled_from("aAbBcC.é\u0301É_-日本"), min_size=1, max_size=6).filter(
    lambda s: s.strip(".") != "" and not (len(s) > 1 and s[1] == ":")  # dots alone are refused
)


@given(st.lists(st.lists(safe_segment, min_size=1, max_size=3).map("/".join), min_size=1, max_size=30))
def test_deduplicated_paths_never_collide(paths_in: list[str]) -> None:
    """After renaming, no two entries collide under NFC + case folding, and order and count are kept."""
    result = deduplicate(paths_in)
    assert len(result) == len(paths_in)
    keys = [collision_key(p) for p in result]
    assert len(set(keys)) == len(keys)
    # Paths that collided with nothing keep their names.
    for original, final in zip(paths_in, result, strict=True):
        if sum(collision_key(p) == collision_key(original) for p in paths_in) == 1 and final != original:
            assert any(collision_key(p).startswith(collision_key(original) + "/") for p in paths_in)


def _folders(path: str) -> Iterable[str]:
    segments = path.split("/")
    for end in range(1, len(segments)):
        yield "/".join(segments[:end])


def quadratic_deduplicate(paths: Sequence[str]) -> list[str]:
    """`names.deduplicate` as it was before it was made linear (probing from 1 for every duplicate, every
    folder prefix stored): the reference the linear one must agree with on every input."""
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


# Pieces that collide under NFC and case folding in awkward ways: ß/ss/ẞ, long s, the Kelvin sign, a
# dotted capital I (folds to two code points), combining marks at a segment's start, U+0338 (composes
# with `=`), Hangul jamo (compose into syllables), and what renaming itself writes: ` (1)`, extensions.
tricky_piece = st.sampled_from(
    ["a", "A", "ß", "ss", "SS", "ẞ", "ſ", "K", "k", "e", "\u0301", "é", "\u0338", "=", "İ", "i", "\u0307",
     "ﬆ", "st", "\u1100", "\u1161", "가", "日", ".", " ", " (1)", " (2)", "(", ")", "1", ".jpg", ".JPG",
     ".tar", ".gz", ".tar.gz", ".TAR.GZ", ".zſt", ".tar.zst"]
)  # fmt: skip
tricky_segment = st.lists(tricky_piece, min_size=1, max_size=4).map("".join)
tricky_path = st.lists(tricky_segment, min_size=1, max_size=3).map("/".join)


@st.composite
def colliding_paths(draw: st.DrawFn) -> list[str]:
    """A few distinct paths, repeated, renamed-looking and nested into each other in request order."""
    pool = draw(st.lists(tricky_path, min_size=1, max_size=6))
    variants = pool + [numbered(p, draw(st.integers(1, 3))) for p in pool] + [p.upper() for p in pool]
    variants += [f"{p}/{draw(tricky_segment)}" for p in variants]
    return draw(st.lists(st.sampled_from(variants), min_size=1, max_size=40))


def outcome(function: object, paths: list[str]) -> object:
    try:
        return function(paths)  # type: ignore[operator]
    except UnsafeNameError as exc:
        return ("rejected", str(exc))


@settings(max_examples=1500)
@given(colliding_paths())
def test_linear_renaming_matches_the_quadratic_one(paths_in: list[str]) -> None:
    """Same names as the old algorithm for every generated request, including the rejections."""
    assert outcome(deduplicate, paths_in) == outcome(quadratic_deduplicate, paths_in)


@given(
    st.lists(st.sampled_from(["photo.jpg", "Photo.JPG", "photo (2).jpg", "photo", "photo/x"]), max_size=60)
)
def test_linear_renaming_matches_on_album_shapes(paths_in: list[str]) -> None:
    """Many copies of a name beside names renaming would produce: the shape that was quadratic."""
    assert deduplicate(paths_in) == quadratic_deduplicate(paths_in)


@given(tricky_path, st.integers(1, 12))
def test_a_numbered_key_is_built_from_the_keys_of_its_parts(path: str, number: int) -> None:
    """What lets paths share a counter: the key of `head (n).ext` is key(head) + ` (n)` + key(ext)."""
    # Where the number goes, as deduplicate splits it: a path may hold ` (1)` already, so the split
    # cannot be read back from the numbered name.
    head, extension = _split_for_number(path)
    assert numbered(path, number) == f"{head} ({number}){extension}"
    assert collision_key(numbered(path, number)) == (
        collision_key(head) + f" ({number})" + collision_key(extension)
    )
