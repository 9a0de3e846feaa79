"""`python -m bench.latency UPSTREAM_HOST:PORT DELAY_MS [--rate-bytes-per-s N]`: a TCP proxy on a free port
of 127.0.0.1 that holds back the first byte of every HTTP response by DELAY_MS, the way S3 answers from tens
of milliseconds away, and (with `--rate-bytes-per-s`) caps its bandwidth at N bytes a second each way. It
prints `listening on http://127.0.0.1:PORT` once it accepts connections, and runs until SIGTERM.

Why: local servers answer in well under a millisecond, so a bench against them measures client CPU, not
what AWS users see. S3 itself takes ~20-50 ms to a first byte; with that latency the number of requests
in flight, not the CPU per request, decides how fast thousands of small objects are read. The rate cap
stands for one task's share of the network (the fan-out scenario, bench/fanout.py): on loopback every
process would otherwise share one machine's memory bandwidth, and more workers could not go faster.

How: one asyncio task per direction of each connection. Bytes from the client go upstream at once and
mark the connection as waiting for an answer; the first bytes that come back after that are held for
DELAY_MS, the rest of the response follows them without delay. HTTP/1.1 clients (botocore, object_store)
never pipeline, so every request gets its own delay; a `100 Continue` before an upload's body counts as
an answer too, as a real round trip would. The cap is a token bucket per direction, shared by every
connection of this proxy (uploads by all of them together get N bytes a second, downloads another N);
a chunk that overdraws the bucket waits until the debt is paid, so concurrent connections are served
first come, first served, and the burst is at most one chunk. Stdlib only, in its own process so that it
never shares a GIL with a measured method (it does share the machine's cores, like the S3 server does).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import signal
import socket
import sys
import threading
import time

CHUNK = 256 * 1024


class TokenBucket:
    """`rate` bytes a second, at most `burst` saved up while idle; shared by the connections of one
    direction. `delay(n)` takes n bytes (the balance may go negative) and says how long to wait before
    sending them: the time the debt takes to refill."""

    def __init__(self, rate: float, burst: int = CHUNK) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()
        self._lock = threading.Lock()  # the splice engine's connections take from it in threads

    def delay(self, size: int) -> float:
        with self._lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= size
            return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class _Connection:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.waiting = False  # a request went upstream and its answer has not started yet


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    connection: _Connection,
    *,
    downstream: bool,
    bucket: TokenBucket | None,
) -> None:
    try:
        while data := await reader.read(CHUNK):
            if not downstream:
                connection.waiting = True
            elif connection.waiting:
                connection.waiting = False
                await asyncio.sleep(connection.delay)
            if bucket is not None and (wait := bucket.delay(len(data))) > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()


def _no_delay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def serve(upstream: tuple[str, int], delay: float, rate: float | None = None) -> None:
    # One bucket per direction for the whole proxy: the cap is on the link, not on each connection.
    up_bucket = None if rate is None else TokenBucket(rate)
    down_bucket = None if rate is None else TokenBucket(rate)

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*upstream)
        except OSError:
            client_writer.close()
            return
        _no_delay(client_writer)
        _no_delay(up_writer)
        connection = _Connection(delay)
        await asyncio.gather(
            _pump(client_reader, up_writer, connection, downstream=False, bucket=up_bucket),
            _pump(up_reader, client_writer, connection, downstream=True, bucket=down_bucket),
        )
        for writer in (client_writer, up_writer):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=512)
    port = server.sockets[0].getsockname()[1]
    print(f"listening on http://127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


# ------------------------------------------------------------------ splice engine (the default)
# The bytes never enter Python: each direction of a connection is a thread moving them socket -> pipe ->
# socket with splice(2), and only counts them (to hold back an answer's first byte, and for the cap).
# The asyncio engine copies every byte through Python twice; on two cores shared with the S3 server and
# the worker measured, that was CPU the measured method did not get (`--engine asyncio` to compare).
PIPE_BYTES = 1024 * 1024
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def _relay(
    source: socket.socket,
    target: socket.socket,
    connection: _Connection,
    *,
    downstream: bool,
    bucket: TokenBucket | None,
) -> None:
    read_end, write_end = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(write_end, F_SETPIPE_SZ, PIPE_BYTES)
    try:
        while moved := os.splice(source.fileno(), write_end, PIPE_BYTES):
            if not downstream:
                connection.waiting = True
            elif connection.waiting:
                connection.waiting = False
                time.sleep(connection.delay)
            if bucket is not None and (wait := bucket.delay(moved)) > 0:
                time.sleep(wait)
            while moved:
                moved -= os.splice(read_end, target.fileno(), moved)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)
        os.close(read_end)
        os.close(write_end)


def _splice_connection(
    client: socket.socket, upstream: tuple[str, int], delay: float, buckets: tuple[TokenBucket | None, ...]
) -> None:
    try:
        server = socket.create_connection(upstream)
    except OSError:
        client.close()
        return
    for sock in (client, server):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    connection = _Connection(delay)
    up = threading.Thread(
        target=_relay, args=(client, server, connection), kwargs={"downstream": False, "bucket": buckets[0]}
    )
    up.start()
    _relay(server, client, connection, downstream=True, bucket=buckets[1])
    up.join()
    client.close()
    server.close()


def serve_splice(upstream: tuple[str, int], delay: float, rate: float | None = None) -> None:
    buckets = (None, None) if rate is None else (TokenBucket(rate), TokenBucket(rate))
    listener = socket.create_server(("127.0.0.1", 0), backlog=512)
    print(f"listening on http://127.0.0.1:{listener.getsockname()[1]}", flush=True)

    def stop(signum: int, _: object) -> None:
        raise SystemExit(0)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    while True:
        client, _ = listener.accept()
        args = (client, upstream, delay, buckets)
        threading.Thread(target=_splice_connection, args=args, daemon=True).start()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("upstream", metavar="UPSTREAM_HOST:PORT")
    parser.add_argument("delay_ms", metavar="DELAY_MS", type=float)
    parser.add_argument(
        "--rate-bytes-per-s",
        type=float,
        default=None,
        help="cap each direction (all connections together) at this many bytes a second (default: no cap)",
    )
    parser.add_argument(
        "--engine",
        choices=("splice", "asyncio"),
        default=os.environ.get("BENCH_PROXY_ENGINE", "splice"),
        help="splice(2) in threads, bytes never copied into Python (default), or asyncio streams",
    )
    args = parser.parse_args(argv)
    if args.rate_bytes_per_s is not None and args.rate_bytes_per_s <= 0:
        parser.error("--rate-bytes-per-s must be positive")
    host, _, port = args.upstream.rpartition(":")
    upstream, delay = (host, int(port)), args.delay_ms / 1000
    if args.engine == "splice":
        serve_splice(upstream, delay, args.rate_bytes_per_s)
    else:
        asyncio.run(serve(upstream, delay, args.rate_bytes_per_s))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
