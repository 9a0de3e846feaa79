"""`archiver status REQUEST_ID`: where a request stands, read from its status document (archiver.status,
contract §3) and said in a few lines a person reads, or printed as the document itself."""

from __future__ import annotations

from typing import Any

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in _UNITS:
        if round(value, 1) < 1024 or unit == _UNITS[-1]:
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def describe(document: dict[str, Any], *, link: str | None) -> list[str]:
    """The status document as lines: the state, progress, times, and the link or the error."""
    state = document.get("status", "unknown")
    lines = [f"request {document.get('request_id')}: {state}"]
    files_total, bytes_total = document.get("files_total") or 0, document.get("bytes_total") or 0
    files = f"files {document.get('files_done', 0)} of {files_total}"
    size = f"bytes {human_bytes(document.get('bytes_done') or 0)} of {human_bytes(bytes_total)}"
    lines.append(f"  {files}, {size}")
    if document.get("segments_total"):
        lines.append(f"  segments {document.get('segments_done', 0)} of {document['segments_total']}")
    lines.append(f"  started {document.get('started_at')}, updated {document.get('updated_at')}")
    lines.append(f"  archive {document.get('archive_key')}")
    notification = document.get("notification") or {}
    archive = notification.get("archive") or {}
    if state == "completed":
        lines.append(f"  size {human_bytes(archive.get('size') or 0)}, {archive.get('entries')} entries")
        if link:
            lines.append(f"  link {link}")
    if state == "cancelled":
        lines.append("  no archive: a cancel ended it")
    if state == "processing" and document.get("lease_expires_at"):
        lines.append(f"  worker {document.get('worker')}, lease until {document['lease_expires_at']}")
    if (error := document.get("error")) and state in ("failed", "queued"):
        lines.append(f"  error {error.get('code')}: {error.get('message')}")
    return lines
