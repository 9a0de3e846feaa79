"""Request parsing and planning (contract §1): typed, strict, and every rejection says why."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archiver.errors import PermanentError
from archiver.models import (
    Request,
    json_schemas,
    parse_request,
    plan_archive,
    request_digest,
    salvage_context,
)
from archiver.request import decode_body, extended_client_pointer
from archiver.settings import Settings, load_settings

CONTRACT_EXAMPLE = {
    "files": [
        {"source": "example-directory/uuid1.png", "destination": "album_1"},
        {"source": "s3://foobar/example-directory/uuid2.png", "destination": "album_1"},
        {"source": "example-directory/uuid3.png", "destination": "album_2", "name": "cover.png"},
        {"source": "example-directory/readme.txt"},
    ],
    "metadata": {"user_email": "someone@example.com"},
}


@pytest.fixture
def settings_() -> Settings:
    return load_settings(
        sqs_source_queue="in",
        sqs_destination_queue="out",
        s3_source_bucket="source-images",
        s3_destination_bucket="zip-storage",
        allowed_source_buckets="foobar",
        max_files=10,
    )


def plan(document: Any, settings_: Settings) -> Any:
    return plan_archive(parse_request(document), settings=settings_, message_id="msg-1")


def test_contract_example_plans_the_documented_paths(settings_: Settings) -> None:
    """The contract's example request yields the entry paths, buckets and key the contract describes."""
    result = plan(CONTRACT_EXAMPLE, settings_)
    assert [e.path for e in result.entries] == [
        "album_1/uuid1.png",
        "album_1/uuid2.png",
        "album_2/cover.png",
        "readme.txt",
    ]
    assert [e.ref.bucket for e in result.entries] == [
        "source-images",
        "foobar",
        "source-images",
        "source-images",
    ]
    assert result.entries[1].ref.key == "example-directory/uuid2.png"
    assert result.request_id == "msg-1"
    assert result.key == "download/msg-1/msg-1.zip"
    assert result.bucket == "zip-storage"


def test_request_id_and_archive_name_fix_the_key(settings_: Settings) -> None:
    """`request_id` and `archive_name` replace the MessageId defaults in the archive key."""
    document = {**CONTRACT_EXAMPLE, "request_id": "order-42", "archive_name": "photos.zip"}
    assert plan(document, settings_).key == "download/order-42/photos.zip"


@pytest.mark.parametrize("request_id", ["CON", "nul", "LPT1", "com9"])
def test_a_default_archive_name_windows_reserves_is_respelled(settings_: Settings, request_id: str) -> None:
    """`<request_id>.zip` is a file people save: a request_id that is a device name gets the entries'
    respelling (`CON_.zip`), while an archive_name given so is refused (contract §2, entry names)."""
    key = plan({**CONTRACT_EXAMPLE, "request_id": request_id}, settings_).key
    assert key == f"download/{request_id}/{request_id}_.zip"


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ({"file": [{"source": "a"}]}, "file: Extra inputs are not permitted"),
        ({"files": []}, "files: List should have at least 1 item"),
        ({"files": [{"source": ""}]}, "files.0.source"),
        ({"files": [{"source": "a", "dest": "x"}]}, "files.0.dest: Extra inputs are not permitted"),
        ({"files": ["a.png"]}, "files.0: Input should be a valid dictionary"),
        ({"files": "a.png"}, "files"),
        ({"files": [{"source": "a"}], "on_missing": "ignore"}, "on_missing"),
        ({"files": [{"source": "a"}], "compression": "zstd"}, "compression"),
        ({"files": [{"source": "a"}], "request_id": "../x"}, "request_id"),
        ({"files": [{"source": "a"}], "request_id": ".."}, "request_id"),
        ({"files": [{"source": "a"}], "archive_name": "a/b.zip"}, "archive_name"),
        ({"files": [{"source": "a"}], "metadata": [1, 2]}, "metadata"),
    ],
)
def test_schema_violations_name_the_field(document: dict[str, Any], reason: str) -> None:
    """Each schema violation is a permanent invalid_request whose message names the offending field."""
    with pytest.raises(PermanentError) as caught:
        parse_request(document)
    assert caught.value.code == "invalid_request"
    assert reason in caught.value.message


@pytest.mark.parametrize(
    ("files", "code", "reason"),
    [
        ([{"source": "a.png", "destination": "../up"}], "invalid_request", "'..'"),
        ([{"source": "a.png", "destination": "/abs"}], "invalid_request", "absolute"),
        ([{"source": "a.png", "name": "..\\evil.png"}], "invalid_request", "backslash"),
        ([{"source": "dir/"}], "invalid_request", "non-empty"),
        ([{"source": "s3://elsewhere/a.png"}], "forbidden_source", "'elsewhere'"),
        ([{"source": "s3://foobar"}], "invalid_request", "s3://bucket/key"),
        ([{"source": f"k{i}"} for i in range(11)], "too_large", "MAX_FILES"),
    ],
)
def test_planning_rejects_unsafe_or_forbidden(
    settings_: Settings, files: list[Any], code: str, reason: str
) -> None:
    """Unsafe names, forbidden buckets and too many files fail permanently, naming the entry."""
    with pytest.raises(PermanentError) as caught:
        plan({"files": files}, settings_)
    assert caught.value.code == code
    assert reason in caught.value.message


