"""The methods, each run as one subprocess per scenario and measured from outside: wall time, and
peak RSS from the kernel's own accounting of that one process (`wait4` → `ru_maxrss`, taken by
bench/launch.py), which is exact and needs no polling. The bytes its sockets move are counted inside it,
by bench/meter.py (see there for why)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.report import MethodResult
from bench.scenarios import Scenario, Source
from bench.servers import Endpoints, accounted_cpu, child_env
from bench.tuning import Tuning
from bench.verify import check_archive

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sqs import SQSClient

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = Path(__file__).resolve().parent / "launch.py"
# Generous: the slowest method here (zipfile deflating at level 6) moves ~15 MB/s.
BASE_TIMEOUT = 180.0
SLOWEST_BYTES_PER_SECOND = 3_000_000
# After the worker exits, how long a notification may still take to become visible.
NOTIFICATION_GRACE = 10.0
STOP_GRACE = 30.0  # archiver's SHUTDOWN_GRACE is 25 s
# archiver's two paths: its defaults (server-side assembly for big uncompressed entries), and streaming
# every byte. These win over --worker-env, which applies to both.
ARCHIVER_ENV: dict[str, dict[str, str]] = {
    "archiver": {},
    "archiver-stream": {"SERVER_SIDE_COPY_MIN_BYTES": "0"},
}


@dataclass(frozen=True)
class RunContext:
    """What every run of a scenario shares."""

    endpoints: Endpoints
    tuning: Tuning
    s3: S3Client
    sqs: SQSClient
    workdir: Path  # scratch: specs, downloaded archives
    logdir: Path  # kept after the run: every subprocess's output
    run_id: str
    # Extra variables for the worker alone (--worker-env), e.g. allocator knobs under investigation.
    worker_extra_env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Measured:
    exit_code: int | None  # None: killed at the timeout
    wall_seconds: float
    peak_rss_bytes: int
    # CPU seconds while it ran: its own ("method"), the bench's servers' by role, the whole machine's
    cpu_seconds: dict[str, float] = field(default_factory=dict)


def timeout_for(scenario: Scenario) -> float:
    return BASE_TIMEOUT + scenario.total_bytes / SLOWEST_BYTES_PER_SECOND


@dataclass(frozen=True)
class SocketBytes:
    received: int | None = None  # None: not recorded (the process did not exit normally)
    sent: int | None = None


def metered(socket_log: Path, module: str, *args: str) -> list[str]:
    """`python -m MODULE ARGS` under bench/meter.py, which writes the socket byte counts to `socket_log`."""
    socket_log.unlink(missing_ok=True)
    return [sys.executable, "-m", "bench.meter", str(socket_log), module, *args]


def read_socket_log(socket_log: Path) -> SocketBytes:
    try:
        counts = json.loads(socket_log.read_text())
    except (OSError, ValueError):
        return SocketBytes()
    return SocketBytes(received=int(counts["received_bytes"]), sent=int(counts["sent_bytes"]))


def launch(
    args: list[str], *, env: dict[str, str], log: Path, cwd: Path = REPO
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start `args` under bench/launch.py (which writes the peak RSS of that one process to the usage
    file returned), its output in `log`, in a session of its own so that both are stopped together."""
    usage_path = log.with_name(log.name + ".rusage.json")
    usage_path.unlink(missing_ok=True)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(LAUNCHER), str(usage_path), *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    return process, usage_path


def read_usage(usage_path: Path, process: subprocess.Popen[bytes]) -> dict[str, Any]:
    """What bench/launch.py reported; without its file (the launcher itself was killed), the exit code
    and no peak RSS."""
    try:
        return dict(json.loads(usage_path.read_text()))
    except (OSError, ValueError):
        return {"exit_code": process.returncode, "max_rss_kib": 0}


