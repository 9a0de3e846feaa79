"""While one request is worked on, from its receipt to its settling: its message kept invisible, the health
file fresh, the lease renewed with the progress, task protection renewed, JOB_TIMEOUT enforced, and a
cancel looked for (one GET of decision.json a beat), so a cancelled job stops within one beat."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

log = structlog.get_logger(__name__)

# The health file is touched at least this often: by the loop before every poll (at most 20 s each) and
# by the heartbeat while a request is handled. `archiver check` allows three of these.
HEALTH_INTERVAL = 30
HEALTH_MAX_AGE = 3 * HEALTH_INTERVAL
StopReason = Literal["timeout", "lease_lost", "cancelled"]  # why the heartbeat stopped the job
STATUS_INTERVAL = 5  # seconds between lease renewals (status.json progress) while a job runs


def touch_health_file(path: str) -> None:
    with contextlib.suppress(OSError):
        Path(path).touch()


def extension_interval(visibility_timeout: int) -> float:
    """How often a message's visibility is extended: well before it runs out, and no less often than the
    health file needs touching."""
    return max(1.0, min(visibility_timeout / 3, HEALTH_INTERVAL))


@dataclass(frozen=True)
class Beats:
    """What the heartbeat does at its ticks; each callable is the caller's, so this module talks to no
    AWS service itself. `renew_lease` returns False when the lease turned out to be another worker's."""

    health_file: str
    visibility_timeout: int
    job_timeout: int
    extend_visibility: Callable[[], None]
    renew_lease: Callable[[], bool]
    renew_protection: Callable[[], None]
    stop_job: Callable[[StopReason], None]  # the job ends at its next chunk
    on_extended: Callable[[], None] = lambda: None
    cancelled: Callable[[], bool] = lambda: False  # a cancel binds the request (archiver.decision)


@contextlib.contextmanager
def running(beats: Beats) -> Iterator[None]:
    """Beat in a thread for as long as the block runs."""
    done = threading.Event()
    extend_every = extension_interval(beats.visibility_timeout)
    tick = min(extend_every, STATUS_INTERVAL)
    deadline = time.monotonic() + beats.job_timeout
    context = structlog.contextvars.get_contextvars()

    def beat() -> None:
        next_extension = time.monotonic() + extend_every
        with structlog.contextvars.bound_contextvars(**context):
            while not done.wait(tick):
                touch_health_file(beats.health_file)
                now = time.monotonic()
                if now > deadline:
                    log.warning("request.timeout", job_timeout=beats.job_timeout)
                    beats.stop_job("timeout")
                    return
                if not beats.renew_lease():
                    beats.stop_job("lease_lost")
                    return
                if beats.cancelled():
                    log.info("request.cancel_seen")
                    beats.stop_job("cancelled")
                    return
                beats.renew_protection()  # renews a protection that is getting old
                if now >= next_extension:
                    next_extension = now + extend_every
                    try:
                        beats.extend_visibility()
                        beats.on_extended()
                        log.debug("request.visibility_extended", seconds=beats.visibility_timeout)
                    except Exception as exc:
                        log.warning("request.extend_failed", error=repr(exc))

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
