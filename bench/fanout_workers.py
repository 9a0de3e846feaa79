"""The fan-out scenario's workers (bench/fanout.py): each a long-running `archiver worker` behind its own
proxy, its log read as it is written, signalled, stopped, its stacks dumped if it ignores the stop."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.methods import STOP_GRACE, RunContext, launch, metered, read_usage
from bench.scenarios import Scenario

READY_TIMEOUT = 60.0


class LogTail:
    """The JSON lines a worker has logged so far, read incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self.events: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as log:
                log.seek(self._offset)
                data = log.read()
        except OSError:
            return []
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        new = []
        for line in lines:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    new.append(event)
        self.events.extend(new)
        return new


@dataclass
class Worker:
    index: int  # 1-based, as printed
    proxy: str
    process: subprocess.Popen[bytes]  # bench/launch.py, whose child is the worker
    log: Path
    usage_path: Path
    socket_log: Path
    tail: LogTail
    killed_at: float | None = None
    events_before_kill: list[str] = field(default_factory=list)
    stuck_dump: Path | None = None  # py-spy's dump, if it ignored SIGTERM for STOP_GRACE seconds

    def worker_pid(self) -> int | None:
        """The measured process: the launcher's only child."""
        pid = self.process.pid
        with contextlib.suppress(OSError, ValueError):
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            if children:
                return int(children[0])
        return None

    def signal(self, signum: int) -> None:
        """Signal the worker itself, not the launcher, which must live to record its peak RSS."""
        pid = self.worker_pid()
        with contextlib.suppress(ProcessLookupError):
            if pid is not None:
                os.kill(pid, signum)
            else:
                os.killpg(self.process.pid, signum)

    def usage(self) -> dict[str, Any]:
        return read_usage(self.usage_path, self.process)


def start_worker(
    ctx: RunContext, scenario: Scenario, queues: tuple[str, str], env: dict[str, str], index: int, tag: str
) -> Worker:
    log = ctx.logdir / f"{scenario.name}-{tag}-worker{index}.log"
    socket_log = log.with_name(log.name + ".sockets.json")
    process, usage_path = launch(metered(socket_log, "archiver", "worker"), env=env, log=log)
    return Worker(
        index=index,
        proxy=env["AWS_ENDPOINT_URL_S3"],
        process=process,
        log=log,
        usage_path=usage_path,
        socket_log=socket_log,
        tail=LogTail(log),
    )


def stop_workers(workers: list[Worker]) -> None:
    """SIGTERM to every worker at once (each ends its poll, at most SHUTDOWN_GRACE s), SIGKILL to any still
    there after STOP_GRACE, once py-spy has recorded where its threads were (beside its log)."""
    for worker in workers:
        if worker.process.poll() is None:
            worker.signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    for worker in workers:
        try:
            worker.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            dump_stacks(worker)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.process.pid, signal.SIGKILL)
            worker.process.wait()


def dump_stacks(worker: Worker) -> None:
    """`py-spy dump` of a worker that ignored SIGTERM, if py-spy is installed (it is with `.[bench]`)."""
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    pid = worker.worker_pid()
    if py_spy is None or pid is None:
        return
    output = worker.log.with_name(worker.log.name + ".stuck.txt")
    with contextlib.suppress(OSError, subprocess.SubprocessError), output.open("wb") as out:
        subprocess.run(
            [py_spy, "dump", "--native", "--pid", str(pid)],
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=60,
            check=False,
        )
    worker.stuck_dump = output


def wait_ready(workers: list[Worker]) -> None:
    started = time.monotonic()
    waiting = set(range(len(workers)))
    while waiting:
        for position in sorted(waiting):
            worker = workers[position]
            if any(event.get("event") == "worker.started" for event in worker.tail.poll()):
                waiting.discard(position)
            elif worker.process.poll() is not None:
                raise RuntimeError(f"worker {worker.index} exited at start-up; log {worker.log}")
        if time.monotonic() - started > READY_TIMEOUT:
            raise RuntimeError(
                f"workers {sorted(p + 1 for p in waiting)} not polling after {READY_TIMEOUT} s"
            )
        time.sleep(0.05)
