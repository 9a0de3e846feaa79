"""Hostile or huge requests cost bounded time and memory (issue 11; docs/settings.md, Memory; contract §1,
request, and §2, entry names).

Three layers: generated bodies of each shape planned in this process (the plan is safe, or the failure
is a clear code); each shape at the largest size the limits let reach the worker, read and planned in a
fresh process whose peak RSS is held to the memory formula (docs/settings.md) (planning time is a benchmark,
`python -m bench.planning`, never asserted); and the real worker answering smaller ones end to end,
its archive opened by every reader. 50,000 HEADs against moto take minutes, so the largest sizes stop
after planning, which is what their size costs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from archiver import worker
from archiver.errors import PermanentError
from archiver.models import parse_request, plan_archive
from archiver.names import check_entry_path, collision_key, portable_path
from archiver.request import MAX_POINTER_BYTES, decode_body
from archiver.settings import MiB, load_settings
from archiver.startup import baseline_bytes
from bench.planning import SHAPES, bound_mib, measure
from tests.conftest import Stack
from tests.zipcheck import check_archive

IDLE_WORKER_MIB = baseline_bytes() / MiB  # docs/settings.md, Memory: interpreter, boto3, the idle worker
MAX_FILES = 400

# ------------------------------------------------------------------------ generated bodies, in process

name_piece = st.sampled_from(
    ["photo", "Photo", "PHOTO", ".jpg", ".JPG", ".tar.gz", " (1)", " (2)", "é", "e\u0301", "ß", "ss",
     "CON", "aux", "nul", ":", "?", "*", '"', " ", ".", "\u200b", "\ufeff", "\u200d", "\U0001f600",
     "\u202e", "\u2028", "\uff0e\uff0e", "\uff0f", "C:", "a", "b"]
)  # fmt: skip
hostile_name = st.lists(name_piece, min_size=1, max_size=4).map("".join)


@st.composite
def album(draw: st.DrawFn) -> list[dict[str, str]]:
    """The same photo many times into one folder, beside names renaming itself would produce."""
    count = draw(st.integers(1, 120))
    names = draw(st.lists(st.sampled_from(["photo.jpg", "Photo.JPG", "photo (1).jpg", "photo"]), min_size=1))
    return [{"source": "p/x", "destination": "album", "name": names[i % len(names)]} for i in range(count)]


@st.composite
def deep(draw: st.DrawFn) -> list[dict[str, str]]:
    """Long chains of one-letter folders, some ending where another entry's folder is."""
    count, depth = draw(st.integers(1, 20)), draw(st.integers(1, 500))
    letters = draw(st.text(alphabet="aAbB", min_size=1, max_size=3))
    folder = "/".join(letters[i % len(letters)] for i in range(depth))
    return [
        {"source": f"k{i}", "destination": folder if i % 2 else folder.rsplit("/", 1)[0], "name": "a"}
        for i in range(count)
    ]


@st.composite
def hostile_names(draw: st.DrawFn) -> list[dict[str, str]]:
    """Names of every class that is refused or respelled, in folders and file names."""
    return [
        {"source": f"k/{draw(hostile_name)}"}
        | ({"destination": draw(hostile_name)} if draw(st.booleans()) else {})
        | ({"name": draw(hostile_name)} if draw(st.booleans()) else {})
        for _ in range(draw(st.integers(1, 8)))
    ]


shaped_files = st.lists(album() | deep() | hostile_names(), min_size=1, max_size=3).map(
    lambda parts: [spec for part in parts for spec in part]
)
flood = st.integers(1, 3 * 7 * MAX_FILES)
shaped_bodies = (
    shaped_files.map(lambda files: json.dumps({"files": files}))
    | flood.map(lambda count: "[" + ",".join(["{}"] * count) + "]")
    | flood.map(lambda count: '{"files":[{"source":"a"}],"x":[' + "0," * count + "0]}")
)


@settings(max_examples=400, deadline=None)
@given(shaped_bodies)
def test_generated_shapes_plan_safely_or_fail_clearly(body: str) -> None:
    """Albums of duplicates, deep paths, hostile names and value floods: planned into unique, safe,
    portable paths, one per file, with exactly the changed ones renamed; or refused as invalid_request
    or too_large."""
    configured = load_settings(
        sqs_source_queue="in", sqs_destination_queue="out", s3_source_bucket="src-bucket",
        s3_destination_bucket="zip-bucket", max_files=MAX_FILES,
    )  # fmt: skip
    try:
        document = decode_body(body, max_files=MAX_FILES)
        event("decoded")
        request = parse_request(document)
        event("validated")
        plan = plan_archive(request, settings=configured, message_id="m")
    except PermanentError as exc:
        event(f"refused: {exc.code}")
        assert exc.code in {"invalid_request", "too_large"}, exc.message
        assert exc.message
        return
    event(f"planned, {'some' if plan.renamed else 'none'} renamed")
    paths = [entry.path for entry in plan.entries]
    assert len(paths) == len(request.files)
    assert len({collision_key(path) for path in paths}) == len(paths)
    folders = {collision_key(path.rsplit("/", 1)[0]) for path in paths if "/" in path}
    assert not folders & {collision_key(path) for path in paths}
    for path, spec in zip(paths, request.files, strict=True):
        assert check_entry_path(path) == path
        assert portable_path(path) == path
        name = spec.name if spec.name is not None else spec.source.rsplit("/", 1)[-1]
        asked = f"{spec.destination.rstrip('/')}/{name}" if spec.destination else name
        assert (path != asked) == any(r.source == spec.source and r.name == path for r in plan.renamed)


