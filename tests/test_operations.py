"""What operators run on: ECS task protection against a stand-in agent, and EMF metric lines."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from archiver import worker
from archiver.assembly import LEAD_BYTES
from archiver.aws import make_clients
from archiver.protection import RENEW_AFTER_SECONDS, TaskProtection
from archiver.settings import MiB
from tests.conftest import Stack, wait_for
from tests.faultproxy import FaultProxy, Faults, Seen


@dataclass
class Agent:
    """The ECS agent's task-protection endpoint, as documented: PUT and GET `/task-protection/v1/state`."""

    mode: str = "ok"  # ok | failure | error
    puts: list[dict[str, Any]] = field(default_factory=list)
    enabled: bool = False

    def answer(self, method: str, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        task = "arn:aws:ecs:us-east-1:123456789012:task/cluster/0123456789abcdef"
        if method == "PUT":
            assert body is not None
            self.puts.append(body)
            if self.mode == "error":
                return 500, {"error": {"Arn": task, "Code": "ServerException", "Message": "agent broke"}}
            if self.mode == "failure":
                return 200, {"failure": {"Arn": task, "Reason": "TASK_NOT_VALID"}}
            self.enabled = bool(body["ProtectionEnabled"])
        return 200, {"protection": {"ProtectionEnabled": self.enabled, "TaskArn": task}}


@pytest.fixture
def agent() -> Iterator[tuple[Agent, str]]:
    state = Agent()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: object) -> None:
            pass

        def _serve(self) -> None:
            assert self.path == "/task-protection/v1/state"
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            status, answer = state.answer(self.command, body)
            payload = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_PUT = do_GET = _serve

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def run_worker(stack: Stack, **extra: str) -> subprocess.CompletedProcess[str]:
    if "ECS_AGENT_URI" not in extra:
        extra["ECS_AGENT_URI"] = ""  # outside ECS unless the test says otherwise
    return stack.run_burst_process(**extra)


def test_task_is_protected_while_working_and_released_when_idle(
    stack: Stack, agent: tuple[Agent, str]
) -> None:
    """With ECS_AGENT_URI set, the task is protected while it works and released once it has settled."""
    state, uri = agent
    stack.put("a.txt", b"a")
    stack.send({"request_id": "protected", "files": [{"source": "a.txt"}]})
    done = run_worker(stack, ECS_AGENT_URI=uri)
    assert done.returncode == 0, done.stderr
    assert stack.notifications(1)[0]["status"] == "completed"
    assert state.puts[0] == {"ProtectionEnabled": True, "ExpiresInMinutes": 15}
    assert state.puts[-1] == {"ProtectionEnabled": False}
    assert state.enabled is False


@pytest.mark.parametrize("mode", ["failure", "error"])
def test_protection_problems_never_stop_the_worker(stack: Stack, agent: tuple[Agent, str], mode: str) -> None:
    """A `failure` body or an agent error is logged, and the request is archived all the same."""
    state, uri = agent
    state.mode = mode
    stack.put("a.txt", b"a")
    stack.send({"request_id": f"unprotected-{mode}", "files": [{"source": "a.txt"}]})
    done = run_worker(stack, ECS_AGENT_URI=uri)
    assert done.returncode == 0, done.stderr
    assert stack.notifications(1)[0]["status"] == "completed"
    assert state.puts
    expected = "protection.refused" if mode == "failure" else "protection.error"
    assert expected in done.stderr


