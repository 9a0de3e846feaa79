"""The decision code at its edges, without any AWS: the fast tests `make mutation` runs its mutants
against (docs/mutation.md), beside test_settle, test_names, test_models, test_crc and test_media.

Each test pins a boundary or a default that a one-token change would move: a limit's last accepted
value, the part of a name a duplicate's number goes before, the digest stored with every request."""

from __future__ import annotations

import hashlib
import json
import zlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from archiver import crc
from archiver.assembly import COPY_EXTRA_PARTS, MAX_COPY_PIECE, plan_copies
from archiver.decision import Decision
from archiver.errors import PermanentError, shown
from archiver.models import (
    MAX_METADATA_DEPTH,
    RequestOptions,
    not_text,
    parse_cancel,
    parse_request,
    parse_source,
    plan_archive,
    request_digest,
    salvage_context,
    utc_timestamp,
)
from archiver.names import UnsafeNameError, check_entry_path, deduplicate, entry_path, numbered, portable_path
from archiver.request import (
    EXTENDED_CLIENT_POINTER,
    decode_body,
    extended_client_pointer,
    json_values,
    load_document,
    max_json_values,
)
from archiver.settings import MAX_PARTS, MiB, Settings, load_settings
from archiver.settle import FailedNotice, Outcome, Settlement, decide, release_delay
from archiver.status import WORKER_ID
from archiver.zipping import ZipEntry, archive_size_bound, is_precompressed
from tests.synthetic import Synthetic

COPY_MIN = 16 * MiB


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "sqs_source_queue": "requests",
        "sqs_destination_queue": "notifications",
        "s3_source_bucket": "src",
        "s3_destination_bucket": "zips",
        "part_size": 5 * MiB,
    }
    return load_settings(**(values | overrides))


def refused(document: Any, **overrides: Any) -> PermanentError:
    with pytest.raises(PermanentError) as caught:
        plan_archive(parse_request(document), settings=settings(**overrides), message_id="m-1")
    return caught.value


# ------------------------------------------------------------------------------------------ settling


def test_a_failure_without_a_code_or_message_is_reported_as_internal() -> None:
    """The notice always has a code a consumer knows, on a permanent failure and on the last delivery."""
    assert decide(
        Outcome("failed"), receive_count=1, max_receive_count=5, visibility_timeout=60
    ) == Settlement(delete=True, failed_notice=FailedNotice("internal", "", retryable=False), status="failed")
    last = decide(
        Outcome("released", error="boom"), receive_count=5, max_receive_count=5, visibility_timeout=60
    )
    assert last.failed_notice == FailedNotice("internal", "gave up after 5 attempts: boom", retryable=True)


def test_the_release_delay_stops_doubling_at_4096_seconds() -> None:
    """2^12 s, then flat below SQS's 12-hour visibility: the shift never runs away on a long-lived loop."""
    assert [release_delay(n, 43_200) for n in (11, 12, 13, 40)] == [2048, 4096, 4096, 4096]


# ------------------------------------------------------------------------------------------ compression


def test_a_content_type_with_several_parameters_is_still_its_type() -> None:
    assert is_precompressed("statement", "application/pdf; version=1.7; charset=binary")
    assert not is_precompressed("notes", "text/plain; charset=utf-8; format=flowed")


# ------------------------------------------------------------------------------------------ copy planning


def media(name: str, size: int) -> ZipEntry:
    kind = "text/plain" if name.endswith(".txt") else "video/mp4"
    return ZipEntry(name, Synthetic(name, kind, size=size).source(0))


def test_copies_are_planned_for_uncompressed_entries_from_the_threshold_up() -> None:
    entries = [media("a.mp4", COPY_MIN), media("b.txt", COPY_MIN), media("c.mp4", COPY_MIN - 1)]
    on = settings(server_side_copy_min_bytes=COPY_MIN)
    assert plan_copies(entries, on, "auto") == ({0}, 5 * MiB)
    assert plan_copies(entries, on, "store") == ({0, 1}, 5 * MiB)
    assert plan_copies(entries, on, "deflate") == (set(), 5 * MiB)
    assert plan_copies(entries, settings(server_side_copy_min_bytes=0), "store") == (set(), 5 * MiB)


