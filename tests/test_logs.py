"""Logs: one JSON event per line, ids bound, and never a credential or a presigned signature."""

from __future__ import annotations

import io
import json

import structlog
from structlog.testing import capture_logs

from archiver import worker
from archiver.logs import configure_logging, scrub
from tests.conftest import Stack
from tests.faultproxy import FaultProxy, Seen


def test_json_lines_carry_bound_context() -> None:
    """In production each event is one JSON line with the bound request, message and archive key."""
    out = io.StringIO()
    configure_logging(debug=False, dev_mode=False, stream=out)
    with structlog.contextvars.bound_contextvars(
        request_id="r-1", message_id="m-1", archive_key="download/r-1/a.zip"
    ):
        structlog.get_logger("t").info("request.done", size=3)
    (line,) = out.getvalue().splitlines()
    event = json.loads(line)
    assert event["event"] == "request.done"
    assert (event["request_id"], event["message_id"], event["archive_key"]) == (
        "r-1",
        "m-1",
        "download/r-1/a.zip",
    )
    assert event["level"] == "info" and event["timestamp"].endswith("Z")


def test_debug_events_only_with_app_debug() -> None:
    """APP_DEBUG=0 drops debug events; APP_DEBUG=1 keeps them."""
    out = io.StringIO()
    configure_logging(debug=False, dev_mode=False, stream=out)
    structlog.get_logger().debug("noise")
    assert out.getvalue() == ""
    configure_logging(debug=True, dev_mode=False, stream=out)
    structlog.get_logger().debug("noise")
    assert "noise" in out.getvalue()


def test_signatures_and_secrets_are_scrubbed() -> None:
    """Presigned URL signatures, credentials and session tokens never reach the log."""
    url = (
        "http://127.0.0.1/b/k.zip?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F20261121"
        "&X-Amz-Signature=deadbeefcafe&X-Amz-Security-Token=FwoGZXIvYXdzEJr"
    )
    out = io.StringIO()
    configure_logging(debug=False, dev_mode=False, stream=out)
    structlog.get_logger().info(
        "sent", url=url, nested={"aws_secret_access_key": "wJalrXUtnFEMI"}, items=[url]
    )
    text = out.getvalue()
    for secret in ("deadbeefcafe", "AKIAEXAMPLE", "FwoGZXIvYXdzEJr", "wJalrXUtnFEMI"):
        assert secret not in text
    assert "X-Amz-Signature=REDACTED" in scrub(url)


def test_request_context_ends_with_the_request(stack: Stack) -> None:
    """The archive key bound for one request is on none of the next request's lines (its `request.done`
    included), nor on `worker.stopped`: per-request context is bound for that request only."""
    stack.put("a.txt", b"alpha")
    stack.send({"request_id": "first", "files": [{"source": "a.txt"}]})
    w = worker.connect(stack.settings())
    out = io.StringIO()
    configure_logging(debug=False, dev_mode=False, stream=out)
    worker.run(w, burst=True)
    stack.send("not json")  # fails before it has an archive key of its own
    worker.run(w, burst=True)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    done = [line for line in lines if line["event"] == "request.done"]
    assert [line.get("archive_key") for line in done] == ["download/first/first.zip", None]
    assert done[1]["request_id"] != "first"
    stopped = [line for line in lines if line["event"] == "worker.stopped"]
    assert stopped and all("archive_key" not in line and "request_id" not in line for line in stopped)
    assert structlog.contextvars.get_contextvars() == {}


def test_a_status_write_that_fails_is_one_line_without_a_traceback(
    stack: Stack, fault_proxy: FaultProxy
) -> None:
    """A best-effort status write (here the `failed` one, after the lease was claimed) that S3 refuses
    does not change the answer, and is one `status.write_failed` event with the error, not a traceback."""
    status_puts: list[Seen] = []

    def after_the_claim(seen: Seen) -> bool:
        if seen.method != "PUT" or not seen.path.endswith("/status.json"):
            return False
        status_puts.append(seen)
        return len(status_puts) > 1

    fault_proxy.configure(rate=1.0, kinds=("501",), service="s3", match=after_the_claim)
    stack.send({"request_id": "no-status", "files": [{"source": "missing.txt"}]})
    with capture_logs() as events:
        assert worker.run(worker.connect(stack.settings()), burst=True) == 0
    assert [note["status"] for note in stack.notifications(1)] == ["failed"]
    failed = [event for event in events if event["event"] == "status.write_failed"]
    assert failed, "no status write was refused"
    for event in failed:
        assert "exc_info" not in event
        assert "NotImplemented" in event["error"]
