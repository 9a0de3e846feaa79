"""Entry-name rules and duplicate renaming (contract §2), mostly as properties over generated names."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
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