def test_copies_leave_room_for_their_part_numbers() -> None:
    """An archive big enough to need bigger parts: a copied entry's spare part numbers are set aside, so
    the part size is the smallest whole MiB that fits in the rest (here one more than streaming needs)."""
    entries = [media("film.mp4", 72_250_000_000)]
    bound = archive_size_bound(entries)
    copied, part_size = plan_copies(entries, settings(server_side_copy_min_bytes=COPY_MIN), "auto")
    room = MAX_PARTS - COPY_EXTRA_PARTS
    assert (copied, part_size) == ({0}, 8 * MiB)
    assert part_size * room >= bound > (part_size - MiB) * room
    streamed, streamed_part_size = plan_copies(entries, settings(server_side_copy_min_bytes=0), "auto")
    assert (streamed, streamed_part_size) == (set(), 7 * MiB)
    assert streamed_part_size * MAX_PARTS >= bound


def test_copies_stop_where_their_part_numbers_or_sizes_could_pass_s3s_limits() -> None:
    on = settings(server_side_copy_min_bytes=COPY_MIN)
    most = MAX_PARTS // 2 // COPY_EXTRA_PARTS
    many = [media(f"{index}.mp4", COPY_MIN) for index in range(most + 1)]
    assert plan_copies(many[:most], on, "auto")[0] == set(range(most))
    assert plan_copies(many, on, "auto")[0] == set()
    entries = [media("a.mp4", COPY_MIN)]
    biggest = settings(server_side_copy_min_bytes=COPY_MIN, part_size=MAX_COPY_PIECE)
    assert plan_copies(entries, biggest, "auto") == ({0}, MAX_COPY_PIECE)
    over = settings(server_side_copy_min_bytes=COPY_MIN, part_size=MAX_COPY_PIECE + MiB)
    assert plan_copies(entries, over, "auto") == (set(), MAX_COPY_PIECE + MiB)


# ------------------------------------------------------------------------------------------ CRC-32


def test_crc_of_chunks_is_the_crc_of_their_bytes() -> None:
    assert crc.of([]) == 0
    assert crc.of([b"ab", b"", b"cd"]) == zlib.crc32(b"abcd")


def test_a_base64_crc_with_stray_characters_is_not_one() -> None:
    assert crc.from_base64("AAAAAA==") == 0  # four zero bytes
    assert crc.from_base64("AA*AAAA==") is None
    assert crc.from_base64("AQIDBA==") == 0x01020304  # big-endian, as S3 sends it


# ------------------------------------------------------------------------------------------ names


def unsafe(path: str) -> str:
    with pytest.raises(UnsafeNameError) as caught:
        check_entry_path(path)
    return str(caught.value)


def test_each_refusal_says_what_is_wrong() -> None:
    assert unsafe("") == "the entry name is empty"
    assert "empty path segment" in unsafe("a//b")
    assert "drive letter" in unsafe("x/C:y")
    assert "control character (U+0007)" in unsafe("a\x07b")
    assert "over 1024 bytes" in unsafe("x" * 1025)


def test_a_path_of_exactly_1024_bytes_is_accepted() -> None:
    path = "é" * 511 + "ab"  # 1,024 bytes in UTF-8
    assert check_entry_path(path) == path


def test_a_lone_surrogate_in_a_path_is_refused() -> None:
    unsafe("photo\ud800.jpg")


def test_only_an_ascii_letter_and_a_colon_make_a_drive() -> None:
    assert check_entry_path("é:x/1:2") == "é:x/1:2"


def test_a_folder_written_with_a_trailing_slash_is_the_folder() -> None:
    assert entry_path("a/", "x.txt") == "a/x.txt"
    assert entry_path("album/", "x.txt") == "album/x.txt"


def test_a_duplicates_number_goes_before_its_last_extension() -> None:
    assert numbered("v1.0/readme", 2) == "v1.0/readme (2)"
    assert deduplicate(["x/photo.2024.jpg", "x/Photo.2024.jpg"]) == [
        "x/photo.2024.jpg",
        "x/Photo.2024 (1).jpg",
    ]
    assert deduplicate([".tar.gz", ".TAR.GZ"]) == [".tar.gz", ".TAR (1).GZ"]
    assert deduplicate(["a.tar.gz", "A.tar.gz"]) == ["a.tar.gz", "A (1).tar.gz"]


def test_a_file_named_like_a_deeper_folder_is_renamed() -> None:
    assert deduplicate(["x/y/z.txt", "x/y"]) == ["x/y/z.txt", "x/y (1)"]
    assert deduplicate(["x/y/z.txt", "x"]) == ["x/y/z.txt", "x (1)"]