def test_duplicate_names_are_renamed_and_reported(settings_: Settings) -> None:
    """Two sources landing on the same path get `photo (1).jpg` and appear in `renamed`."""
    result = plan({"files": [{"source": "a/photo.jpg"}, {"source": "b/PHOTO.jpg"}]}, settings_)
    assert [e.path for e in result.entries] == ["photo.jpg", "PHOTO (1).jpg"]
    assert [(r.source, r.name) for r in result.renamed] == [("b/PHOTO.jpg", "PHOTO (1).jpg")]


@pytest.mark.parametrize(
    ("archive_name", "reason"),
    [
        ("..", "'..' segment"),
        (".", "'.' segment"),
        ("a\x00.zip", "control character (U+0000)"),
        ("C:x.zip", "drive letter"),
        ("c:", "drive letter"),
        ("\uff23\uff1a.zip", "drive letter"),
        ("\uff0e\uff0e", "'..' segment"),
        ("\u202epiz.exe", "bidirectional control character"),
        ("CON.zip", "'CON_.zip'"),
        ("photos 10:30.zip", "'photos 10_30.zip'"),
        ("photos.zip.", "'photos.zip'"),
        ("photos.zip ", "'photos.zip'"),
        ("a/b.zip", "not a path"),
        ("STATUS.json", "reserved"),
        ("", "empty"),
    ],
)
def test_archive_name_follows_the_entry_name_rules(
    settings_: Settings, archive_name: str, reason: str
) -> None:
    """`archive_name` is refused, naming it, for what an entry name is refused for, and also for what an
    entry would be renamed for: it has no `renamed` list to be reported in. Planned, so a missing check
    would show as an archive key holding `..`, NUL or `C:`."""
    with pytest.raises(PermanentError) as caught:
        plan({**CONTRACT_EXAMPLE, "request_id": "r-1", "archive_name": archive_name}, settings_)
    assert caught.value.code == "invalid_request"
    assert "archive_name" in caught.value.message
    assert reason in caught.value.message


def test_names_windows_cannot_create_are_renamed_and_reported(settings_: Settings) -> None:
    """Trailing dots, colons and device names get their Windows spelling, listed in `renamed`; `a.txt.`
    is then `a.txt`, which Windows would make of it, so it is a duplicate of `a.txt`."""
    files = [
        {"source": "k/a.txt"},
        {"source": "k/b", "name": "a.txt."},
        {"source": "logs/10:30.log"},
        {"source": "src/aux.c", "destination": "src/"},
        {"source": "k/z\u200b.txt"},
    ]
    result = plan({"files": files}, settings_)
    assert [e.path for e in result.entries] == ["a.txt", "a (1).txt", "10_30.log", "src/aux_.c", "z.txt"]
    assert [(r.source, r.name) for r in result.renamed] == [
        ("k/b", "a (1).txt"),
        ("logs/10:30.log", "10_30.log"),
        ("src/aux.c", "src/aux_.c"),
        ("k/z\u200b.txt", "z.txt"),
    ]


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ({"source": "invoice\u202egpj.exe"}, "bidirectional control character (U+202E)"),
        ({"source": "a.png", "destination": "\uff0e\uff0e/\uff0e\uff0e"}, "'..' segment once look-alike"),
        ({"source": "a.png", "destination": "ok/C:"}, "drive letter"),
        ({"source": "a.png", "destination": ".. "}, "dots and spaces only"),
        ({"source": "a.png", "name": "line\u2028break.png"}, "line separator"),
    ],
)
def test_planning_names_the_entry_with_an_unsafe_name(settings_: Settings, spec: Any, reason: str) -> None:
    """Every rejected class fails the request with invalid_request naming files[i] and its source."""
    with pytest.raises(PermanentError) as caught:
        plan({"files": [{"source": "fine.png"}, spec]}, settings_)
    assert caught.value.code == "invalid_request"
    assert caught.value.message.startswith(f"files[1] ({spec['source']}): ")
    assert reason in caught.value.message


@pytest.mark.parametrize(
    "body",
    ["", "not json", "{", '{"files": [}', '{"files": 1, "files": 2}', "[" * 100_000 + "]" * 100_000],
)
def test_undecodable_bodies_are_invalid_requests(body: str) -> None:
    """Bad JSON, duplicate keys and absurd nesting are permanent invalid_request errors, not crashes."""
    with pytest.raises(PermanentError) as caught:
        parse_request(decode_body(body, max_files=50_000))
    assert caught.value.code == "invalid_request"