def run_measured(
    args: list[str], *, env: dict[str, str], log: Path, timeout: float, cwd: Path = REPO
) -> Measured:
    """Run `args` to completion with its output in `log`; stop it at `timeout`. It runs under
    bench/launch.py, which reports the peak RSS of that one process (see there for why), in a session of
    its own so that it and the launcher are stopped together."""
    started = time.monotonic()
    cpu_before = accounted_cpu()
    process, usage_path = launch(args, env=env, log=log, cwd=cwd)
    timed_out = False
    try:
        while process.poll() is None:
            if time.monotonic() - started > timeout:
                timed_out = True
                _stop_group(process)
            time.sleep(0.05)
    except BaseException:
        _stop_group(process)  # Ctrl-C or an error in the bench: the child must not outlive it
        raise
    wall = time.monotonic() - started
    cpu_after = accounted_cpu()
    usage = read_usage(usage_path, process)
    cpu = {role: round(seconds - cpu_before.get(role, 0.0), 2) for role, seconds in cpu_after.items()}
    return Measured(
        exit_code=None if timed_out else int(usage["exit_code"]),
        wall_seconds=wall,
        peak_rss_bytes=int(usage["max_rss_kib"]) * 1024,
        cpu_seconds={"method": float(usage.get("cpu_seconds", 0.0)), **cpu},
    )


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the launcher and the measured process (archiver's worker then aborts its upload), and
    SIGKILL if they are still there after STOP_GRACE seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _failed(method: str, scenario: Scenario, measured: Measured, error: str, **details: Any) -> MethodResult:
    return MethodResult(
        method=method,
        ok=False,
        wall_seconds=measured.wall_seconds,
        work_seconds=None,
        source_bytes=scenario.total_bytes,
        peak_rss_bytes=measured.peak_rss_bytes,
        error=error,
        details=details,
    )


def _exit_problem(measured: Measured, log: Path) -> str | None:
    if measured.exit_code is None:
        return f"killed after {measured.wall_seconds:.0f} s (timeout); log {log}"
    if measured.exit_code != 0:
        return f"exit status {measured.exit_code}; log {log}:\n{_tail(log)}"
    return None


def _tail(log: Path, lines: int = 25) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


# ------------------------------------------------------------------------------------------- baselines


def run_baseline(
    method: str,
    ctx: RunContext,
    scenario: Scenario,
    sources: list[Source],
    *,
    round_number: int = 1,
    tag: str | None = None,
) -> MethodResult:
    """`raw`, `inmemory` or `download` (bench/children.py) in a subprocess against the scenario's sources."""
    tag = tag or str(round_number)
    key = f"{method}/{ctx.run_id}-{tag}.{'bin' if method == 'raw' else 'zip'}"
    spec = {
        "source_bucket": scenario.source_bucket,
        "keys": [source.key for source in sources],
        "sizes": [source.size for source in sources],
        "entry_names": [source.entry_name for source in sources],
        "compressible": scenario.compressible,
        "destination_bucket": scenario.destination_bucket,
        "destination_key": key,
        "part_size": ctx.tuning.part_size,
        "upload_concurrency": ctx.tuning.upload_concurrency,
    }
    spec_path = ctx.workdir / f"{scenario.name}-{method}-spec.json"
    result_path = ctx.workdir / f"{scenario.name}-{method}-result.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    log = ctx.logdir / f"{scenario.name}-{method}-{tag}.log"
    socket_log = log.with_name(log.name + ".sockets.json")
    measured = run_measured(
        metered(socket_log, "bench.children", method, str(spec_path), str(result_path)),
        env=child_env(ctx.endpoints.aws_env()),
        log=log,
        timeout=timeout_for(scenario),
    )
    problem = _exit_problem(measured, log)
    if problem:
        return _failed(method, scenario, measured, problem)
    result = json.loads(result_path.read_text())
    details: dict[str, Any] = {"socket_log": str(socket_log), "cpu_seconds": measured.cpu_seconds}
    if method == "raw" and result["archive_bytes"] != scenario.total_bytes:
        return _failed(method, scenario, measured, f"uploaded {result['archive_bytes']} bytes")
    if method == "download" and result["downloaded_bytes"] != scenario.total_bytes:
        return _failed(method, scenario, measured, f"downloaded {result['downloaded_bytes']} bytes")
    if method == "inmemory" and scenario.compressible:
        details["note"] = "ZIP_DEFLATED, zipfile's default level 6"
    if method != "download":
        ctx.s3.delete_object(Bucket=scenario.destination_bucket, Key=key)  # free the disk for the next one
    sockets = read_socket_log(socket_log)
    return MethodResult(
        method=method,
        ok=True,
        wall_seconds=measured.wall_seconds,
        work_seconds=result["work_seconds"],
        source_bytes=scenario.total_bytes,
        peak_rss_bytes=measured.peak_rss_bytes,
        archive_bytes=result.get("archive_bytes"),
        received_bytes=sockets.received,
        sent_bytes=sockets.sent,
        details=details,
    )


# ------------------------------------------------------------------------------------------- archiver


class NotificationWaiter(threading.Thread):
    """Long-polls the destination queue while the worker runs, and notes when the notification arrives:
    that moment, not the worker's exit (which follows one more empty poll in burst mode), ends the run."""

    def __init__(self, sqs: SQSClient, queue_url: str) -> None:
        super().__init__(name="notification-waiter", daemon=True)
        self._sqs, self._url = sqs, queue_url
        self.stop = threading.Event()
        self.notification: dict[str, Any] | None = None
        self.arrived: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while self.notification is None and not self.stop.is_set():
                response = self._sqs.receive_message(
                    QueueUrl=self._url, MaxNumberOfMessages=1, WaitTimeSeconds=1
                )
                for message in response.get("Messages", []):
                    self.arrived = time.monotonic()
                    self.notification = json.loads(message["Body"])
                    self._sqs.delete_message(QueueUrl=self._url, ReceiptHandle=message["ReceiptHandle"])
        except BaseException as exc:
            self.error = exc


def worker_env(
    ctx: RunContext, scenario: Scenario, queues: tuple[str, str], method: str = "archiver"
) -> dict[str, str]:
    """Everything the worker reads, explicit: the bench's knobs, its queues and buckets, JSON logs, and
    the settings that make `method` one of archiver's paths."""
    return child_env(
        {
            **ctx.endpoints.aws_env(),
            **ctx.tuning.worker_env(),
            "SQS_SOURCE_QUEUE": queues[0],
            "SQS_DESTINATION_QUEUE": queues[1],
            "S3_SOURCE_BUCKET": scenario.source_bucket,
            "S3_DESTINATION_BUCKET": scenario.destination_bucket,
            "HEALTH_FILE": str(ctx.workdir / "archiver.heartbeat"),
            "APP_DEBUG": "0",
            "DEV_MODE": "0",
            **dict(ctx.worker_extra_env),
            **ARCHIVER_ENV[method],
        }
    )


@dataclass
class WorkerLog:
    done: dict[str, Any] | None = None  # the canonical `request.done` line
    assembled: dict[str, Any] | None = None  # `archive.assembled`: bytes, copied_bytes, streamed_bytes
    problems: list[dict[str, Any]] = field(default_factory=list)  # every warning or error


def parse_worker_log(log: Path) -> WorkerLog:
    """The lines of the worker's log the bench reads."""
    parsed = WorkerLog()
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("py-spy>"):
            continue  # a profiled run: py-spy's own messages share the log
        try:
            event = json.loads(line)
        except ValueError:
            if line.strip():
                parsed.problems.append({"event": "unparsed", "line": line[:500]})
            continue
        if not isinstance(event, dict):
            continue
        if event.get("event") == "request.done":
            parsed.done = event
        elif event.get("event") == "archive.assembled":
            parsed.assembled = event
        elif event.get("level") in ("warning", "error", "critical"):
            parsed.problems.append(event)
    return parsed


def run_archiver(
    ctx: RunContext,
    scenario: Scenario,
    sources: list[Source],
    *,
    method: str = "archiver",
    attempt: str = "1",
    wrap: Callable[[list[str]], list[str]] | None = None,
    verify: bool = True,
) -> MethodResult:
    """Send one request, run `archiver worker --burst` in a subprocess, wait for the notification, then
    download the archive and check it. `method` picks archiver's path (ARCHIVER_ENV); `wrap` puts a
    profiler in front of the worker's command."""
    tag = f"{scenario.name}-{method}-{attempt}-{ctx.run_id}"
    source_url = ctx.sqs.create_queue(QueueName=f"bench-{tag}-requests")["QueueUrl"]
    destination_url = ctx.sqs.create_queue(QueueName=f"bench-{tag}-notifications")["QueueUrl"]
    request_id = f"bench-{tag}"
    request = {
        "files": [{"source": source.key} for source in sources],
        "request_id": request_id,
        "compression": "auto",
    }
    ctx.sqs.send_message(QueueUrl=source_url, MessageBody=json.dumps(request))
    log = ctx.logdir / f"{scenario.name}-{method}-{attempt}.log"
    socket_log = log.with_name(log.name + ".sockets.json")
    command = metered(socket_log, "archiver", "worker", "--burst")
    if wrap is not None:
        command = wrap(command)
    waiter = NotificationWaiter(ctx.sqs, destination_url)
    started = time.monotonic()
    waiter.start()
    try:
        measured = run_measured(
            command,
            env=worker_env(ctx, scenario, (source_url, destination_url), method),
            log=log,
            timeout=timeout_for(scenario),
        )
        waiter.join(NOTIFICATION_GRACE)
    finally:
        waiter.stop.set()
        waiter.join()
        for url in (source_url, destination_url):
            ctx.sqs.delete_queue(QueueUrl=url)
    worker_log = parse_worker_log(log)
    done = worker_log.done
    details: dict[str, Any] = {
        "log": str(log),
        "socket_log": str(socket_log),
        "worker_env": ARCHIVER_ENV[method],
        "worker_exit_seconds": round(measured.wall_seconds, 2),
        "worker_problems": worker_log.problems[:20],
        "request_done": done,
        "archive_assembled": worker_log.assembled,
        "cpu_seconds": measured.cpu_seconds,
    }
    notification = waiter.notification
    if waiter.arrived is not None:
        measured = Measured(measured.exit_code, waiter.arrived - started, measured.peak_rss_bytes)
    problem = _exit_problem(measured, log)
    if problem is None and waiter.error is not None:
        problem = f"waiting for the notification failed: {waiter.error!r}"
    if problem is None and notification is None:
        problem = f"no notification; worker log {log}:\n{_tail(log)}"
    if problem is None and notification is not None and notification.get("status") != "completed":
        problem = f"notification {json.dumps(notification)[:1000]}; worker log {log}"
    if problem is not None or notification is None:
        return _failed(method, scenario, measured, problem or "no notification", **details)
    archive = notification["archive"]
    if verify:
        check = check_archive(ctx.s3, notified=archive, sources=sources, workdir=ctx.workdir)
        details["archive_check"] = check.as_dict()
        if check.problems:
            return _failed(
                method,
                scenario,
                measured,
                "archive check failed: " + "; ".join(check.problems[:5]),
                **details,
            )
        details["note"] = _describe_check(check.methods, check.compressed_ratio, check.data_checked)
    ctx.s3.delete_object(Bucket=archive["bucket"], Key=archive["key"])
    sockets = read_socket_log(socket_log)
    if worker_log.assembled is not None:
        details["log_through_bytes"] = _log_through_bytes(worker_log.assembled, scenario.total_bytes)
        details["bytes_note"] = _describe_bytes(worker_log.assembled, scenario.total_bytes, sockets)
    return MethodResult(
        method=method,
        ok=True,
        wall_seconds=measured.wall_seconds,
        work_seconds=float(done["duration_s"]) if done and "duration_s" in done else None,
        source_bytes=scenario.total_bytes,
        peak_rss_bytes=measured.peak_rss_bytes,
        archive_bytes=int(archive["size"]),
        received_bytes=sockets.received,
        sent_bytes=sockets.sent,
        details=details,
    )


def _log_through_bytes(assembled: dict[str, Any], source_bytes: int) -> dict[str, int]:
    """What archiver's `archive.assembled` line implies passed through it: it uploaded `streamed_bytes`
    of the archive, and downloaded every source byte that S3 did not copy (entries here are STORED or
    deflate level 0, so a copied archive byte is a source byte). HTTP and SQS overhead come on top."""
    downloaded = source_bytes - int(assembled["copied_bytes"])
    return {"downloaded": downloaded, "uploaded": int(assembled["streamed_bytes"])}


def _describe_bytes(assembled: dict[str, Any], source_bytes: int, sockets: SocketBytes) -> str:
    expected = _log_through_bytes(assembled, source_bytes)
    mib = 1024 * 1024
    copied, uploaded, downloaded = (
        int(assembled["copied_bytes"]) / mib,
        expected["uploaded"] / mib,
        expected["downloaded"] / mib,
    )
    text = (
        f"archive.assembled: {copied:,.1f} MiB copied in S3, {uploaded:,.1f} MiB uploaded by the worker "
        f"(so {downloaded:,.1f} MiB of sources downloaded), {assembled.get('parts', '?')} parts"
    )
    if sockets.received is None or sockets.sent is None:
        return text + "; sockets not counted"
    return text + (
        f"; sockets: {sockets.received / mib:,.1f} MiB received, {sockets.sent / mib:,.1f} MiB sent"
    )


def _describe_check(methods: dict[str, int], ratio: float | None, data_checked: bool) -> str:
    kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(methods.items()))
    crc = "names, sizes, CRCs and every byte checked" if data_checked else "names, sizes and CRCs checked"
    return f"verified: {kinds} entries, compressed/original {ratio}; {crc}"
