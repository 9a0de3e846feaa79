"""Fuzzing that reaches the code under test: generated requests that are mostly valid, with hostile parts
(traversal, drive letters, control characters, look-alikes, collisions after NFC and case folding, other
buckets, missing sources, bad ids and archive names), so the safety of every accepted plan and the
archive built from it are checked on hundreds of cases, not on the few that get past validation.

The oracle is written from the contract (§2), not from archiver.names: whatever the worker accepts must
be safe to extract, unique as Windows and macOS compare names, and land under the prefix; requests
made of harmless parts only must be accepted. How many cases reached each stage is printed at the end
of the run (tests/conftest.py)."""

from __future__ import annotations

import json
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archiver import worker
from archiver.errors import PermanentError
from archiver.models import (
    RESERVED_NAMES,
    ArchivePlan,
    PlannedEntry,
    is_valid_request_id,
    parse_request,
    plan_archive,
)
from archiver.request import decode_body
from archiver.settings import Settings, load_settings
from archiver.sources import SourceObject
from archiver.zipping import CHUNK_SIZE, ZipEntry, zip_chunks
from tests.conftest import Stack, report_stages
from tests.zipcheck import check_with_tools, check_with_zipfile

PREFIX = "download"
SOURCE = "source-bucket"
OTHER = "other-bucket"  # an allowed bucket besides the default one; the stack's own name replaces it
_random = random.Random(17)
# The sources that exist: key -> (body, Content-Type). Keys that collide once normalised and folded.
POOL: dict[str, tuple[bytes, str]] = {
    "in/a.txt": (b"alpha\n" * 50, "text/plain"),
    "in/photo.jpg": (_random.randbytes(3000), "image/jpeg"),
    "in/Photo.JPG": (_random.randbytes(2000), "image/jpeg"),
    "in/Été/café.txt": ("crème brûlée\n".encode() * 30, "text/plain"),
    "in/\u00e9t\u00e9.txt": (b"nfc\n" * 10, "text/plain"),
    "in/e\u0301te\u0301.txt": (b"nfd\n" * 12, "text/plain"),
    "in/deep/x/y/z.bin": (_random.randbytes(1500), "application/octet-stream"),
    "in/noext": (b"\x89PNG" + bytes(900), "image/png"),
    "in/archive.tar.gz": (_random.randbytes(700), "application/gzip"),
    "in/東京/夜景 (1).png": (_random.randbytes(800), "image/png"),
}
OTHER_KEY = "in/a.txt"  # also in the other bucket
# Sources that are not in the pool: missing, forbidden, malformed, or named so no entry name follows.
HOSTILE_SOURCES = [
    "in/missing.txt",
    "s3://forbidden-bucket/in/a.txt",
    "s3://" + OTHER,
    "s3:///in/a.txt",
    "in/",
    "in/..",
    "in/.",
    "in/a\x01b.txt",
    "in/C:evil.txt",
    "in/" + "x" * 1030,
]
# Path segments and whole paths an attacker (or a careless producer) writes.
HOSTILE_SEGMENTS = [
    *("..", ".", "", " ", "...", ". .", "C:", "c:evil", "a\\b", "\x00", "nul\x00byte", "\x1f", "tab\there"),
    *(
        "\u202egnp.exe",
        "\u200b",
        ".\u200c.",
        "\uff0e\uff0e",
        "e\u0301",
        "É",
        "ｆｉｌｅ",
        "CON",
        "aux.txt",
        "a:b",
    ),
    *("trailing.", "trailing ", "<>|?*", "%2e%2e", "~", "$HOME", "\u2028", "a" * 300),
]
HOSTILE_FOLDERS = [
    "/etc",
    "a//b",
    "album/",
    "C:\\x",
    "../x",
    "x/..",
    "./x",
    "/",
    "x/./y",
    "\\\\server\\share",
]
HOSTILE_IDS = ["", ".", "..", "a/b", "../x", "é", "x" * 129, "a b", "a\x00"]
HOSTILE_ARCHIVE_NAMES = ["", "..", ".", "../x.zip", "a/b.zip", "status.json", "Status.JSON", "C:x.zip"]
HOSTILE_ARCHIVE_NAMES += ["decision.json", "DECISION.json", "manifest.json"]
HOSTILE_ARCHIVE_NAMES += ["\x00.zip", " ", "x" * 1100 + ".zip", "\u202epiz.exe"]