def test_extended_client_pointer_is_recognised() -> None:
    """The AWS extended client's pointer body is detected; a malformed one is rejected."""
    pointer = ["software.amazon.payloadoffloading.PayloadS3Pointer", {"s3BucketName": "b", "s3Key": "k"}]
    assert extended_client_pointer(pointer) == ("b", "k")
    assert extended_client_pointer({"files": []}) is None
    with pytest.raises(PermanentError):
        extended_client_pointer(["software.amazon.payloadoffloading.PayloadS3Pointer", {"s3Key": "k"}])


def test_salvage_keeps_usable_request_id_and_metadata() -> None:
    """A failed body's own request_id and metadata still reach its failure notification when valid."""
    assert salvage_context({"request_id": "r-1", "metadata": {"a": 1}, "file": []}) == ("r-1", {"a": 1})
    assert salvage_context({"request_id": "../x", "metadata": "nope"}) == (None, {})
    assert salvage_context([1, 2]) == (None, {})


def test_schema_validates_the_contract_example() -> None:
    """`archiver schema` describes the request the contract documents, with unknown fields forbidden."""
    schema = json_schemas()["request"]
    assert schema["additionalProperties"] is False
    assert set(CONTRACT_EXAMPLE) <= set(schema["properties"])
    assert Request.model_validate(CONTRACT_EXAMPLE).files[2].name == "cover.png"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
hostile_files = st.lists(
    st.fixed_dictionaries(
        {"source": st.text(max_size=40) | st.just("s3://source-images/../../x") | st.just("s3://evil/a")},
        optional={
            "destination": st.text(max_size=30) | st.sampled_from(["..", "/", "a/../..", "C:\\", "\x00"]),
            "name": st.text(max_size=30) | st.sampled_from(["..", ".", "a\\b", "ｆｉｌｅ", "e\u0301"]),
        },
    ),
    max_size=6,
)
hostile_documents = (
    json_values
    | st.fixed_dictionaries(
        {"files": hostile_files}, optional={"metadata": json_values, "request_id": json_values}
    )
    | st.dictionaries(
        st.sampled_from(["files", "Files", "FILES", "metadata", "ﬁles"]), json_values, max_size=3
    )
)


@settings(max_examples=300)
@given(hostile_documents)
def test_any_document_plans_safely_or_fails_permanently(document: Any) -> None:
    """Whatever a producer sends, planning ends in a safe plan under the prefix or a PermanentError."""
    configured = load_settings(
        sqs_source_queue="in", sqs_destination_queue="out", s3_source_bucket="source-images",
        s3_destination_bucket="zip-storage",
    )  # fmt: skip
    try:
        body = json.dumps(document)
        document = decode_body(body, max_files=configured.max_files)
        result = plan_archive(parse_request(document), settings=configured, message_id="m")
    except PermanentError as exc:
        assert exc.code in {"invalid_request", "forbidden_source", "too_large"}
        assert exc.message
        return
    assert result.key.startswith("download/")
    assert ".." not in result.key.split("/")
    assert all(e.ref.bucket == "source-images" for e in result.entries)
    assert all(".." not in e.path.split("/") and not e.path.startswith("/") for e in result.entries)


def test_deep_metadata_and_long_keys_are_refused(settings_: Settings) -> None:
    """Metadata too deep to echo, and an archive key past S3's 1,024 bytes, are invalid requests."""
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(40):
        node["x"] = {}
        node = node["x"]
    with pytest.raises(PermanentError, match="nest deeper"):
        parse_request({"files": [{"source": "a"}], "metadata": deep})
    assert salvage_context({"metadata": deep}) == (None, {})
    long_name = "é" * 200 + ".zip"  # 404 bytes, within the entry-name limit
    request = {"files": [{"source": "a"}], "request_id": "r" * 128, "archive_name": long_name}
    assert plan(request, settings_).key.endswith(".zip")
    too_long = load_settings(**{**settings_.model_dump(), "s3_file_prefix": "p" * 600})
    with pytest.raises(PermanentError, match="1024 bytes"):
        plan(request, too_long)


optional_text = st.none() | st.text(max_size=8)
valid_requests = st.fixed_dictionaries(
    {"files": st.lists(
        st.fixed_dictionaries(
            {"source": st.text(min_size=1, max_size=12) | st.just(',"metadata":')},
            optional={"destination": optional_text, "name": optional_text},
        ),
        min_size=1,
        max_size=5,
    )},
    optional={
        "metadata": st.dictionaries(st.text(max_size=8) | st.just(',"metadata":'), json_values, max_size=4),
        "request_id": st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True),
        "archive_name": st.from_regex(r"[a-z ()é]{1,8}\.zip", fullmatch=True),
        "on_missing": st.sampled_from(["fail", "skip"]),
        "compression": st.sampled_from(["auto", "store", "deflate"]),
    },
)  # fmt: skip


@given(valid_requests)
def test_the_digest_is_the_one_status_documents_already_hold(document: dict[str, Any]) -> None:
    """Hashed a file at a time, the digest is still SHA-256 of the whole request's canonical JSON: status
    documents written before keep matching their requests."""
    request = Request.model_validate(document)
    canonical = json.dumps(request.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    assert request_digest(request) == hashlib.sha256(canonical.encode()).hexdigest()