# ------------------------------------------------------- each shape at its largest, in its own process


@pytest.mark.slow
@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_shape_at_its_largest_fits_the_memory_formula(
    stack: Stack, moto_endpoint: str, shape: str
) -> None:
    """The largest body of each shape that reaches the worker (8 MiB through a pointer, or MAX_FILES
    files) is read from S3 and planned by a fresh process at the default settings: the answer is the
    expected one, and its peak RSS is within the memory formula of docs/settings.md (idle worker +
    planning term)."""
    spec = SHAPES[shape]
    max_files = 50_000  # the default
    body = spec.body(MAX_POINTER_BYTES, max_files)
    assert len(body) <= MAX_POINTER_BYTES
    stack.put(f"requests/{shape}.json", body)
    result = measure(moto_endpoint, stack.source_bucket, f"requests/{shape}.json")
    assert result["outcome"] == spec.outcome, result["detail"]
    planning = bound_mib(len(body), max_files, width=spec.width)
    assert result["idle_mib"] <= IDLE_WORKER_MIB
    assert result["peak_mib"] <= IDLE_WORKER_MIB + planning, result
    assert result["peak_mib"] - result["idle_mib"] <= planning, result


# --------------------------------------------------------------------------- the worker, end to end


def test_the_worker_archives_an_album_of_hostile_names(stack: Stack, tmp_path: Path) -> None:
    """One request of each planned shape, smaller: 150 copies of one photo, a 1,000-byte deep path and
    names Windows cannot create. The notification lists every renamed entry; every reader opens the
    archive and finds every entry under its planned name."""
    stack.put("p/photo.jpg", b"jpeg")
    stack.put("k/x", b"x")
    deep_folder = "/".join("d" * 490)
    files: list[dict[str, Any]] = [{"source": "p/photo.jpg", "destination": "album"} for _ in range(150)]
    files += [{"source": "k/x", "destination": deep_folder, "name": "bottom.txt"}]
    respelled = ["CON.txt", "report 10:30.log", "notes. ", "z\u200b.txt", "aux.c", "a.txt", "a.txt."]
    files += [{"source": "k/x", "destination": "names", "name": name} for name in respelled]
    files += [
        {"source": "k/x", "destination": "names", "name": "\U0001f469\u200d\U0001f4bb \u0645\u06cc\u200c.txt"}
    ]
    stack.send({"request_id": "hostile-album", "files": files})
    worker.run(worker.connect(stack.settings()), burst=True)

    (note,) = stack.notifications(1)
    assert note["status"] == "completed", note
    album_names = ["album/photo.jpg"] + [f"album/photo ({i}).jpg" for i in range(1, 150)]
    names = ["CON_.txt", "report 10_30.log", "notes", "z.txt", "aux_.c", "a.txt", "a (1).txt"]
    expected = dict.fromkeys(album_names, b"jpeg")
    expected[f"{deep_folder}/bottom.txt"] = b"x"
    expected |= {f"names/{name}": b"x" for name in names}
    expected["names/\U0001f469\u200d\U0001f4bb \u0645\u06cc\u200c.txt"] = b"x"
    renamed = {(item["source"], item["name"]) for item in note["renamed"]}
    assert len(note["renamed"]) == 149 + 6
    assert ("k/x", "names/a (1).txt") in renamed
    check_archive(stack.download(note["archive"]["key"]), expected, tmp_path)


@pytest.mark.parametrize(
    ("body", "code", "reason"),
    [
        ("[" + ",".join(["{}"] * 40_000) + "]", "too_large", "outside strings"),
        (
            json.dumps({"files": [{"source": "a", "name": "invoice\u202egpj.exe"}]}),
            "invalid_request",
            "U+202E",
        ),
        (json.dumps({"files": [{"source": "a", "destination": "\uff0e\uff0e"}]}), "invalid_request", "'..'"),
    ],
)
def test_the_worker_refuses_hostile_bodies_with_a_clear_code(
    stack: Stack, body: str, code: str, reason: str
) -> None:
    """Through SQS as producers send them: a value flood, a bidi-spoofed name and look-alike traversal
    each end in one failed notification with its code, and the message is gone."""
    stack.send(body)
    worker.run(worker.connect(stack.settings(max_files=100)), burst=True)
    (note,) = stack.notifications(1)
    assert note["status"] == "failed"
    assert note["error"]["code"] == code
    assert reason in note["error"]["message"]
    assert stack.queue_depth() == 0
    assert stack.archive_keys() == []
