"""The fan-out scenario (issue #15): one request of 256 x 2 MiB photos, made by one worker with fan-out
off, then by four long-running workers with `FANOUT_SEGMENT_BYTES` set (the first to receive the request
coordinates, any of them builds segments), then by four again with one of them SIGKILLed mid-run.

Every worker reaches S3 through a proxy of its own (bench/latency.py) that adds 20 ms to each response's
first byte and caps its bandwidth at 12 MB/s each way: one task's share of the network. Without the cap,
every worker on this machine would share one loopback and one memory bus, and four could not be faster
than one for a reason that has nothing to do with S3; without a proxy per worker, four workers would
share one task's link. SQS goes straight to moto.

The workers are started first and the clock starts when the request is sent, once every one of them is
polling: the time is from the send to the notification's arrival, with no interpreter start-up in it.
They run without `--burst` (a burst worker exits when the queue is momentarily empty, which it is between
the request and its segment tasks) and are stopped with SIGTERM once the notification has arrived.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import time
from typing import Any

from bench import servers
from bench.fanout_workers import Worker, start_worker, stop_workers, wait_ready
from bench.methods import (
    NotificationWaiter,
    RunContext,
    parse_worker_log,
    read_socket_log,
    timeout_for,
    worker_env,
)
from bench.report import MethodResult
from bench.scenarios import FANOUT_METHODS, MiB, Scenario, Source
from bench.verify import check_archive

WORKERS = {"fanout-1": 1, "fanout-2": 2, "fanout-4": 4, "fanout-8": 8, "fanout-4-kill": 4}
PROXY_LATENCY_MS = 20.0
PROXY_RATE_BYTES_PER_S = 12_000_000  # each way, per worker
# 64 MiB segments for the full 512 MiB; proportionally smaller for --quick, but not below archiver's
# minimum (a segment is at least one part of S3's 5 MiB).
SEGMENT_BYTES = 64 * MiB
FULL_SOURCE_BYTES = 512 * MiB
MIN_SEGMENT_BYTES = 5 * MiB
# A SIGKILLed worker's segment task comes back after one visibility timeout: the default 120 s would
# make the kill run measure mostly waiting. 20 s here (archiver allows 10 and up).
VISIBILITY_TIMEOUT = 20
# Polls last at most SHUTDOWN_GRACE seconds (archiver.worker.poll_seconds), so a stop at the end of a
# run takes at most this long.
SHUTDOWN_GRACE = 5
# The SIGKILLed worker: worker #2 (#3 if #2 coordinates), KILL_SEGMENT_FRACTION of a segment's transfer
# at the proxy's rate after the coordinator logs its plan (`fanout.planned`; the segment tasks are sent
# then, and every idle worker takes one at once), so it dies with a segment in hand. Without a plan within
# KILL_FALLBACK_SECONDS of the send (fan-out off, or an archiver without it), it dies then.
KILL_SEGMENT_FRACTION = 0.5
KILL_FALLBACK_SECONDS = 15.0
PLANNED_EVENT = "fanout.planned"
# Events every worker logs whatever it does: not a sign of work on a request.
_IDLE_EVENTS = frozenset({"worker.started", "worker.stopping", "worker.stopped"})


def fanout_in_archiver() -> bool:
    """Whether this archiver has fan-out (the setting exists)."""
    from archiver.settings import Settings

    return "fanout_segment_bytes" in Settings.model_fields


def segment_bytes(scenario: Scenario, ctx: RunContext | None = None) -> int:
    """64 MiB for 512 MiB of sources, in proportion for --quick; `--worker-env FANOUT_SEGMENT_BYTES=N`
    sets it for the four-worker runs (an experiment: the one-worker run keeps fan-out off)."""
    override = dict(ctx.worker_extra_env).get("FANOUT_SEGMENT_BYTES") if ctx is not None else None
    if override:
        return int(override)
    return max(MIN_SEGMENT_BYTES, SEGMENT_BYTES * scenario.total_bytes // FULL_SOURCE_BYTES)


def kill_delay(segment: int) -> float:
    """Seconds from the coordinator's plan to the SIGKILL: part of one segment's transfer."""
    return KILL_SEGMENT_FRACTION * segment / PROXY_RATE_BYTES_PER_S


def _worker_env(
    ctx: RunContext, scenario: Scenario, queues: tuple[str, str], proxy: str, segment: int, index: int
) -> dict[str, str]:
    proxied = dataclasses.replace(ctx, endpoints=dataclasses.replace(ctx.endpoints, s3=proxy))
    env = worker_env(proxied, scenario, queues)
    env.update(
        VISIBILITY_TIMEOUT=str(VISIBILITY_TIMEOUT),
        SHUTDOWN_GRACE=str(SHUTDOWN_GRACE),
        HEALTH_FILE=str(ctx.workdir / f"archiver-fanout-{index}.heartbeat"),
    )
    if fanout_in_archiver():
        env["FANOUT_SEGMENT_BYTES"] = str(segment)
    return env


def _about_request(event: dict[str, Any], request_id: str) -> bool:
    """Whether a log line is work on this request (the request itself, or one of its segment tasks)."""
    if event.get("event") in _IDLE_EVENTS:
        return False
    return event.get("request_id") == request_id or request_id in json.dumps(event)


class Killer:
    """For the kill run: picks the victim and SIGKILLs it (see KILL_SEGMENT_FRACTION)."""

    def __init__(self, workers: list[Worker], request_id: str, delay: float) -> None:
        self.workers, self.request_id, self.delay = workers, request_id, delay
        self.coordinator: Worker | None = None
        self.planned_at: float | None = None
        self.victim: Worker | None = None
        self.reason = ""

    def tick(self, new_events: dict[int, list[dict[str, Any]]], now: float, started: float) -> None:
        if self.victim is not None:
            return
        for worker in self.workers:
            for event in new_events.get(worker.index, []):
                if not _about_request(event, self.request_id):
                    continue
                if self.coordinator is None:
                    self.coordinator = worker  # the first to log the request received it
                if event.get("event") == PLANNED_EVENT and self.planned_at is None:
                    self.coordinator, self.planned_at = worker, now
        if self.planned_at is not None:
            if now - self.planned_at < self.delay:
                return
            self.reason = f"{now - self.planned_at:.1f} s after the coordinator's plan"
        elif now - started >= KILL_FALLBACK_SECONDS:
            self.reason = f"no plan logged in {KILL_FALLBACK_SECONDS:g} s"
        else:
            return
        second = self.workers[1]
        victim = second if second is not self.coordinator else self.workers[2]
        victim.events_before_kill = [
            str(e.get("event")) for e in victim.tail.events if _about_request(e, self.request_id)
        ]
        victim.signal(signal.SIGKILL)
        victim.killed_at = now
        self.victim = victim

    def as_dict(self, started: float) -> dict[str, Any]:
        victim = self.victim
        redone = [
            {
                "worker": worker.index,
                "segment": event.get("segment"),
                "receive_count": event.get("receive_count"),
            }
            for worker in self.workers
            for event in worker.tail.events
            if event.get("event") == "segment_task.done"
            and event.get("outcome") == "built"
            and int(event.get("receive_count") or 1) > 1
        ]
        return {
            "victim": None if victim is None else victim.index,
            "coordinator": None if self.coordinator is None else self.coordinator.index,
            "reason": self.reason,
            "planned_after_s": None if self.planned_at is None else round(self.planned_at - started, 2),
            "killed_after_s": None
            if victim is None or victim.killed_at is None
            else round(victim.killed_at - started, 2),
            # What the victim had logged about the request: no `segment.built` means it died mid-segment.
            "victim_events_before_kill": [] if victim is None else victim.events_before_kill[-30:],
            "segments_built_again": redone,
        }


def _request_done(workers: list[Worker], request_id: str) -> tuple[Worker | None, dict[str, Any] | None]:
    """The coordinator's canonical line: `request.done` for this request with the archive's size."""
    for worker in workers:
        for event in worker.tail.events:
            if (
                event.get("event") == "request.done"
                and event.get("request_id") == request_id
                and "size" in event
            ):
                return worker, event
    return None, None


def _event_counts(worker: Worker, request_id: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for event in worker.tail.events:
        if _about_request(event, request_id):
            name = str(event.get("event"))
            counts[name] = counts.get(name, 0) + 1
    return counts


def run_fanout(
    ctx: RunContext, scenario: Scenario, sources: list[Source], *, method: str, attempt: str
) -> MethodResult:
    """One of FANOUT_METHODS: start its workers (each behind its own proxy), send the request, time it to
    the notification (SIGKILLing one worker on the way for `fanout-4-kill`), stop them, check the archive
    and take its SHA-256."""
    assert method in FANOUT_METHODS
    count = WORKERS[method]
    segment = 0 if count == 1 else segment_bytes(scenario, ctx)
    tag = f"{method}-{attempt}"
    qtag = f"{scenario.name}-{tag}-{ctx.run_id}"
    source_url = ctx.sqs.create_queue(QueueName=f"bench-{qtag}-requests")["QueueUrl"]
    destination_url = ctx.sqs.create_queue(QueueName=f"bench-{qtag}-notifications")["QueueUrl"]
    queues = (source_url, destination_url)
    request_id = f"bench-{qtag}"
    timeout = timeout_for(scenario) + (VISIBILITY_TIMEOUT if method == "fanout-4-kill" else 0)
    workers: list[Worker] = []
    killer: Killer | None = None
    waiter = NotificationWaiter(ctx.sqs, destination_url)
    started = arrived = 0.0
    problem: str | None = None
    try:
        with contextlib.ExitStack() as stack:
            proxies = [
                stack.enter_context(
                    servers.latency_proxy(
                        ctx.endpoints.s3,
                        PROXY_LATENCY_MS,
                        ctx.workdir,
                        rate_bytes_per_s=PROXY_RATE_BYTES_PER_S,
                        name=f"{tag}-worker{index}",
                    )
                )
                for index in range(1, count + 1)
            ]
            stack.callback(stop_workers, workers)
            for index, proxy in enumerate(proxies, start=1):
                env = _worker_env(ctx, scenario, queues, proxy, segment, index)
                workers.append(start_worker(ctx, scenario, queues, env, index, tag))
            wait_ready(workers)
            if method == "fanout-4-kill":
                killer = Killer(workers, request_id, kill_delay(segment))
            request = {
                "files": [{"source": source.key} for source in sources],
                "request_id": request_id,
                "compression": "auto",
            }
            waiter.start()
            started, sent_at = time.monotonic(), time.time()
            ctx.sqs.send_message(QueueUrl=source_url, MessageBody=json.dumps(request))
            while waiter.is_alive() and waiter.arrived is None:
                now = time.monotonic()
                new = {worker.index: worker.tail.poll() for worker in workers}
                if killer is not None:
                    killer.tick(new, now, started)
                dead = [w.index for w in workers if w.process.poll() is not None and w.killed_at is None]
                if dead:
                    problem = f"worker(s) {dead} exited during the run"
                    break
                if now - started > timeout:
                    problem = f"no notification after {timeout:.0f} s"
                    break
                time.sleep(0.05)
            arrived = waiter.arrived or time.monotonic()
            waiter.stop.set()
            waiter.join()
            stop_workers(workers)
            for worker in workers:
                worker.tail.poll()
    finally:
        waiter.stop.set()
        with contextlib.suppress(RuntimeError):
            waiter.join()
        for url in queues:
            ctx.sqs.delete_queue(QueueUrl=url)
    outcome = _result(
        ctx,
        scenario,
        sources,
        method,
        workers,
        killer,
        waiter,
        request_id,
        segment,
        problem,
        arrived - started,
        started,
    )
    # The send on the logs' clock: bench/fleet_costs.py times each phase of the run from it.
    outcome.details["sent_at_unix"] = sent_at
    return outcome


def _result(
    ctx: RunContext,
    scenario: Scenario,
    sources: list[Source],
    method: str,
    workers: list[Worker],
    killer: Killer | None,
    waiter: NotificationWaiter,
    request_id: str,
    segment: int,
    problem: str | None,
    seconds: float,
    started: float,
) -> MethodResult:
    coordinator, done = _request_done(workers, request_id)
    per_worker = []
    problems: list[dict[str, Any]] = []
    received = sent = 0
    counted = True
    for worker in workers:
        usage = worker.usage()
        sockets = read_socket_log(worker.socket_log)
        if sockets.received is None or sockets.sent is None:
            counted = False
        else:
            received += sockets.received
            sent += sockets.sent
        parsed = parse_worker_log(worker.log)
        problems.extend({"worker": worker.index, **item} for item in parsed.problems)
        per_worker.append(
            {
                "worker": worker.index,
                "proxy": worker.proxy,
                "log": str(worker.log),
                "exit_code": usage.get("exit_code"),
                # Still running STOP_GRACE s after SIGTERM: SIGKILLed (so no peak RSS), its stacks dumped.
                "ignored_sigterm": worker.stuck_dump is not None
                or (worker.killed_at is None and usage.get("exit_code") == -signal.SIGKILL),
                "stuck_dump": None if worker.stuck_dump is None else str(worker.stuck_dump),
                "peak_rss_mib": round(int(usage.get("max_rss_kib", 0)) / 1024, 1),
                "cpu_seconds": usage.get("cpu_seconds"),
                "coordinator": worker is coordinator,
                "killed": worker.killed_at is not None,
                "events": _event_counts(worker, request_id),
                "received_bytes": sockets.received,
                "sent_bytes": sockets.sent,
            }
        )
    peak = max((int(w.usage().get("max_rss_kib", 0)) * 1024 for w in workers), default=0)
    details: dict[str, Any] = {
        "workers": per_worker,
        "worker_problems": problems[:30],
        "request_done": done,
        "fanout_in_archiver": fanout_in_archiver(),
        "fanout_segment_bytes": segment,
        "proxy": {"latency_ms": PROXY_LATENCY_MS, "rate_bytes_per_s_each_way": PROXY_RATE_BYTES_PER_S},
        "visibility_timeout": VISIBILITY_TIMEOUT,
        "timing": "wall seconds = send → notification (workers already polling)",
    }
    if killer is not None:
        details["kill"] = killer.as_dict(started)
    failed = MethodResult(
        method=method,
        ok=False,
        wall_seconds=seconds,
        work_seconds=None,
        source_bytes=scenario.total_bytes,
        peak_rss_bytes=peak,
        details=details,
    )
    notification = waiter.notification
    if problem is None and waiter.error is not None:
        problem = f"waiting for the notification failed: {waiter.error!r}"
    if problem is None and notification is None:
        problem = "no notification"
    if problem is None and notification is not None and notification.get("status") != "completed":
        problem = f"notification {json.dumps(notification)[:1000]}"
    if killer is not None and problem is None and (killer.victim is None or killer.victim.killed_at is None):
        problem = "the notification came before any worker was killed"
    if problem is not None or notification is None:
        failed.error = f"{problem}; logs {', '.join(str(w.log) for w in workers)}"
        return failed
    archive = notification["archive"]
    check = check_archive(ctx.s3, notified=archive, sources=sources, workdir=ctx.workdir, digest=True)
    details["archive_check"] = check.as_dict()
    details["archive_sha256"] = check.sha256
    ctx.s3.delete_object(Bucket=archive["bucket"], Key=archive["key"])
    if check.problems:
        failed.error = "archive check failed: " + "; ".join(check.problems[:5])
        return failed
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(check.methods.items()))
    details["note"] = f"verified: {kinds} entries; sha256 {check.sha256[:16] if check.sha256 else '-'}…"
    return MethodResult(
        method=method,
        ok=True,
        wall_seconds=seconds,
        work_seconds=float(done["duration_s"]) if done and "duration_s" in done else None,
        source_bytes=scenario.total_bytes,
        peak_rss_bytes=peak,
        archive_bytes=int(archive["size"]),
        received_bytes=received if counted else None,
        sent_bytes=sent if counted else None,
        details=details,
    )
