"""ECS task scale-in protection: a task busy with an archive is not picked for scale-in.

The ECS agent serves `$ECS_AGENT_URI/task-protection/v1/state` inside every task: PUT
`{"ProtectionEnabled": bool, "ExpiresInMinutes": n}`, answered 200 with `{"protection": {...}}` on
success but also 200 with `{"failure": {...}}` when ECS refused, or 4xx/5xx with `{"error": {...}}`.
Protection is asked for once a message is received and dropped once it is settled (AWS's advice for
queue workers), so an idle task stays free for scale-in and deployments; a long job renews it. A stop
between the receive and the protection is the SIGTERM path: the message is handed back at once.
Nothing here ever stops the worker: an error is logged and the worker goes on unprotected.
Outside ECS (no ECS_AGENT_URI) it does nothing.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger(__name__)

# The IAM action the agent performs with the task role when we PUT the state (we never GET it).
IAM_ACTIONS = ("ecs:UpdateTaskProtection",)
PROTECTION_MINUTES = 15
RENEW_AFTER_SECONDS = 5 * 60
TIMEOUT_SECONDS = 5


@dataclass
class TaskProtection:
    agent_uri: str | None = field(default_factory=lambda: os.environ.get("ECS_AGENT_URI") or None)
    protected: bool = False
    renewed_at: float = 0.0

    def protect(self) -> None:
        """Protect the task, or renew a protection that is getting old."""
        if self.protected and time.monotonic() - self.renewed_at < RENEW_AFTER_SECONDS:
            return
        if self._put(enabled=True):
            self.protected, self.renewed_at = True, time.monotonic()

    def release(self) -> None:
        """Let ECS scale this task in again (idle)."""
        if self.protected and self._put(enabled=False):
            self.protected = False

    def _put(self, *, enabled: bool) -> bool:
        if not self.agent_uri:
            return False
        body: dict[str, object] = {"ProtectionEnabled": enabled}
        if enabled:
            body["ExpiresInMinutes"] = PROTECTION_MINUTES
        request = urllib.request.Request(  # noqa: S310 - the ECS agent's own http:// endpoint
            f"{self.agent_uri.rstrip('/')}/task-protection/v1/state",
            data=json.dumps(body).encode(),
            method="PUT",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:  # noqa: S310
                answer = json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            log.warning(
                "protection.error",
                enabled=enabled,
                status=exc.code,
                body=exc.read()[:500].decode(errors="replace"),
            )
            return False
        except (OSError, ValueError) as exc:
            log.warning("protection.error", enabled=enabled, error=f"{type(exc).__name__}: {exc}")
            return False
        if "failure" in answer or "error" in answer or "protection" not in answer:
            log.warning("protection.refused", enabled=enabled, answer=answer)
            return False
        log.debug("protection.set", enabled=enabled, protection=answer["protection"])
        return True
