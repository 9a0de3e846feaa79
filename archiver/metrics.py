"""CloudWatch metrics as Embedded Metric Format lines on stdout, one per request.

CloudWatch Logs (the awslogs driver on ECS) turns each line into metrics without any API call from the
worker. The lines are written by AWS's own `aws-embedded-metrics` library, in its "local" (stdout)
environment, so the format follows the specification rather than our reading of it. Dimensions stay
low-cardinality (outcome, error code); ids travel as properties, searchable in Logs Insights.
"""

from __future__ import annotations

import functools
from typing import Any

NAMESPACE = "archiver"


@functools.cache
def _configure() -> None:
    # Imported on first use: the library pulls in aiohttp (~10 MiB), which a worker that never
    # finishes a request, or a command other than `worker`, does not need.
    from aws_embedded_metrics.config import get_config

    config = get_config()
    config.environment = "local"  # stdout; the ECS/EC2 probes would look for an agent we do not run
    config.namespace = NAMESPACE
    config.service_name = "archiver"
    config.service_type = "ECS"


def emit_request(
    *,
    outcome: str,
    error_code: str | None,
    duration_s: float,
    queue_latency_s: float | None,
    size: int | None,
    entries: int | None,
    extensions: int,
    copied: int | None = None,
    properties: dict[str, Any],
) -> None:
    """One EMF line for one settled request (completed, duplicate, failed or released)."""
    from aws_embedded_metrics.logger.metrics_logger_factory import create_metrics_logger
    from aws_embedded_metrics.unit import Unit

    _configure()
    metrics = create_metrics_logger()
    metrics.set_namespace(NAMESPACE)
    if error_code:
        metrics.set_dimensions({"Outcome": outcome}, {"Outcome": outcome, "ErrorCode": error_code})
    else:
        metrics.set_dimensions({"Outcome": outcome})
    metrics.put_metric("Requests", 1, Unit.COUNT.value)
    metrics.put_metric("Duration", duration_s, Unit.SECONDS.value)
    metrics.put_metric("VisibilityExtensions", extensions, Unit.COUNT.value)
    if queue_latency_s is not None:
        metrics.put_metric("QueueLatency", queue_latency_s, Unit.SECONDS.value)
    if size is not None:
        metrics.put_metric("ArchiveBytes", size, Unit.BYTES.value)
    if entries is not None:
        metrics.put_metric("ArchiveEntries", entries, Unit.COUNT.value)
    if copied is not None:  # archive bytes S3 copied itself, which never passed through the worker
        metrics.put_metric("CopiedBytes", copied, Unit.BYTES.value)
    for key, value in properties.items():
        metrics.set_property(key, value)
    metrics.flush_sync()
