"""Cancelling a request (contract §5, delivery semantics: Cancelling): a cancel on the source queue,
decided against the request's completion in decision.json (archiver.decision), on moto over HTTP. A
cancel before the request arrives, while it streams, while it is fanned out, racing its completion both
ways, after it completed, expired, and malformed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter
from structlog.testing import capture_logs

from archiver import cancel_handler, decision, queue, worker
from archiver.errors import PermanentError
from archiver.models import parse_cancel
from archiver.notices import Notification
from tests.conftest import Stack, wait_for
from tests.faultproxy import FaultProxy, Faults, Seen
from tests.test_cli import use_stack
from tests.test_fanout import Fleet, one_notification, photos, plan_exists, request
from tests.test_lifecycle import worker_through
from tests.test_status_command import run_status
from tests.zipcheck import check_archive, check_with_zipfile

MiB = 1024 * 1024


def send_cancel(stack: Stack, request_id: str) -> str:
    return stack.send({"cancel": {"request_id": request_id}})


def burst(stack: Stack, **settings: Any) -> None:
    assert worker.run(worker.connect(stack.settings(**settings)), burst=True) == 0


def place(stack: Stack, request_id: str) -> decision.Place:
    return decision.Place(
        stack.clients.s3,
        bucket=stack.destination_bucket,
        directory=f"download/{request_id}",
        request_id=request_id,
    )


def decided(stack: Stack, request_id: str) -> str | None:
    found, _ = decision.read(place(stack, request_id))
    return None if found is None else found.verdict


def assert_nothing_left(stack: Stack) -> None:
    """No archive, no upload, no fan-out document, no message on the source queue or the DLQ."""
    assert stack.archive_keys() == []
    assert stack.incomplete_uploads() == []
    assert stack.queue_depth() == 0
    assert stack.queue_depth(stack.dlq_url) == 0


@pytest.fixture
def thread_worker() -> Iterator[list[threading.Thread]]:
    """In-process burst workers in threads, joined (with a bound) at the end of the test."""
    threads: list[threading.Thread] = []
    yield threads
    for thread in threads:
        thread.join(timeout=60)


def start(threads: list[threading.Thread], busy: worker.Worker) -> threading.Thread:
    thread = threading.Thread(target=worker.run, args=(busy,), kwargs={"burst": True})
    thread.start()
    threads.append(thread)
    return thread


def test_a_cancel_before_its_request_arrives_answers_it_cancelled_unread(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The cancel is kept; the request, arriving later, is answered `cancelled` with its metadata and
    nothing is read: its only source does not exist, which would otherwise fail it."""
    use_stack(stack, monkeypatch)
    send_cancel(stack, "early")
    burst(stack)
    assert decided(stack, "early") == "cancelled"
    assert stack.notifications(1, max_polls=1) == []
    code, out, _ = run_status(capsys, "early")
    assert code == 1
    assert "cancelled at" in out and "cancels it if it arrives by" in out

    stack.send({"request_id": "early", "files": [{"source": "never-uploaded.bin"}], "metadata": {"k": "v"}})
    burst(stack)
    (note,) = stack.notifications(1)
    assert note["status"] == "cancelled" and note["request_id"] == "early"
    assert note["metadata"] == {"k": "v"} and note["cancelled_at"]
    TypeAdapter(Notification).validate_python(note)  # what `archiver schema` describes
    assert stack.status("early")["status"] == "cancelled"
    assert stack.status("early")["error"] is None
    assert_nothing_left(stack)
    code, out, _ = run_status(capsys, "early")
    assert code == 0 and out.splitlines()[0] == "request early: cancelled"


def test_a_cancel_kept_past_its_retention_no_longer_cancels(stack: Stack, tmp_path: Path) -> None:
    """A request arriving after CANCEL_RETENTION is a request of its own: it completes, and its
    completion replaces the expired cancel."""
    decision.take(place(stack, "late"), "cancelled", keep_seconds=-60)
    stack.put("a.txt", b"alpha")
    stack.send({"request_id": "late", "files": [{"source": "a.txt"}]})
    burst(stack)
    (note,) = stack.notifications(1)
    assert note["status"] == "completed", note
    check_archive(stack.download(note["archive"]["key"]), {"a.txt": b"alpha"}, tmp_path)
    assert decided(stack, "late") == "completed"