# ------------------------------------------------------------------------------------------ request bodies


def test_a_body_is_decoded_with_every_value_and_no_key_twice() -> None:
    assert decode_body('{"a": 1, "b": {"c": [1, "x"]}}', max_files=10) == {"a": 1, "b": {"c": [1, "x"]}}
    with pytest.raises(PermanentError) as caught:
        decode_body('{"files": [], "files": [{"source": "a"}]}', max_files=10)
    assert caught.value.code == "invalid_request"
    assert "duplicate key 'files'" in caught.value.message
    with pytest.raises(PermanentError) as caught:
        decode_body("[" * 100_000 + "]" * 100_000, max_files=50_000)
    assert caught.value.message == "the body is not valid JSON: nested too deeply"


@pytest.mark.parametrize(
    "document",
    [
        [EXTENDED_CLIENT_POINTER],
        [EXTENDED_CLIENT_POINTER, {"s3BucketName": "b", "s3Key": "k"}, "extra"],
        ["software.amazon.payloadoffloading.Other", {"s3BucketName": "b", "s3Key": "k"}],
        [EXTENDED_CLIENT_POINTER, "s3://b/k"],
        {"s3BucketName": "b", "s3Key": "k"},
    ],
)
def test_only_a_pointer_is_taken_for_one(document: Any) -> None:
    assert extended_client_pointer(document) is None


@pytest.mark.parametrize(
    "pointer",
    [
        {"s3BucketName": "b"},
        {"s3Key": "k"},
        {"s3BucketName": "", "s3Key": "k"},
        {"s3BucketName": "b", "s3Key": 7},
    ],
)
def test_a_pointer_without_a_bucket_and_a_key_is_refused(pointer: dict[str, Any]) -> None:
    with pytest.raises(PermanentError) as caught:
        extended_client_pointer([EXTENDED_CLIENT_POINTER, pointer])
    assert (caught.value.code, caught.value.message) == (
        "invalid_request",
        "extended-client pointer without s3BucketName and s3Key",
    )
    assert extended_client_pointer([EXTENDED_CLIENT_POINTER, {"s3BucketName": "b", "s3Key": "k"}]) == (
        "b",
        "k",
    )


def test_a_lone_surrogate_is_named_where_it_is() -> None:
    assert not_text("\ud800") == "body: holds U+D800, a lone surrogate, which is not text"
    document = {"files": [{"source": "a"}], "metadata": {"user": {"name": "x\udfff"}}}
    assert not_text(document) == "metadata.user.name: holds U+DFFF, a lone surrogate, which is not text"
    assert (
        not_text({"metadata": {"\ud801": 1}})
        == "metadata.\ud801: holds U+D801, a lone surrogate, which is not text"
    )
    assert not_text({"files": [{"source": "a"}], "metadata": {"ok": ["é", 1]}}) is None
    with pytest.raises(PermanentError) as caught:
        parse_request(document)
    assert (caught.value.code, caught.value.message) == ("invalid_request", not_text(document))


def test_a_body_that_is_not_an_object_is_refused_so() -> None:
    with pytest.raises(PermanentError) as caught:
        parse_request([{"source": "a"}])
    assert (caught.value.code, caught.value.message) == ("invalid_request", "the body must be a JSON object")


def test_metadata_that_cannot_be_echoed_is_left_out_of_a_failure_notice() -> None:
    assert salvage_context({"request_id": "r-1", "metadata": {"a": "x\ud800"}}) == ("r-1", {})
    assert salvage_context({"request_id": "r-1", "metadata": {"a": [1]}, "files": 3}) == ("r-1", {"a": [1]})


