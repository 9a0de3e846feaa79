"""Reading a body within a memory bound (contract §1, request): values are counted before decoding, and
no valid request is ever refused by the count."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archiver import request
from archiver.errors import PermanentError
from archiver.models import MAX_METADATA_BYTES, Request
from archiver.request import decode_body, json_values, max_json_values

text = st.text(max_size=10)
metadata_values = st.recursive(
    st.none() | st.booleans() | st.integers() | text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=30,
)
valid_documents = st.fixed_dictionaries(
    {"files": st.lists(
        st.fixed_dictionaries(
            {"source": st.text(min_size=1, max_size=10)},
            optional={"destination": st.none() | text, "name": st.none() | text},
        ),
        min_size=1,
        max_size=20,
    )},
    optional={
        "metadata": st.dictionaries(text, metadata_values, max_size=5),
        "request_id": st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True),
        "archive_name": st.just("a.zip"),
        "on_missing": st.just("skip"),
        "compression": st.just("store"),
    },
)  # fmt: skip
layouts = st.sampled_from(
    [{}, {"separators": (",", ":")}, {"indent": 2}, {"indent": "\t", "separators": (" , ", " : ")}]
)


@settings(max_examples=300)
@given(valid_documents, layouts)
def test_no_valid_request_has_more_values_than_the_bound(document: dict[str, Any], layout: Any) -> None:
    """Whatever its layout, a request that validates fits the count for its own number of files."""
    Request.model_validate(document)
    body = json.dumps(document, **layout)
    assert json_values(body) <= max_json_values(len(document["files"]))
    assert decode_body(body, max_files=len(document["files"])) == document


def test_the_densest_valid_metadata_fits() -> None:
    """Metadata of 64 KiB made of `[]` has the most structural characters per byte JSON allows."""
    metadata = {"k": [[]] * ((MAX_METADATA_BYTES - 16) // 4)}
    assert len(json.dumps(metadata)) <= MAX_METADATA_BYTES
    files = [{"source": "s", "destination": "d", "name": "n"}] * 3
    document = {"files": files, "metadata": metadata, "request_id": "r", "archive_name": "a.zip",
                "on_missing": "skip", "compression": "store"}  # fmt: skip
    Request.model_validate(document)
    assert decode_body(json.dumps(document, separators=(",", ":")), max_files=3) == document


def test_values_inside_strings_do_not_count() -> None:
    """Only structure counts: names full of `{[,:` (escaped quotes included) cost nothing extra."""
    body = json.dumps({"files": [{"source": '{[,:]} \\" ,,,', "name": "a:b,c"}]}, separators=(",", ":"))
    assert json_values(body) == 1 + 1 + 1 + 1 + 2 + 1  # { "files": [ { "source": , "name": } ] }


@pytest.mark.parametrize(
    "body",
    [
        "[" + ",".join(["{}"] * 40_000) + "]",
        "[" + ",".join(["[]"] * 40_000) + "]",
        '{"files": [{"source": "a"}], "x": [' + ",".join(["0"] * 80_000) + "]}",
        '{"files": [' + ",".join(['{"source": "a"}'] * 25_000) + "]}",
    ],
)
def test_more_values_than_a_request_can_hold_are_refused_undecoded(
    body: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`[{},{},…]` would be 24 times its size once decoded; it is refused as too_large, naming the
    count and MAX_FILES, without json.loads ever running."""

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded a body the count refuses")

    monkeypatch.setattr(request.json, "loads", never)
    with pytest.raises(PermanentError) as caught:
        decode_body(body, max_files=1_000)
    assert caught.value.code == "too_large"
    assert "MAX_FILES (1000)" in caught.value.message


def test_a_request_at_the_bound_is_decoded() -> None:
    """The bound is exact enough that a request of MAX_FILES full entries passes it."""
    files = [{"source": f"k{i}", "destination": "d", "name": f"n{i}"} for i in range(1_000)]
    body = json.dumps({"files": files, "metadata": {}})
    assert decode_body(body, max_files=1_000)["files"] == files