def test_a_cancel_while_streaming_stops_the_job_within_a_heartbeat(
    stack: Stack, slow_sources: FaultProxy, thread_worker: list[threading.Thread]
) -> None:
    """A 30 MiB source read at 1 MiB/s: a cancel handled by another worker a few seconds in stops the
    job long before the source is read, its upload aborted, one `cancelled` answer, the message gone."""
    stack.put("long.bin", os.urandom(30 * MiB))
    stack.send({"request_id": "streaming", "files": [{"source": "long.bin"}], "metadata": {"n": 1}})
    busy = start(thread_worker, worker_through(slow_sources, stack, part_size=5 * MiB, prefetch_bytes=MiB))
    wait_for(
        lambda: stack.clients.s3.list_objects_v2(Bucket=stack.destination_bucket).get("KeyCount"),
        timeout=30,
        what="the status document",
    )
    wait_for(lambda: stack.status("streaming")["bytes_done"] > 0, timeout=30, what="bytes streamed")
    send_cancel(stack, "streaming")
    burst(stack)  # the request is in the other worker's hands: this one takes the cancel
    busy.join(timeout=20)  # the source alone would take 30 s more
    assert not busy.is_alive(), "the cancelled job kept going"
    (note,) = stack.notifications(1)
    assert note["status"] == "cancelled" and note["metadata"] == {"n": 1}
    assert stack.status("streaming")["status"] == "cancelled"
    assert_nothing_left(stack)