def nested(depth: int) -> dict[str, Any]:
    """Metadata whose JSON nests `depth` levels, counting the metadata object itself."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"k": value}
    return value


def test_metadata_nests_at_most_32_levels() -> None:
    for deepest in (nested(MAX_METADATA_DEPTH), {"k": [[]] * 2, "l": [[[[{}]]]]}):
        parse_request({"files": [{"source": "a"}], "metadata": deepest})
    for too_deep in (nested(MAX_METADATA_DEPTH + 1), {"k": nested(MAX_METADATA_DEPTH)}):
        with pytest.raises(PermanentError, match="nest deeper than 32"):
            parse_request({"files": [{"source": "a"}], "metadata": too_deep})
    deep_list: Any = "x"
    for _ in range(MAX_METADATA_DEPTH - 1):
        deep_list = [deep_list]
    parse_request({"files": [{"source": "a"}], "metadata": {"k": deep_list[0]}})
    with pytest.raises(PermanentError, match="nest deeper than 32"):
        parse_request({"files": [{"source": "a"}], "metadata": {"k": deep_list}})


# ------------------------------------------------------------------------------------------ planning


def test_a_source_key_of_1024_bytes_is_accepted_and_longer_is_refused_naming_it() -> None:
    assert parse_source("k" * 1024, default_bucket="src").key == "k" * 1024
    key = "k" * 1025
    with pytest.raises(PermanentError) as caught:
        parse_source(key, default_bucket="src")
    assert caught.value.message == f"source key {shown(key, 64)} is over 1024 bytes"


def test_max_files_is_the_most_files_accepted() -> None:
    document = {"files": [{"source": f"{index}.txt"} for index in range(3)]}
    assert (
        len(plan_archive(parse_request(document), settings=settings(max_files=3), message_id="m").entries)
        == 3
    )
    assert refused(document, max_files=2).code == "too_large"


def test_an_entry_is_named_after_the_last_segment_of_its_key() -> None:
    plan = plan_archive(
        parse_request({"files": [{"source": "a/b/c.txt"}, {"source": "s3://src/d/e/f.txt"}]}),
        settings=settings(),
        message_id="m-1",
    )
    assert [entry.path for entry in plan.entries] == ["c.txt", "f.txt"]


def test_a_duplicate_renamed_past_the_length_limit_is_refused() -> None:
    long_name = "n" * 1019 + ".txt"  # 1,023 bytes: its duplicate, `… (1).txt`, would be 1,027
    files = [{"source": "a.txt", "name": long_name}, {"source": "b.txt", "name": long_name}]
    error = refused({"files": files})
    assert (error.code, error.message) == ("invalid_request", "entry path is over 1024 bytes in UTF-8")


def test_the_archive_key_may_be_1024_bytes_and_no_more() -> None:
    # download/<request_id>/<name>: 8 + 1 + 5 + 1 + name
    fits = {"files": [{"source": "a"}], "request_id": "r-id1", "archive_name": "z" * 1005 + ".zip"}
    plan = plan_archive(parse_request(fits), settings=settings(), message_id="m-1")
    assert len(plan.key.encode()) == 1024
    error = refused({**fits, "archive_name": "z" * 1006 + ".zip"})
    assert (error.code, error.message) == ("invalid_request", "the archive key would be over S3's 1024 bytes")


def test_the_plan_carries_its_request_and_the_digest_stored_with_it() -> None:
    request = parse_request({"files": [{"source": "a.txt"}], "request_id": "digest-1"})
    plan = plan_archive(request, settings=settings(), message_id="m-1")
    assert plan.request == RequestOptions(on_missing="fail", compression="auto", metadata={})
    assert plan.digest == request_digest(request)


def test_the_request_digest_is_stable_across_versions() -> None:
    """Stored in status.json and compared by the next worker, perhaps of a newer version: its canonical
    form (defaults filled in, keys sorted, no spaces) must not change, or every request completed before
    an upgrade would be refused as a different request under its own request_id."""
    request = parse_request({"metadata": {"b": 1, "a": [2]}, "files": [{"source": "x/é.txt", "name": "y"}]})
    canonical = (
        '{"archive_name":null,"compression":"auto",'
        '"files":[{"destination":null,"name":"y","source":"x/\\u00e9.txt"}],'
        '"metadata":{"a":[2],"b":1},"on_missing":"fail","request_id":null}'
    )
    assert request_digest(request) == hashlib.sha256(canonical.encode()).hexdigest()


# ------------------------------------------------------------------------------------------ since issue 11


def test_a_refusal_names_the_path_as_written_and_whether_folding_found_it() -> None:
    assert unsafe("a/../b") == "'a/../b' has a '..' segment"
    folded = "a/\uff0e\uff0e/b"  # fullwidth dots: `..` once NFKC folds them
    assert unsafe(folded) == f"{shown(folded)} has a '..' segment once look-alike characters are folded"
    hidden = "\u200b/x"  # HFS+ ignores U+200B: an empty first segment there
    assert unsafe(hidden) == f"{shown(hidden)} has a segment of invisible characters only"


def test_a_segment_of_spaces_first_or_a_trailing_slash_is_refused() -> None:
    assert "dots and spaces only" in unsafe(" /x")
    assert "empty path segment" in unsafe("a/")


def test_a_device_name_is_respelled_whatever_else_the_path_holds() -> None:
    """A path holding every device stem somewhere is still checked for a device segment."""
    assert portable_path("prn-aux-nul-com-lpt/con.txt") == "prn-aux-nul-com-lpt/con_.txt"
    assert portable_path("console/connect.txt") == "console/connect.txt"


def test_a_lone_surrogate_in_a_list_is_found() -> None:
    document = {"metadata": {"a": ["ok", "x\ud800"]}}
    assert not_text(document) == "metadata.a.1: holds U+D800, a lone surrogate, which is not text"


def test_a_body_may_hold_exactly_as_many_values_as_the_bound() -> None:
    most = max_json_values(1)
    head = '{"files":[{"source":"a"}],"metadata":{"k":['
    fill = most - json_values(head + "0]}}")
    body = head + ",".join(["0"] * (fill + 1)) + "]}}"
    assert json_values(body) == most
    assert decode_body(body, max_files=1)["files"] == [{"source": "a"}]
    with pytest.raises(PermanentError) as caught:
        decode_body(body.replace("[0,", "[0,0,", 1), max_files=1)
    assert caught.value.code == "too_large"


def test_a_body_is_followed_only_to_an_allowed_bucket() -> None:
    """Decided before any S3 call: a plain body is the request, a pointer elsewhere is refused, and the
    bound on values is MAX_FILES's."""
    config = settings(max_files=2)
    plain = load_document(None, config, '{"files": [{"source": "a"}]}')  # type: ignore[arg-type]
    assert plain == {"files": [{"source": "a"}]}
    pointer = json.dumps([EXTENDED_CLIENT_POINTER, {"s3BucketName": "elsewhere", "s3Key": "k"}])
    with pytest.raises(PermanentError) as caught:
        load_document(None, config, pointer)  # type: ignore[arg-type]
    assert (caught.value.code, caught.value.message) == (
        "forbidden_source",
        "request pointer names bucket 'elsewhere', which is not allowed",
    )
    # Three values a file: more than 2 files and the metadata allowance can hold.
    crowded = '{"files": [' + ",".join(['{"source": "a"}'] * 25_000) + "]}"
    with pytest.raises(PermanentError) as caught:
        load_document(None, config, crowded)  # type: ignore[arg-type]
    assert caught.value.code == "too_large"