SAFE_SEGMENT = r"[A-Za-z0-9éü東]([A-Za-z0-9éü東 ._()-]{0,12}[A-Za-z0-9éü東])?"
safe_segment = st.from_regex(SAFE_SEGMENT, fullmatch=True)


@dataclass(frozen=True)
class Case:
    """One generated request, and whether it was made of harmless parts only."""

    request: dict[str, Any]
    clean: bool


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """A request whose every part is harmless most of the time and hostile now and then."""
    clean = True

    def part(harmless: st.SearchStrategy[Any], hostile: list[Any], *, odds: int = 20) -> Any:
        """One part: hostile once in `odds`, so that most requests get past validation."""
        nonlocal clean
        if draw(st.integers(1, odds)) < odds:
            return draw(harmless)
        clean = False
        return draw(st.sampled_from(hostile))

    files = []
    for _ in range(draw(st.integers(1, 5))):
        other = f"s3://{OTHER}/{OTHER_KEY}"
        spec: dict[str, Any] = {"source": part(st.sampled_from([*POOL, other]), HOSTILE_SOURCES)}
        if draw(st.booleans()):
            folder = st.lists(safe_segment, min_size=1, max_size=3).map("/".join)
            if draw(st.integers(0, 3)):
                spec["destination"] = part(folder, HOSTILE_FOLDERS)
            else:
                segments = [
                    part(safe_segment, HOSTILE_SEGMENTS, odds=10) for _ in range(draw(st.integers(1, 3)))
                ]
                spec["destination"] = "/".join(segments) + draw(st.sampled_from(["", "/"]))
        if draw(st.integers(0, 2)) == 0:
            spec["name"] = part(safe_segment.map(lambda stem: stem + ".dat"), HOSTILE_SEGMENTS, odds=10)
        files.append(spec)
    request: dict[str, Any] = {"files": files}
    if draw(st.integers(0, 4)):
        request_id = part(
            st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,30}", fullmatch=True), HOSTILE_IDS, odds=8
        )
        request["request_id"] = request_id
    if draw(st.booleans()):
        name = safe_segment.map(lambda stem: stem + ".zip")
        request["archive_name"] = part(name, HOSTILE_ARCHIVE_NAMES, odds=5)
    for key, values in (("on_missing", ["fail", "skip"]), ("compression", ["auto", "store", "deflate"])):
        if draw(st.booleans()):
            request[key] = draw(st.sampled_from(values))
    if draw(st.booleans()):
        request["metadata"] = {"user": draw(st.text(max_size=10)), "n": draw(st.integers())}
    return Case(request, clean)


# -------------------------------------------------------------------------------------------- the oracle


BIDI_CONTROLS = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
DROPPED_INVISIBLES = set("\u00ad\u200b\u2060\u2061\u2062\u2063\u2064\ufeff")
HFS_IGNORED = {
    chr(point)
    for low, high in ((0xAD, 0xAD), (0x200B, 0x200F), (0x202A, 0x202E))
    for point in range(low, high + 1)
} | {chr(point) for point in (*range(0x2060, 0x2065), *range(0x206A, 0x2070), 0xFEFF)}
DEVICE = re.compile(r"(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³]|conin\$|conout\$)(\.|$)", re.IGNORECASE)


def unsafe(path: str) -> str | None:
    """What makes an accepted entry path unsafe or not as written on every system (contract §2), or
    None. Accepted means refused nothing of the refused list, and respelled where a platform would not
    create the name as written."""
    if path == "" or path.startswith("/") or "\\" in path:
        return "empty, absolute or with a backslash"
    if len(path.encode()) > 1024:
        return "over 1,024 bytes"
    for char in path:
        if unicodedata.category(char) in ("Cc", "Cs") or char in "\u2028\u2029":
            return f"a control character or line separator (U+{ord(char):04X})"
        if char in BIDI_CONTROLS or char in DROPPED_INVISIBLES:
            return f"a bidirectional control or an invisible character (U+{ord(char):04X})"
        if char in '<>:"|?*':
            return f"{char!r}, which Windows does not take"
    folded_path = unicodedata.normalize("NFKC", "".join(c for c in path if c not in HFS_IGNORED))
    for segments in (path.split("/"), folded_path.replace("\u2215", "/").replace("\u2044", "/").split("/")):
        for segment in segments:
            if segment.strip(". ") == "":
                return f"a segment of dots and spaces only, or empty ({segment!r})"
            if re.match(r"[A-Za-z]:", segment):
                return "a drive letter"
            if segment != segment.rstrip(". "):
                return f"a segment ending in a dot or a space ({segment!r})"
            if DEVICE.match(segment):
                return f"a device name ({segment!r})"
    return None


