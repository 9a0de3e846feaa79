"""A worker's hold on building one segment, so that two workers do not build it at once."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import botocore.exceptions
import structlog

from archiver.aws import http_status
from archiver.fanout.store import Store, claim_name
from archiver.models import utc_timestamp
from archiver.status import WORKER_ID

log = structlog.get_logger(__name__)


@dataclass
class Claim:
    """A document written only if absent, or if the one there has expired; renewed by the heartbeat.
    Losing a race costs nothing worse than a segment built twice the same way."""

    store: Store
    index: int
    seconds: int
    etag: str | None = None

    def _document(self) -> dict[str, Any]:
        expires = datetime.now(UTC) + timedelta(seconds=self.seconds)
        return {"worker": WORKER_ID, "expires_at": utc_timestamp(expires)}

    def take(self) -> bool:
        name = claim_name(self.index)
        try:
            held, current = self.store.read_versioned(name)
            if current is not None:
                held = held or {}
                if held.get("worker") != WORKER_ID and _remaining(held) > 0:
                    return False
                self.etag = self.store.write(name, self._document(), IfMatch=current)
            else:
                self.etag = self.store.write(name, self._document(), IfNoneMatch="*")
        except botocore.exceptions.ClientError as exc:
            if http_status(exc) == 501:  # no conditional writes here: duplicates are only wasted work
                self.etag = self.store.write(name, self._document())
                return True
            if http_status(exc) in (409, 412):
                return False
            raise
        return True

    def renew(self) -> None:
        self.etag = self.store.write(claim_name(self.index), self._document())

    def release(self) -> None:
        try:
            self.store.delete(claim_name(self.index))
        except Exception as exc:  # it expires by itself
            log.warning("segment.claim_release_failed", error=repr(exc))


def _remaining(claim: dict[str, Any]) -> float:
    try:
        expires = datetime.strptime(str(claim.get("expires_at")), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return 0.0
    return (expires - datetime.now(UTC)).total_seconds()


def is_live(written: datetime | None, *, seconds: int, now: datetime) -> bool:
    """Whether a claim written (or renewed, every few seconds) at `written` is still within its term,
    told from a listing's LastModified without reading the claim."""
    return written is not None and (now - written).total_seconds() < seconds