def test_a_cancel_binds_until_its_expiry_and_a_completion_for_good() -> None:
    """`expires_at` is the first moment a cancel no longer binds; a completion has none."""
    moment = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
    cancel = Decision("r", "cancelled", decided_at="2026-12-01T11:00:00Z", expires_at="2026-12-01T12:00:00Z")
    assert cancel.binds(moment - timedelta(seconds=1))
    assert not cancel.binds(moment)
    completion = Decision("r", "completed", decided_at="2026-12-01T11:00:00Z")
    assert completion.binds(moment + timedelta(days=10_000))
    assert not completion.cancels
    assert not cancel.binds() and not cancel.cancels  # now: long past that expiry
    ahead = Decision(
        "r", "cancelled", decided_at="", expires_at=utc_timestamp(datetime.now(UTC) + timedelta(hours=1))
    )
    assert ahead.binds() and ahead.cancels
    document = json.loads(cancel.document())
    assert document == {
        "request_id": "r",
        "decision": "cancelled",
        "decided_at": "2026-12-01T11:00:00Z",
        "expires_at": "2026-12-01T12:00:00Z",
        "worker": WORKER_ID,
    }


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"cancel": {"request_id": "."}}, "cancel.request_id: Value error, must not be made of dots only"),
        ({"cancel": {"request_id": "a" * 129}}, "cancel.request_id: String should match pattern"),
        ({"cancel": {"request_id": "a", "b": 1}}, "cancel.b: Extra inputs are not permitted"),
        ({"cancel": {"request_id": "a"}, "x": 1}, "x: Extra inputs are not permitted"),
        ({}, "cancel: Field required"),
    ],
)
def test_a_cancel_names_one_valid_request_id_and_nothing_else(body: dict[str, Any], problem: str) -> None:
    assert parse_cancel({"cancel": {"request_id": "a" * 128}}).cancel.request_id == "a" * 128
    with pytest.raises(PermanentError) as caught:
        parse_cancel(body)
    assert caught.value.code == "invalid_request"
    assert caught.value.message.startswith(f"invalid cancel: {problem}")