def folded(path: str) -> str:
    return unicodedata.normalize("NFC", path).casefold()


def assert_safe(plan: ArchivePlan, request: dict[str, Any]) -> None:
    """Every entry extractable as it is named, no two alike, the archive under its request's folder."""
    paths = [entry.path for entry in plan.entries]
    assert len(paths) == len(request["files"])
    for path in paths:
        assert unsafe(path) is None, f"{path!r} was accepted: {unsafe(path)}"
    keys = [folded(path) for path in paths]
    assert len(set(keys)) == len(keys), f"two entries alike once folded: {paths}"
    folders = {key.rsplit("/", depth)[0] for key in keys for depth in range(1, key.count("/") + 1)}
    assert not folders & set(keys), f"a file named like another entry's folder: {paths}"
    prefix, request_id, name = plan.key.split("/")
    assert (prefix, request_id) == (PREFIX, plan.request_id)
    problem = unsafe(name)
    assert problem is None and folded(name) not in RESERVED_NAMES, plan.key
    assert request_id not in (".", "..")


# -------------------------------------------------------------------------------------------- in memory


def pure_settings() -> Settings:
    return load_settings(
        sqs_source_queue="requests",
        sqs_destination_queue="notifications",
        s3_source_bucket=SOURCE,
        s3_destination_bucket="zips",
        allowed_source_buckets=OTHER,
        s3_file_prefix=PREFIX,
    )


def held(
    plan: ArchivePlan, source_bucket: str, other_bucket: str
) -> Iterator[tuple[PlannedEntry, bytes, str]]:
    """(entry, body, Content-Type) of the planned entries whose source exists."""
    for entry in plan.entries:
        bucket, key = entry.ref.bucket, entry.ref.key
        if (bucket == source_bucket and key in POOL) or (bucket == other_bucket and key == OTHER_KEY):
            body, content_type = POOL[key]
            yield entry, body, content_type


def zipped(plan: ArchivePlan) -> tuple[bytes, dict[str, bytes]]:
    """The archive zip_chunks writes for the plan's existing sources, and what it must hold."""
    entries, bodies = [], []
    for entry, body, content_type in held(plan, SOURCE, OTHER):
        obj = SourceObject(
            ref=entry.ref,
            size=len(body),
            etag='"e"',
            last_modified=datetime(2025, 1, 2, 3, 4, 6, tzinfo=UTC),
            content_type=content_type,
            crc32=None,
        )
        entries.append(ZipEntry(entry.path, obj))
        bodies.append(body)

    def open_source(index: int, _: SourceObject) -> Iterator[bytes]:
        body = bodies[index]
        return iter([body[start : start + CHUNK_SIZE] for start in range(0, len(body), CHUNK_SIZE)])

    data = b"".join(zip_chunks(entries, open_source=open_source, compression=plan.request.compression))
    return data, {entry.path: body for entry, body in zip(entries, bodies, strict=True)}