def emf_lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{") and '"_aws"' in line]


def assert_valid_emf(line: dict[str, Any]) -> None:
    """The Embedded Metric Format's rules: _aws.Timestamp, directives whose metrics and dimensions are
    all top-level members, at most 30 dimensions, numeric values."""
    meta = line["_aws"]
    assert isinstance(meta["Timestamp"], int)
    for directive in meta["CloudWatchMetrics"]:
        assert directive["Namespace"] == "archiver"
        for dimension_set in directive["Dimensions"]:
            assert 1 <= len(dimension_set) <= 30
            for name in dimension_set:
                assert isinstance(line[name], str)
        for metric in directive["Metrics"]:
            assert isinstance(line[metric["Name"]], int | float)
            assert metric["Unit"] in {"Count", "Seconds", "Bytes"}


def test_one_emf_line_per_request(stack: Stack) -> None:
    """Each request ends in one valid EMF line on stdout with its outcome and low-cardinality dimensions."""
    stack.put("a.txt", b"a" * 1000)
    stack.send({"request_id": "m-ok", "files": [{"source": "a.txt"}]})
    stack.send({"request_id": "m-bad", "files": [{"source": "nope.txt"}]})
    done = run_worker(stack)
    assert done.returncode == 0, done.stderr
    lines = emf_lines(done.stdout)
    assert len(lines) == 2
    for line in lines:
        assert_valid_emf(line)
    by_id = {line["request_id"]: line for line in lines}
    ok, bad = by_id["m-ok"], by_id["m-bad"]
    assert ok["Outcome"] == "completed"
    assert ok["Requests"] == 1
    assert ok["ArchiveEntries"] == 1
    assert ok["ArchiveBytes"] > 1000 // 10
    assert ok["CopiedBytes"] == 0
    assert ok["QueueLatency"] >= 0
    assert ok["Duration"] > 0
    assert bad["Outcome"] == "failed"
    assert bad["ErrorCode"] == "source_not_found"
    dimensions = bad["_aws"]["CloudWatchMetrics"][0]["Dimensions"]
    assert ["Outcome", "ErrorCode"] in dimensions
    assert all("request_id" not in d for d in dimensions)  # an id is a property, never a dimension


def test_protection_is_renewed_when_it_gets_old(agent: tuple[Agent, str]) -> None:
    """A protection older than the renewal age is asked for again; a fresh one is not re-sent."""
    from archiver.protection import RENEW_AFTER_SECONDS, TaskProtection

    state, uri = agent
    protection = TaskProtection(agent_uri=uri)
    protection.protect()
    protection.protect()  # fresh: no second call
    assert len(state.puts) == 1
    protection.renewed_at -= RENEW_AFTER_SECONDS + 1  # as if a long job had run that long
    protection.protect()
    assert len(state.puts) == 2
    assert state.puts[-1] == {"ProtectionEnabled": True, "ExpiresInMinutes": 15}
    protection.release()
    assert state.enabled is False
    outside_ecs = TaskProtection(agent_uri=None)
    outside_ecs.protect()
    assert outside_ecs.protected is False  # no agent: nothing sent, nothing claimed
    assert len(state.puts) == 3


def test_copied_bytes_metric(stack: Stack) -> None:
    """Server-side assembly shows as CopiedBytes: the archive's bytes S3 copied without the worker."""
    stack.put("film.mp4", bytes(16 * MiB + 9), ChecksumAlgorithm="CRC32")
    stack.send({"request_id": "m-copied", "files": [{"source": "film.mp4"}]})
    done = run_worker(stack, SERVER_SIDE_COPY_MIN_BYTES=str(16 * MiB))
    assert done.returncode == 0, done.stderr
    (line,) = emf_lines(done.stdout)
    assert_valid_emf(line)
    assert line["CopiedBytes"] == 16 * MiB + 9 - LEAD_BYTES
    assert line["ArchiveBytes"] > line["CopiedBytes"]


def test_the_daemon_protects_only_while_it_works(
    stack: Stack, agent: tuple[Agent, str], moto_endpoint: str
) -> None:
    """The daemon loop, not burst: idle polls never ask for protection (ECS must be free to scale in or
    replace an idle task); a received request is protected until it is settled, renewed during a long
    job, and released after it; the next idle polls ask for nothing again."""
    state, uri = agent
    source = "slow.bin"
    body = os.urandom(4 * MiB)
    stack.put(source, body)

    def source_get(seen: Seen) -> bool:
        return seen.operation == "GetObject" and seen.path.endswith(f"/{source}")

    # ~8 s of job at 512 KiB/s: more than two heartbeat ticks (3.3 s with a 10 s visibility timeout).
    with FaultProxy(moto_endpoint, Faults(match=source_get, throttle=MiB // 2)) as proxy:
        os.environ["AWS_ENDPOINT_URL"], direct = proxy.url, os.environ["AWS_ENDPOINT_URL"]
        try:
            daemon = worker.connect(
                stack.settings(visibility_timeout=10, shutdown_grace=1, prefetch_bytes=MiB), make_clients()
            )
        finally:
            os.environ["AWS_ENDPOINT_URL"] = direct
        daemon.protection = TaskProtection(agent_uri=uri)
        daemon.emit_metrics = False
        thread = threading.Thread(target=worker.run, args=(daemon,))
        thread.start()
        try:
            wait_for(
                lambda: len(proxy.requests_matching(operation="ReceiveMessage")) >= 3,
                timeout=30,
                what="idle polls",
            )
            assert state.puts == []
            stack.send({"request_id": "watched", "files": [{"source": source}]})
            wait_for(lambda: proxy.requests_matching(where=source_get), timeout=30, what="the job")
            assert state.puts == [{"ProtectionEnabled": True, "ExpiresInMinutes": 15}]
            daemon.protection.renewed_at -= RENEW_AFTER_SECONDS + 1  # as if the job had run that long
            wait_for(lambda: len(state.puts) >= 2, timeout=30, what="the renewal")
            (note,) = wait_for(lambda: stack.notifications(1, max_polls=1), timeout=60, what="the archive")
            assert note["status"] == "completed"
            wait_for(lambda: state.puts[-1] == {"ProtectionEnabled": False}, timeout=30, what="the release")
            settled_puts = len(state.puts)
            polls = len(proxy.requests_matching(operation="ReceiveMessage"))
            wait_for(
                lambda: len(proxy.requests_matching(operation="ReceiveMessage")) >= polls + 2,
                timeout=30,
                what="idle polls after the job",
            )
            assert len(state.puts) == settled_puts
        finally:
            daemon.shutdown.requested.set()
            thread.join(timeout=30)
    assert [put["ProtectionEnabled"] for put in state.puts] == [True, True, False]
    assert state.enabled is False
