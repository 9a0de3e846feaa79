"""`python -m bench.meter RESULT MODULE [ARGS...]`: run MODULE as `python -m MODULE ARGS...` would, and
write to RESULT (JSON) how many bytes the process's sockets received and sent, per peer, when it exits.

This is how the bench knows what passed through a method's process: every run of every method goes
through here (bench/methods.py), so the worker's "through the worker" bytes are counted the same way as a
plain download's, and not taken from archiver's own log (which the bench checks them against).

Why here and not from outside the process: `/proc/<pid>/io`'s rchar/wchar count read(2)/write(2) and
their kin, but not recv(2)/send(2), which is what Python's sockets use; on the kernel this was written on
(6.18) a process that moved 50 MiB each way over a loopback socket showed ~100 bytes of rchar and none of
wchar. A counting proxy between the worker and S3 would see the bytes from outside, but it would add a
hop (and a busy Python process on a 2-core machine) to exactly the runs whose times are compared. The
count is taken at the socket API, so it includes HTTP headers and the SQS messages: everything that
crossed the process's boundary, not only object bytes. Counting costs one Python call per socket call,
and a `socket.sendfile()` (os.sendfile) would go uncounted; botocore does not use it.

Only the standard library is imported before MODULE, so peak RSS stays the measured program's own.

The measured program runs as the default install would, without the `crc64nvme` extra (awscrt), which
the bench's venv has for the tests: botocore loads it whenever it can, ~6 MiB of RSS that a worker
without the extra never pays. A run with ARCHIVE_CHECKSUM=CRC64NVME keeps it.
"""

from __future__ import annotations

import atexit
import errno
import functools
import json
import os
import runpy
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

_lock = threading.Lock()
_peers: dict[int, str] = {}  # file descriptor -> "host:port" it is connected to
_counts: dict[str, list[int]] = {}  # peer -> [received, sent]

# Socket methods and how to read the byte count from what each returns.
_RECEIVING: dict[str, Callable[[Any], int]] = {
    "recv": len,
    "recv_into": int,
    "recvfrom": lambda result: len(result[0]),
    "recvfrom_into": lambda result: int(result[0]),
    "recvmsg": lambda result: len(result[0]),
    "recvmsg_into": lambda result: int(result[0]),
}
_SENDING: dict[str, Callable[[Any], int]] = {"send": int, "sendto": int, "sendmsg": int}


def _peer_name(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


def _add(sock: socket.socket, index: int, count: int) -> None:
    if count <= 0:
        return
    peer = _peers.get(sock.fileno(), "unconnected")
    with _lock:
        _counts.setdefault(peer, [0, 0])[index] += count


def _counting(name: str, index: int, measure: Callable[[Any], int]) -> None:
    original = getattr(socket.socket, name)

    @functools.wraps(original)
    def wrapper(self: socket.socket, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        _add(self, index, measure(result))
        return result

    setattr(socket.socket, name, wrapper)


def _count_sendall() -> None:
    original = socket.socket.sendall

    @functools.wraps(original)
    def sendall(self: socket.socket, data: Any, *args: Any, **kwargs: Any) -> None:
        original(self, data, *args, **kwargs)
        _add(self, 1, memoryview(data).nbytes)

    setattr(socket.socket, "sendall", sendall)  # noqa: B010 - mypy rejects assigning to a method


def _record_connects() -> None:
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def remember(sock: socket.socket, address: Any) -> None:
        _peers[sock.fileno()] = _peer_name(address)

    @functools.wraps(connect)
    def connecting(self: socket.socket, address: Any) -> None:
        connect(self, address)
        remember(self, address)

    @functools.wraps(connect_ex)
    def connecting_ex(self: socket.socket, address: Any) -> int:
        code = connect_ex(self, address)
        if code in (0, errno.EINPROGRESS):
            remember(self, address)
        return code

    setattr(socket.socket, "connect", connecting)  # noqa: B010 - as above
    setattr(socket.socket, "connect_ex", connecting_ex)  # noqa: B010


def install() -> None:
    _record_connects()
    for name, measure in _RECEIVING.items():
        _counting(name, 0, measure)
    for name, measure in _SENDING.items():
        _counting(name, 1, measure)
    _count_sendall()


def totals() -> dict[str, Any]:
    with _lock:
        peers = {peer: {"received": got, "sent": sent} for peer, (got, sent) in sorted(_counts.items())}
    return {
        "received_bytes": sum(peer["received"] for peer in peers.values()),
        "sent_bytes": sum(peer["sent"] for peer in peers.values()),
        "peers": peers,
    }


def _write(path: str) -> None:
    with open(path, "w", encoding="utf-8") as result:
        json.dump(totals(), result)


def main(argv: list[str]) -> None:
    result_path, module, *args = argv
    install()
    if os.environ.get("ARCHIVE_CHECKSUM") != "CRC64NVME":
        sys.modules["awscrt"] = None  # type: ignore[assignment]  # as if not installed: see above
    # atexit runs after the interpreter has joined non-daemon threads: their last bytes are counted too.
    atexit.register(_write, result_path)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
