# The archiver worker. Build: `docker build -t archiver .`; run: see docker-compose.yml and docs/localstack.md.
# tests/test_dev_loop.py runs this file's pip install, ENTRYPOINT/CMD and HEALTHCHECK in a fresh venv,
# since Docker itself does not run in CI.

FROM python:3.11-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY archiver/ archiver/
# Pinned by constraints.txt, like `make venv`; no dev extras.
RUN pip install --no-cache-dir -c constraints.txt .


FROM python:3.11-slim-bookworm

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# A non-root user, numeric so that `runAsNonRoot` checks can verify it.
RUN groupadd --system --gid 10001 archiver \
    && useradd --system --no-log-init --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin archiver
COPY --from=build /opt/venv /opt/venv

USER 10001:10001

# The worker is PID 1 (exec form) and handles SIGTERM itself: it stops receiving and finishes or releases
# its job within SHUTDOWN_GRACE seconds, so give it that plus a margin (stop_grace_period) before SIGKILL.
STOPSIGNAL SIGTERM
# `archiver check` passes while the heartbeat file (HEALTH_FILE) is younger than 90 s.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 CMD ["archiver", "check"]
ENTRYPOINT ["archiver"]
CMD ["worker"]