def test_a_cancel_while_fanned_out_drops_every_segment(
    stack: Stack, moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers building a fanned-out request's segments; `archiver cancel` from the command line,
    taken by a third: one `cancelled` answer, the upload aborted, the plan and every record gone, the
    tasks dropped."""
    photos(stack, 12, 2 * MiB)

    def source_get(seen: Seen) -> bool:
        return seen.method == "GET" and seen.path.startswith(f"/{stack.source_bucket}/")

    fleet = Fleet(stack, tmp_path)
    # 128 KiB/s a GET: a photo takes 16 s, so the cancel lands while every segment is still being read.
    with FaultProxy(moto_endpoint, Faults(match=source_get, throttle=128 * 1024)) as slow:
        try:
            for _ in range(2):
                fleet.start(endpoint=slow.url)
            stack.send(request("fanned", [f"p{index:03d}.jpg" for index in range(12)]))
            wait_for(lambda: plan_exists(stack, "fanned"), timeout=60, what="the plan")
            sent = subprocess.run(
                [sys.executable, "-m", "archiver", "cancel", "fanned"],
                env=stack.worker_env(),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert sent.returncode == 0, sent.stderr
            assert json.loads(sent.stdout.splitlines()[-1])["cancel"] == "fanned"
            # Both of the fleet's workers are busy on segments: a free worker takes the cancel (and any
            # task still queued before it).
            burst(stack, fanout_segment_bytes=6 * MiB)
            note = one_notification(stack, fleet)
            wait_for(
                lambda: stack.queue_depth() == 0, timeout=60, what=f"no task left:\n{fleet.logs()[-4000:]}"
            )
        finally:
            fleet.stop()
    assert note["status"] == "cancelled", note
    assert note["metadata"] == {"n": 1}
    assert stack.notifications(1, max_polls=1) == []  # one answer only
    assert not plan_exists(stack, "fanned")
    assert_nothing_left(stack)
    assert '"level": "error"' not in fleet.logs(), fleet.logs()[-4000:]


def hold_puts_of(name: str) -> tuple[threading.Event, Faults]:
    """Requests that PUT `name` wait on the wire until the event is set."""
    gate = threading.Event()

    def held(seen: Seen) -> bool:
        return seen.method == "PUT" and seen.path.endswith(f"/{name}")

    return gate, Faults(match=held, hold=gate)


def test_a_cancel_that_wins_the_race_aborts_the_completing_upload(
    stack: Stack, moto_endpoint: str, thread_worker: list[threading.Thread]
) -> None:
    """The worker's `completed` decision is held on the wire while a cancel is decided: the worker's
    conditional write loses, it aborts its upload and answers `cancelled`; no archive exists."""
    gate, faults = hold_puts_of("decision.json")
    stack.put("a.txt", b"alpha")
    stack.send({"request_id": "race", "files": [{"source": "a.txt"}]})
    with FaultProxy(moto_endpoint, faults) as proxy:
        try:
            busy = start(thread_worker, worker_through(proxy, stack))
            wait_for(lambda: proxy.requests_matching(where=faults.match), timeout=30, what="the decision PUT")
            direct = worker.connect(stack.settings())
            assert cancel_handler.decide_cancel(direct, "race")[0] == "recorded"
        finally:
            gate.set()
        busy.join(timeout=30)
    (note,) = stack.notifications(1)
    assert note["status"] == "cancelled", note
    assert decided(stack, "race") == "cancelled"
    assert stack.status("race")["status"] == "cancelled"
    assert_nothing_left(stack)


def test_a_completion_that_wins_the_race_leaves_the_cancel_ignored(
    stack: Stack, moto_endpoint: str, thread_worker: list[threading.Thread]
) -> None:
    """The cancel's decision is held on the wire while the request completes: the cancel's conditional
    write loses and changes nothing; one `completed` answer, the archive whole."""
    gate, faults = hold_puts_of("decision.json")
    stack.put("a.txt", b"alpha")
    send_cancel(stack, "race")
    with FaultProxy(moto_endpoint, faults) as proxy, capture_logs() as events:
        try:
            cancelling = start(thread_worker, worker_through(proxy, stack))
            wait_for(lambda: proxy.requests_matching(where=faults.match), timeout=30, what="the cancel's PUT")
            stack.send({"request_id": "race", "files": [{"source": "a.txt"}]})
            burst(stack)
        finally:
            gate.set()
        cancelling.join(timeout=30)
    (note,) = stack.notifications(1)
    assert note["status"] == "completed", note
    check_with_zipfile(stack.download(note["archive"]["key"]), {"a.txt": b"alpha"})
    assert decided(stack, "race") == "completed"
    (done,) = [event for event in events if event["event"] == "cancel.done"]
    assert done["outcome"] == "ignored" and "completion" in done["reason"]
    assert stack.queue_depth() == 0


def decide_both_at_once(here: decision.Place) -> dict[str, decision.Decision]:
    """A completion and a cancel of one request started together; what each caller was told."""
    barrier = threading.Barrier(2)
    answers: dict[str, decision.Decision] = {}

    def take(verdict: decision.Verdict) -> None:
        barrier.wait(timeout=10)
        keep = 3600 if verdict == "cancelled" else None
        answers[verdict] = decision.take(here, verdict, keep_seconds=keep)

    threads = [threading.Thread(target=take, args=(verdict,)) for verdict in ("completed", "cancelled")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return answers


def test_a_cancel_and_a_completion_decided_at_once_agree_on_one(stack: Stack) -> None:
    """Twenty rounds of both decisions started together on the server: each round one of them stands,
    both callers are told that one, and it is what decision.json says."""
    for round_number in range(20):
        here = place(stack, f"both-{round_number}")
        answers = decide_both_at_once(here)
        stored, _ = decision.read(here)
        assert stored is not None
        assert answers["completed"] == answers["cancelled"] == stored


def test_a_cancel_after_completion_changes_nothing_and_says_so(stack: Stack, tmp_path: Path) -> None:
    stack.put("a.txt", b"alpha")
    stack.send({"request_id": "done", "files": [{"source": "a.txt"}]})
    burst(stack)
    (note,) = stack.notifications(1)
    send_cancel(stack, "done")
    with capture_logs() as events:
        burst(stack)
    (done,) = [event for event in events if event["event"] == "cancel.done"]
    assert done["outcome"] == "ignored" and "completed before the cancel" in done["reason"]
    assert stack.notifications(1, max_polls=1) == []
    check_archive(stack.download(note["archive"]["key"]), {"a.txt": b"alpha"}, tmp_path)
    assert stack.status("done")["status"] == "completed"
    assert decided(stack, "done") == "completed"
    assert stack.queue_depth() == 0


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"cancel": {"request_id": "../x"}}, "cancel.request_id"),
        ({"cancel": "order-1"}, "cancel"),
        ({"cancel": {"request_id": "order-1"}, "files": []}, "files: Extra inputs"),
        ({"cancel": {}}, "cancel.request_id: Field required"),
    ],
)
def test_a_malformed_cancel_is_answered_failed_under_its_own_id(
    stack: Stack, body: dict[str, Any], problem: str
) -> None:
    """Never under the id it names: that request did not fail."""
    message_id = stack.send(body)
    burst(stack)
    (note,) = stack.notifications(1)
    assert note["status"] == "failed" and note["request_id"] == message_id
    assert note["error"]["code"] == "invalid_request"
    assert note["error"]["message"].startswith("invalid cancel: ") and problem in note["error"]["message"]
    assert decided(stack, "order-1") is None
    assert stack.queue_depth() == 0 and stack.queue_depth(stack.dlq_url) == 0


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


def message(body: str) -> queue.Message:
    return queue.Message(message_id="m-1", receipt_handle="r", body=body, receive_count=1, sent_at=None)


@given(st.dictionaries(st.sampled_from(["cancel", "files", "request_id"]), JSON, max_size=3) | JSON)
def test_the_cancel_handler_takes_exactly_the_objects_with_a_cancel(document: Any) -> None:
    """Any JSON body: a cancel's handler for an object with a top-level `cancel`, None for the rest (a
    request, however malformed); and a cancel validates or fails as invalid_request, never otherwise."""
    handler = cancel_handler.receive(message(json.dumps(document)))
    is_cancel = isinstance(document, dict) and "cancel" in document
    assert (handler is not None) == is_cancel
    if not is_cancel:
        return
    assert handler is not None and handler.name == "cancel" and handler.request_id == "m-1"
    try:
        parsed = parse_cancel(document)
    except PermanentError as exc:
        assert exc.code == "invalid_request" and exc.message.startswith("invalid cancel: ")
    else:
        assert document == {"cancel": {"request_id": parsed.cancel.request_id}}


@given(st.text(max_size=140))
def test_a_cancel_names_a_request_id_as_a_request_does(request_id: str) -> None:
    from archiver.models import is_valid_request_id

    try:
        parse_cancel({"cancel": {"request_id": request_id}})
    except PermanentError:
        assert not is_valid_request_id(request_id)
    else:
        assert is_valid_request_id(request_id)
