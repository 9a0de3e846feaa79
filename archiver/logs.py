"""structlog set-up: JSON lines in production, console in DEV_MODE, secrets scrubbed from every event."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_PATTERNS = (
    re.compile(r"(X-Amz-(?:Signature|Credential|Security-Token)=)[^&\s\"']+", re.IGNORECASE),
    re.compile(
        r"((?:aws_secret_access_key|aws_session_token|SecretAccessKey|SessionToken)[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+",
        re.IGNORECASE,
    ),
)


def scrub(text: str) -> str:
    """Blank out presigned-URL signatures and credential values."""
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(r"\1REDACTED", text)
    return text


_SECRET_KEYS = ("secret", "token", "password", "credential", "signature")


def _scrub_item(key: object, value: Any) -> Any:
    if isinstance(key, str) and any(word in key.lower() for word in _SECRET_KEYS):
        return "REDACTED"
    return _scrub_values(value)


def _scrub_values(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: _scrub_item(k, v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub_values(v) for v in value]
    return value


def redact_secrets(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A processor that runs last before rendering, so nothing an event carries escapes it."""
    for key, value in event_dict.items():
        event_dict[key] = _scrub_item(key, value)
    return event_dict


def configure_logging(*, debug: bool, dev_mode: bool, stream: Any = None) -> None:
    level = logging.DEBUG if debug else logging.INFO
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False) if dev_mode else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    # botocore, urllib3 and moto log through the standard library: render their records the same way and
    # scrub them too. They stay at WARNING even with APP_DEBUG, since botocore's debug output prints
    # request signatures.
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer,
            foreign_pre_chain=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                redact_secrets,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)
