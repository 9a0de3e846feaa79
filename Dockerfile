# The archiver worker. Build: `docker build -t archiver .`; run: see docker-compose.yml and docs/localstack.md.
# tests/test_dev_loop.py runs this file's pip install, ENTRYPOINT/CMD and HEALTHCHECK in a fresh venv,
# since Docker itself does not run in CI.

# Pinned by digest (the multi-architecture index, so amd64 and arm64 builds both resolve), like
# constraints.txt pins the packages: a rebuild gets the same base until this line is changed.
FROM python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Dependencies first, in their own layer: pyproject.toml's list, pinned by constraints.txt like
# `make venv`, no dev extras. A change to the code or the README does not reinstall them.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r requirements.txt
# Then the package itself, whose dependencies are all there already.
COPY README.md ./
COPY archiver/ archiver/
RUN pip install --no-cache-dir --no-deps .


FROM python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

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
