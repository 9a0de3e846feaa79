"""How a request ends when a cancel may race its completion: `decision.json` in the request's directory
(`<prefix>/<request_id>/decision.json`), written once by whichever comes first with a conditional PUT.

A completing worker takes `completed` right before its CompleteMultipartUpload (the archive does not exist
until then); a cancel takes `cancelled`. S3 lets one conditional write win (If-None-Match: *), so a
cancel and a completion end in exactly one of the two: the loser reads the winner's decision and acts on
it (the worker aborts its upload and answers `cancelled`; the cancel is ignored). A cancel binds for
CANCEL_RETENTION seconds: a request that arrives later than that is a request of its own again, and the
expired decision is replaced (If-Match on its ETag, so that too is one winner). A `completed` decision
binds for good.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal

import botocore.exceptions

from archiver.aws import http_status
from archiver.errors import TransientError
from archiver.models import request_dir, utc_timestamp
from archiver.settings import Settings
from archiver.status import WORKER_ID, parse_timestamp, put_document, read_document

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

DECISION_NAME = "decision.json"
Verdict = Literal["completed", "cancelled"]
WRITE_TRIES = 3


def decision_key(directory: str) -> str:
    return f"{directory}/{DECISION_NAME}" if directory else DECISION_NAME


@dataclass(frozen=True)
class Decision:
    request_id: str
    verdict: Verdict
    decided_at: str
    # A cancel's: from this moment on it no longer cancels a request that arrives. None: binds for good.
    expires_at: str | None = None

    def binds(self, now: datetime | None = None) -> bool:
        expires = parse_timestamp(self.expires_at) if self.expires_at else None
        return expires is None or (now or datetime.now(UTC)) < expires

    @property
    def cancels(self) -> bool:
        """A cancel that still binds: the request is to be answered `cancelled`."""
        return self.verdict == "cancelled" and self.binds()

    def document(self) -> bytes:
        return json.dumps(
            {
                "request_id": self.request_id,
                "decision": self.verdict,
                "decided_at": self.decided_at,
                "expires_at": self.expires_at,
                "worker": WORKER_ID,
            }
        ).encode()


@dataclass(frozen=True)
class Place:
    """Where one request's decision is."""

    s3: S3Client
    bucket: str
    directory: str  # `<prefix>/<request_id>`
    request_id: str


def place_of(s3: S3Client, settings: Settings, request_id: str) -> Place:
    """Where the decision of this request is: beside its archive in S3_DESTINATION_BUCKET."""
    return Place(
        s3,
        bucket=settings.s3_destination_bucket,
        directory=request_dir(settings.s3_file_prefix, request_id),
        request_id=request_id,
    )


def read(place: Place) -> tuple[Decision | None, str | None]:
    """The decision (None if there is none, or it is unreadable) and its object's ETag (None if absent)."""
    document, etag = read_document(place.s3, place.bucket, decision_key(place.directory))
    if document is None:
        return None, etag
    try:
        verdict = document["decision"]
        if verdict not in ("completed", "cancelled"):
            return None, etag
        decision = Decision(
            request_id=str(document.get("request_id", place.request_id)),
            verdict=verdict,
            decided_at=str(document.get("decided_at", "")),
            expires_at=document.get("expires_at"),
        )
    except (ValueError, TypeError, KeyError):
        return None, etag  # unreadable: replaced by the next decision, like an expired one
    return decision, etag


def cancelled(place: Place) -> Decision | None:
    """The cancel that binds this request now, if any."""
    decision, _ = read(place)
    return decision if decision is not None and decision.cancels else None


def take(place: Place, verdict: Verdict, *, keep_seconds: int | None = None) -> Decision:
    """Decide `verdict` unless a decision that binds is there already; returns the decision that stands,
    this one or the other. The first write assumes there is none (one PUT in the usual case). A server
    without conditional writes (501) gets the decision unconditionally: the last writer wins there."""
    now = datetime.now(UTC)
    mine = Decision(
        request_id=place.request_id,
        verdict=verdict,
        decided_at=utc_timestamp(now),
        expires_at=None if keep_seconds is None else utc_timestamp(now + timedelta(seconds=keep_seconds)),
    )
    key = decision_key(place.directory)
    condition = {"IfNoneMatch": "*"}
    for _ in range(WRITE_TRIES):
        try:
            put_document(place.s3, place.bucket, key, mine.document(), condition)
            return mine
        except botocore.exceptions.ClientError as exc:
            if http_status(exc) == 501:
                put_document(place.s3, place.bucket, key, mine.document(), {})
                return mine
            # 412: there is one; 409: S3 is settling a concurrent conditional write to it.
            if http_status(exc) not in (409, 412):
                raise
        current, etag = read(place)
        if current is not None and current.binds(now):
            return current
        # Expired, unreadable, or deleted meanwhile: replace exactly what was read.
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
    raise TransientError(f"request {place.request_id}: its decision.json keeps changing")