def test_generated_requests_plan_safely_and_zip_back() -> None:
    """Hundreds of generated requests: each is refused with a permanent error naming the problem, or
    planned safely and written into an archive that reads back entry for entry."""
    stages: Counter[str] = Counter()
    config = pure_settings()

    @settings(max_examples=500, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(cases())
    def check(case: Case) -> None:
        stages["generated"] += 1
        try:
            plan = plan_archive(
                parse_request(decode_body(json.dumps(case.request), max_files=config.max_files)),
                settings=config,
                message_id="m-1",
            )
        except PermanentError as exc:
            assert not case.clean, f"a request of harmless parts was refused: {exc.message}"
            assert exc.code in ("invalid_request", "forbidden_source"), exc
            stages[f"refused ({exc.code})"] += 1
            return
        stages["planned"] += 1
        assert_safe(plan, case.request)
        data, expected = zipped(plan)
        if expected:
            check_with_zipfile(data, expected)
            stages["zipped and read back"] += 1

    check()
    report_stages("generated requests, planned and zipped in memory", dict(stages))
    assert stages["planned"] >= stages["generated"] * 0.5, stages
    assert stages["zipped and read back"] >= 200, stages


def test_each_hostile_part_alone_is_refused_or_made_safe() -> None:
    """Every hostile token in every place it can go, in an otherwise harmless request: left to chance,
    a token that turns up once in a hundred requests could go untried in a run."""
    stages: Counter[str] = Counter()
    config = pure_settings()
    base = {"files": [{"source": "in/a.txt", "destination": "album"}, {"source": "in/photo.jpg"}]}
    places = {
        "folder": lambda token: {"destination": f"album/{token}/x"},
        "destination": lambda token: {"destination": token},
        "name": lambda token: {"name": token},
        "key": lambda token: {"source": f"in/{token}"},
        "archive_name": lambda token: token,
        "request_id": lambda token: token,
    }
    tokens = [*HOSTILE_SEGMENTS, *HOSTILE_FOLDERS, *HOSTILE_ARCHIVE_NAMES, *HOSTILE_IDS]
    for place, make in places.items():
        for token in tokens:
            request: dict[str, Any] = json.loads(json.dumps(base))
            if place in ("archive_name", "request_id"):
                request[place] = make(token)
            else:
                request["files"][0].update(make(token))
            stages["tried"] += 1
            try:
                plan = plan_archive(parse_request(request), settings=config, message_id="m-1")
            except PermanentError as exc:
                assert exc.code == "invalid_request", (place, token, exc)
                stages["refused"] += 1
                continue
            assert_safe(plan, request)
            stages["accepted and safe"] += 1
    report_stages("each hostile part alone", dict(stages))


# -------------------------------------------------------------------------------------------- end to end


def test_generated_requests_through_the_worker(stack: Stack, tmp_path: Any) -> None:
    """Two hundred generated requests through the real worker on moto: every message settled, each
    request answered as planned locally (a refusal with the same code, or an archive at the planned
    key holding the planned entries, read back), nothing written outside the prefix."""
    for key, (body, content_type) in POOL.items():
        stack.put(key, body, ContentType=content_type)
    stack.put(OTHER_KEY, POOL[OTHER_KEY][0], bucket=stack.other_bucket)
    drawn: list[Case] = []

    @settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(cases())
    def collect(case: Case) -> None:
        drawn.append(case)

    collect()
    config = stack.settings()
    stages: Counter[str] = Counter()
    expected: dict[str, tuple[str, ArchivePlan | None]] = {}  # answered under this id -> outcome, plan
    for number, case in enumerate(drawn):
        request = json.loads(json.dumps(case.request).replace(OTHER, stack.other_bucket))
        request_id = request.get("request_id")
        if is_valid_request_id(request_id) and len(request_id) < 100:
            request["request_id"] = request_id = f"{request_id}-{number}"  # a reused id is refused
        message_id = stack.send(request)
        stages["sent"] += 1
        try:
            plan = plan_archive(parse_request(request), settings=config, message_id=message_id)
        except PermanentError as exc:
            # Answered under its request_id when that is usable on its own, else under the MessageId.
            expected[request_id if is_valid_request_id(request_id) else message_id] = (exc.code, None)
            continue
        assert_safe(plan, request)
        present = list(held(plan, stack.source_bucket, stack.other_bucket))
        missing = len(present) < len(plan.entries)
        refused = not present or (missing and plan.request.on_missing == "fail")
        expected[plan.request_id] = ("source_not_found" if refused else "completed", plan)
    worker.run(worker.connect(config), burst=True)

    notes = stack.notifications(len(drawn), max_polls=len(drawn))
    assert len(notes) == len(drawn)
    for note in notes:
        outcome, plan = expected.pop(note["request_id"])
        got = note["status"] if note["status"] == "completed" else note["error"]["code"]
        assert got == outcome, note
        if plan is None or outcome != "completed":
            assert note["error"]["retryable"] is False
            stages[f"refused ({got})"] += 1
            continue
        assert note["archive"]["key"] == plan.key
        data = stack.download(plan.key)
        bodies = {entry.path: body for entry, body, _ in held(plan, stack.source_bucket, stack.other_bucket)}
        check_with_zipfile(data, bodies)
        stages["archived and read back"] += 1
        if stages["archived and read back"] <= 3:  # the independent readers too, on a few
            path = tmp_path / f"{stages['archived and read back']}.zip"
            path.write_bytes(data)
            check_with_tools(path, list(bodies))
    assert expected == {}
    for key in stack.archive_keys():
        assert key.startswith(f"{PREFIX}/") and ".." not in key.split("/"), key
    assert stack.queue_depth() == 0
    report_stages("generated requests through the worker", dict(stages))
    assert stages["archived and read back"] >= 100, stages
