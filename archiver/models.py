"""The request and notification models (contract §1 and §4) and the plan of one archive.

`parse_request` turns a message body into a `Request`; `plan_archive` checks it against the settings
(allowed buckets, limits, entry names) and fixes every entry's path and the archive's key, before any S3
call is made.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from pydantic.dataclasses import dataclass as pydantic_dataclass

from archiver.errors import PermanentError, shown
from archiver.names import UnsafeNameError, check_entry_path, deduplicate, entry_path, portable_path
from archiver.notices import Notification, RenamedEntry
from archiver.settings import Settings

MAX_KEY_BYTES = 1024
# Echoed metadata must serialise again into the notification; pydantic and json stop at some depth.
MAX_METADATA_DEPTH = 32
# ...and fit in an SQS message beside the rest of the notification.
MAX_METADATA_BYTES = 64 * 1024


def json_depth(value: Any) -> int:
    """Nesting depth of a decoded JSON value, without recursion (the value may be hostile)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return deepest


# Documents archiver keeps next to an archive, which an archive must not be named.
RESERVED_NAMES = {
    "status.json": "the name of the request's status document",
    "decision.json": "the name of the document that decides a cancel against a completion",
    "manifest.json": "the name of the archive's manifest",
}

REQUEST_ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
RequestId = Annotated[str, StringConstraints(pattern=REQUEST_ID_PATTERN)]


def is_valid_request_id(value: object) -> bool:
    """A request id becomes a key segment, so `.` and `..` are refused as well as the pattern's misses."""
    return (
        isinstance(value, str) and re.fullmatch(REQUEST_ID_PATTERN, value) is not None and set(value) != {"."}
    )


# A pydantic dataclass with slots, not a BaseModel: 64 bytes per file instead of 488 (a BaseModel keeps a
# __dict__ and a set of the fields set), 23 MiB less while a request of 50,000 files is planned.
@pydantic_dataclass(config=ConfigDict(extra="forbid"), frozen=True, slots=True)
class FileSpec:
    """One object to put in the archive."""

    source: str = Field(min_length=1, description="a key in S3_SOURCE_BUCKET, or s3://bucket/key")
    destination: str | None = Field(default=None, description="folder inside the zip; empty = root")
    name: str | None = Field(default=None, description="file name; default: last segment of the key")


