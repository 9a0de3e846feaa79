"""One exception root, split by what the worker should do with the message.

`PermanentError`: the request can never succeed as sent; the worker sends a `failed` notification and
deletes the message. `TransientError`: it may succeed later; the worker releases the message for
redelivery. Anything else that escapes a job is treated as transient too, so a bug ends in the DLQ rather
than in a lost request.
"""

from __future__ import annotations

from typing import Literal

ErrorCode = Literal[
    "invalid_request", "forbidden_source", "source_not_found", "source_archived", "too_large", "internal"
]
# Messages quote request text, which may be hundreds of kilobytes: they go into notifications (an SQS
# message) and log lines, so they are cut to this many characters.
MAX_ERROR_MESSAGE = 1000
QUOTE_LIMIT = 100


def clip(message: str, limit: int = MAX_ERROR_MESSAGE) -> str:
    return message if len(message) <= limit else message[: limit - 1] + "…"


def shown(text: str, limit: int = QUOTE_LIMIT) -> str:
    """`text` quoted for a message (repr, so control characters show), its first `limit` characters."""
    return repr(text[:limit]) + ("…" if len(text) > limit else "")


class ArchiverError(Exception):
    """Root of every error archiver raises on purpose."""

    code: ErrorCode = "internal"


class PermanentError(ArchiverError):
    """The request is wrong or impossible; retrying it would fail the same way."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        message = clip(message)
        super().__init__(message)
        self.code = code
        self.message = message


def archive_too_large(limit: int, total: int | None = None) -> PermanentError:
    """MAX_ARCHIVE_BYTES passed: by the sum of the sizes the HEADs gave (`total`), or, while the sources
    are read, by the sizes or the bytes seen so far."""
    if total is None:
        return PermanentError(
            "too_large", f"the sources add up to more than {limit} bytes (MAX_ARCHIVE_BYTES)"
        )
    return PermanentError("too_large", f"the sources add up to {total} bytes; MAX_ARCHIVE_BYTES is {limit}")


class TransientError(ArchiverError):
    """S3 or SQS could not do it now (throttling, 5xx, timeouts, a source that changed meanwhile)."""

    def __init__(self, message: str) -> None:
        message = clip(message)
        super().__init__(message)
        self.message = message


class SettingsError(ArchiverError, ValueError):
    """A setting is missing or wrong; the command exits 2 naming it."""


class JobAbandoned(TransientError):
    """The job was stopped from outside (shutdown grace or JOB_TIMEOUT ran out); its message is released."""


class Cancelled(ArchiverError):
    """The request was cancelled (archiver.decision): its upload is aborted and it is answered `cancelled`."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ChecksumMismatch(TransientError):
    """A source's bytes do not have the CRC-32 S3 reported for it: the attempt starts over without S3's
    CRCs (job.build_archive), so it never becomes a retry loop."""

    def __init__(self, source: str) -> None:
        super().__init__(f"{source}: its bytes do not have the CRC-32 S3 reported")
        self.source = source


class Unreachable(ArchiverError):
    """S3 or SQS did not answer at start-up (down, not started yet, or a wrong endpoint)."""
