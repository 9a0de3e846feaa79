"""Entry-name rules and duplicate renaming (contract §2), mostly as properties over generated names."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archiver.names import (
    MAX_PATH_BYTES,
    UnsafeNameError,
    check_entry_path,
    collision_key,
    deduplicate,
    entry_path,
    numbered,
)

segment_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/"), min_size=0, max_size=12
)
paths = st.lists(segment_text, min_size=1, max_size=4).map("/".join) | st.text(max_size=40)


@given(paths)
def test_accepted_paths_are_safe_to_extract(path: str) -> None:
    """Whatever is accepted is relative, has no '..' or empty segment, no backslash or control character."""
    try:
        accepted = check_entry_path(path)
    except UnsafeNameError:
        return
    segments = accepted.split("/")
    assert not accepted.startswith("/")
    assert ".." not in segments and "." not in segments and "" not in segments
    assert "\\" not in accepted
    assert not any(unicodedata.category(c) == "Cc" for c in accepted)
    assert len(accepted.encode()) <= MAX_PATH_BYTES
    assert not (len(segments[0]) >= 2 and segments[0][1] == ":" and segments[0][0].isascii())


@pytest.mark.parametrize(
    "path",
    [
        "../etc/passwd",
        "a/../../b",
        "/abs/path",
        "a\\b.txt",
        "C:/windows/x",
        "c:evil",
        "a/./b",
        "a//b",
        "",
        "nul\x00byte",
        "tab\there",
        "new\nline",
        "é" * 600,
    ],
)
def test_hostile_paths_are_rejected(path: str) -> None:
    """Zip-slip, absolute, drive-letter, control-character, empty and over-long paths are refused."""
    with pytest.raises(UnsafeNameError):
        check_entry_path(path)


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
    lambda s: s not in (".", "..") and not (len(s) > 1 and s[1] == ":")
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
    name = path.rpartition("/")[2]
    extension = numbered(name, number).rpartition(f" ({number})")[2]
    head = path[: len(path) - len(extension)]
    assert collision_key(numbered(path, number)) == (
        collision_key(head) + f" ({number})" + collision_key(extension)
    )