class Request(BaseModel):
    """An archive request, the body of a source-queue message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    files: list[FileSpec] = Field(min_length=1)
    metadata: dict[str, Any] = Field(default_factory=dict, description="echoed in the notification")
    request_id: RequestId | None = Field(default=None, description="idempotency key; default MessageId")
    archive_name: str | None = Field(default=None, description="default <request_id>.zip")
    on_missing: Literal["fail", "skip"] = "fail"
    compression: Literal["auto", "store", "deflate"] = "auto"

    @field_validator("metadata")
    @classmethod
    def _shallow(cls, value: dict[str, Any]) -> dict[str, Any]:
        if json_depth(value) > MAX_METADATA_DEPTH:
            raise ValueError(f"must not nest deeper than {MAX_METADATA_DEPTH} levels")
        if len(json.dumps(value).encode()) > MAX_METADATA_BYTES:
            raise ValueError(
                f"must be at most {MAX_METADATA_BYTES} bytes of JSON (it is echoed in a notification)"
            )
        return value

    @field_validator("request_id")
    @classmethod
    def _not_dots(cls, value: str | None) -> str | None:
        if value is not None and not is_valid_request_id(value):
            raise ValueError("must not be made of dots only")
        return value

    @field_validator("archive_name")
    @classmethod
    def _one_segment(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if "/" in value:
            raise ValueError("must be a file name, not a path")
        if value.casefold() in RESERVED_NAMES:
            raise ValueError(f"{value!r} is reserved: {RESERVED_NAMES[value.casefold()]}")
        try:
            checked = check_entry_path(value)
        except UnsafeNameError as exc:
            raise ValueError(str(exc)) from None
        # An entry is renamed and listed in `renamed`; there is no such list for the archive's own name.
        if (spelled := portable_path(checked)) != checked:
            raise ValueError(f"must be a name every system can create as written, such as {shown(spelled)}")
        return checked


class CancelTarget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: RequestId = Field(description="the request_id of the request to cancel")

    @field_validator("request_id")
    @classmethod
    def _not_dots(cls, value: str) -> str:
        if not is_valid_request_id(value):
            raise ValueError("must not be made of dots only")
        return value


class CancelMessage(BaseModel):
    """A cancel, the body of a source-queue message (contract §1): `{"cancel": {"request_id": "…"}}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cancel: CancelTarget


def utc_timestamp(moment: datetime | None = None) -> str:
    return (moment or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------- parsing


# What a dataclass's errors say, in the words a model's say for the same mistake.
_PLAIN_MESSAGES = {
    "unexpected_keyword_argument": "Extra inputs are not permitted",
    "dataclass_type": "Input should be a valid dictionary",
}


def describe_validation_error(exc: ValidationError, *, limit: int = 5) -> str:
    problems = []
    for error in exc.errors()[:limit]:
        where = ".".join(str(part) for part in error["loc"]) or "body"
        problems.append(f"{where}: {_PLAIN_MESSAGES.get(error['type'], error['msg'])}")
    more = len(exc.errors()) - limit
    return "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _holds_surrogate(document: Any) -> bool:
    stack = [document]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return True
        elif isinstance(value, dict):
            stack.extend(value)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return False


def not_text(document: Any) -> str | None:
    """Where a decoded body holds a lone surrogate (`"\\ud800"` is valid JSON, and what a producer that
    cuts a UTF-16 string inside an emoji sends), as `metadata.user`; None when it is all text. Such a
    string can be neither a key nor echoed: UTF-8 has no encoding for it. Where is only worked out when
    there is one: a path string per value is ~6 MiB for 50,000 files."""
    if not _holds_surrogate(document):
        return None
    stack: list[tuple[Any, str]] = [(document, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if found := _SURROGATE.search(value):
                point = f"U+{ord(found.group()):04X}"
                return f"{where or 'body'}: holds {point}, a lone surrogate, which is not text"
        elif isinstance(value, dict):
            for key, child in value.items():
                path = f"{where}.{key}" if where else str(key)
                stack.append((child, path))
                stack.append((key, path))
        elif isinstance(value, list):
            stack.extend((child, f"{where}.{index}") for index, child in enumerate(value))
    return None


def parse_request(document: Any) -> Request:
    """Validate a decoded body into a `Request`, or raise a permanent `invalid_request` error."""
    if not isinstance(document, dict):
        raise PermanentError("invalid_request", "the body must be a JSON object")
    if (problem := not_text(document)) is not None:
        raise PermanentError("invalid_request", problem)
    try:
        return Request.model_validate(document)
    except ValidationError as exc:
        raise PermanentError("invalid_request", describe_validation_error(exc)) from None


def parse_cancel(document: Any) -> CancelMessage:
    """Validate a decoded cancel body, or raise a permanent `invalid_request` error."""
    try:
        return CancelMessage.model_validate(document)
    except ValidationError as exc:
        raise PermanentError("invalid_request", f"invalid cancel: {describe_validation_error(exc)}") from None


def _echoable(metadata: dict[str, Any]) -> bool:
    if not_text(metadata) is not None:
        return False
    try:
        Request.model_validate({"files": [{"source": "x"}], "metadata": metadata})
    except ValidationError:
        return False
    return True


def salvage_context(document: Any) -> tuple[str | None, dict[str, Any]]:
    """The request_id and metadata of a body that failed validation, when they are usable on their own,
    so that its failure notification still reaches the producer with what it sent."""
    if not isinstance(document, dict):
        return None, {}
    request_id = document.get("request_id")
    metadata = document.get("metadata")
    return (
        request_id if is_valid_request_id(request_id) else None,
        metadata if isinstance(metadata, dict) and _echoable(metadata) else {},
    )


# ---------------------------------------------------------------------------------------------- planning


@dataclass(frozen=True, slots=True)
class SourceRef:
    """Where one entry's bytes come from."""

    source: str  # as written in the request, for notifications
    bucket: str
    key: str


@dataclass(frozen=True, slots=True)
class PlannedEntry:
    ref: SourceRef
    path: str  # the entry path inside the zip, after renaming
    renamed: bool = False  # the path is not the one the request asked for


@dataclass(frozen=True, slots=True)
class RequestOptions:
    """What the build needs of the request besides its entries. The plan keeps this rather than the
    request, so the request's files are freed once planned: the entries hold what they said."""

    on_missing: Literal["fail", "skip"]
    compression: Literal["auto", "store", "deflate"]
    metadata: dict[str, Any]


@dataclass(frozen=True)
class ArchivePlan:
    request: RequestOptions
    request_id: str
    digest: str  # of the request as validated: a request_id is bound to one request
    bucket: str
    key: str
    entries: tuple[PlannedEntry, ...]

    @property
    def renamed(self) -> tuple[RenamedEntry, ...]:
        """The entries whose path changed, made when the notification is: as models they are ~500 bytes
        each, which 50,000 renamed duplicates would hold through the whole build."""
        return tuple(RenamedEntry(source=e.ref.source, name=e.path) for e in self.entries if e.renamed)


def parse_source(source: str, *, default_bucket: str) -> SourceRef:
    if source.startswith("s3://"):
        bucket, _, key = source[len("s3://") :].partition("/")
        if not bucket or not key:
            raise PermanentError("invalid_request", f"source {shown(source)} is not s3://bucket/key")
        bucket = sys.intern(bucket)  # one string per bucket, not one per entry
    else:
        bucket, key = default_bucket, source
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise PermanentError("invalid_request", f"source key {shown(key, 64)} is over {MAX_KEY_BYTES} bytes")
    return SourceRef(source=source, bucket=bucket, key=key)


def request_digest(request: Request) -> str:
    """SHA-256 of the request in a canonical form (keys sorted, defaults filled in): two bodies that ask
    for the same thing have the same digest, whatever their key order or spacing.

    The canonical form is `json.dumps(request.model_dump(mode="json"), sort_keys=True, separators=(",",
    ":"))`, hashed a file at a time rather than built whole: a dump of 50,000 files is ~20 MiB. `files`
    sorts just before `metadata`, which every request has, and `,"metadata":` cannot occur inside an
    encoded string, whose quotes are escaped."""
    encode = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode
    rest = encode(request.model_dump(mode="json", exclude={"files"}))
    cut = rest.index(',"metadata":')
    digest = hashlib.sha256(rest[:cut].encode())
    digest.update(b',"files":[')
    for index, spec in enumerate(request.files):
        entry = encode({"destination": spec.destination, "name": spec.name, "source": spec.source})
        digest.update((f",{entry}" if index else entry).encode())
    digest.update(b"]")
    digest.update(rest[cut:].encode())
    return digest.hexdigest()


def request_dir(prefix: str, request_id: str) -> str:
    """Where a request's archive and the documents beside it are: `<prefix>/<request_id>`."""
    return "/".join(part for part in (prefix, request_id) if part)


def archive_key(prefix: str, request_id: str, archive_name: str) -> str:
    return "/".join(part for part in (prefix, request_id, archive_name) if part)


def plan_archive(request: Request, *, settings: Settings, message_id: str) -> ArchivePlan:
    """Check a request against the settings and fix every entry's path and the archive's key."""
    if len(request.files) > settings.max_files:
        raise PermanentError(
            "too_large", f"{len(request.files)} files requested; MAX_FILES is {settings.max_files}"
        )
    allowed = settings.source_buckets
    refs: list[SourceRef] = []
    paths: list[str] = []
    spelled: list[str] = []
    for index, spec in enumerate(request.files):
        ref = parse_source(spec.source, default_bucket=settings.s3_source_bucket)
        if ref.bucket not in allowed:
            raise PermanentError(
                "forbidden_source",
                f"files[{index}]: bucket {shown(ref.bucket)} is not an allowed source bucket",
            )
        name = spec.name if spec.name is not None else ref.key.rsplit("/", 1)[-1]
        try:
            path = entry_path(spec.destination, name)
            spelled.append(portable_path(path))
        except UnsafeNameError as exc:
            raise PermanentError("invalid_request", f"files[{index}] ({spec.source}): {exc}") from None
        paths.append(path)
        refs.append(ref)
    try:
        final_paths = deduplicate(spelled)
    except UnsafeNameError as exc:  # a renamed path can grow past the length limit
        raise PermanentError("invalid_request", str(exc)) from None
    request_id = request.request_id or message_id
    # A request_id such as `CON` would make a default name Windows cannot save: respelled like an entry's.
    name = request.archive_name or portable_path(f"{request_id}.zip")
    key = archive_key(settings.s3_file_prefix, request_id, name)
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise PermanentError("invalid_request", f"the archive key would be over S3's {MAX_KEY_BYTES} bytes")
    return ArchivePlan(
        request=RequestOptions(
            on_missing=request.on_missing, compression=request.compression, metadata=request.metadata
        ),
        request_id=request_id,
        digest=request_digest(request),
        bucket=settings.s3_destination_bucket,
        key=key,
        entries=tuple(
            PlannedEntry(ref=ref, path=final, renamed=final != original)
            for ref, original, final in zip(refs, paths, final_paths, strict=True)
        ),
    )


def json_schemas() -> dict[str, Any]:
    """The JSON Schemas producers and consumers validate against (`archiver schema`)."""
    return {
        "request": Request.model_json_schema(),
        "cancel": CancelMessage.model_json_schema(),
        # One schema with shared top-level $defs: two model schemas side by side would each carry
        # their own $defs, and their `#/$defs/...` references would point nowhere.
        "notification": TypeAdapter(Notification).json_schema(),
    }
