"""A fault-injecting HTTP/1.1 reverse proxy, so tests can make S3 and SQS fail the ways AWS does.

boto3 reaches it through AWS_ENDPOINT_URL and it forwards every request to the upstream (moto), unless a
fault answers instead: a 500 InternalError or 503 SlowDown/ServiceUnavailable with the body the service
would send (no upstream side effect, like a real 5xx), or a response cut off mid-body (status line and
full Content-Length, part of the body, then the socket closes), which is what breaks a GetObject
stream. Latency and a bandwidth cap on response bodies make jobs slow on purpose. Every request is
recorded, so tests can assert on what the worker actually sent. Stdlib only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import io
import json
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import BinaryIO, Literal
from urllib.parse import parse_qs, unquote, urlsplit

Kind = Literal["500", "503", "cut", "501", "412", "403"]
Service = Literal["s3", "sqs"]

RECORDED_HEADERS = (
    *("x-amz-expected-bucket-owner", "range", "if-match", "x-amz-target", "expect"),
    *("content-length", "transfer-encoding", "content-encoding", "x-amz-checksum-crc32"),
    *("x-amz-copy-source", "x-amz-copy-source-range", "x-amz-copy-source-if-match", "if-none-match"),
    *("x-amz-checksum-mode", "x-amz-checksum-crc64nvme"),
    *("authorization", "x-amz-security-token"),  # the tests' own throwaway credentials
)
# Hop-by-hop headers (RFC 9110 §7.6.1) describe one connection and are never forwarded; Expect was
# answered here already, and a body read here is re-sent with its own Content-Length.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
    | {"expect", "content-length"}
)
CHUNK = 64 * 1024
S3_ERRORS = {
    500: ("InternalError", "We encountered an internal error."),
    503: ("SlowDown", "Reduce rate."),
    # What an S3-compatible server without UploadPartCopy answers, and a copy whose source changed.
    501: ("NotImplemented", "A header you provided implies functionality that is not implemented."),
    412: ("PreconditionFailed", "At least one of the pre-conditions you specified did not hold."),
    # What a GET of an SSE-KMS object answers when the role may not use its key.
    403: ("AccessDenied", "User is not authorized to perform: kms:Decrypt"),
}
# 403: a role without sqs:SendMessage (or DeleteMessage), which neither botocore nor the worker retries.
SQS_ERRORS = {500: "InternalError", 503: "ServiceUnavailable", 403: "AccessDenied"}
S3_ERROR = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>{}</Code><Message>{}</Message><RequestId>{}</RequestId></Error>"
)


@dataclass(frozen=True)
class Seen:
    """One request as received; `path` is percent-decoded, header names are lower case."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    service: Service
    fault: Kind | None = None
    # When the proxy received it (time.monotonic()): what happened after it cannot have happened before.
    at: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def operation(self) -> str:
        """The worker's S3 operations told from method and query; SQS's from X-Amz-Target."""
        if self.service == "sqs":
            return self.headers.get("x-amz-target", "").rpartition(".")[2]
        if "uploadId" in self.query:
            if self.method == "PUT" and "x-amz-copy-source" in self.headers:
                return "UploadPartCopy"
            ops = {"PUT": "UploadPart", "POST": "CompleteMultipartUpload", "DELETE": "AbortMultipartUpload"}
            return ops.get(self.method, "ListParts")
        if "uploads" in self.query:
            return "CreateMultipartUpload" if self.method == "POST" else "ListMultipartUploads"
        ops = {"HEAD": "HeadObject", "GET": "GetObject", "PUT": "PutObject", "DELETE": "DeleteObject"}
        return ops.get(self.method, self.method)


@dataclass(frozen=True)
class Faults:
    """What to do to matching requests (right service, and `match` if given). The proxy holds one."""

    rate: float = 0.0  # chance that a matching request is faulted, drawn from Random(seed)
    kinds: tuple[Kind, ...] = ("500", "503", "cut")
    service: Service | None = None
    match: Callable[[Seen], bool] | None = None
    limit: int | None = None  # at most this many faults, e.g. 1 for "only the first GET"
    cut_after: int = 1024 * 1024  # body bytes sent before a cut; at most half of a shorter body
    latency: float = 0.0  # seconds before a matching request is forwarded
    hold: threading.Event | None = None  # matching requests wait for it to be set before being forwarded
    throttle: int | None = None  # bytes per second for matching response bodies
    # Response headers of matching requests replaced (a value) or dropped (None): a server that reports
    # other metadata than moto does.
    response_headers: tuple[tuple[str, str | None], ...] = ()
    seed: int = 0


class FaultProxy:
    """`with FaultProxy(upstream) as proxy:` serves on `proxy.url` until the block ends."""

    def __init__(self, upstream: str, faults: Faults | None = None) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._lock = threading.Lock()
        self._seen: list[Seen] = []
        self._forwarded: list[Seen] = []
        self.configure(faults or Faults())
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def configure(self, faults: Faults | None = None, **fields: object) -> None:
        """Replace the faults (a `Faults`, or its fields); the random sequence and `limit` start over."""
        with self._lock:
            self.faults = faults or Faults(**fields)  # type: ignore[arg-type]
            self._random = random.Random(self.faults.seed)
            self._injected = 0

    def decide(self, seen: Seen) -> tuple[Kind | None, Faults | None]:
        """Record the request and pick its fault (or none); the Faults returned apply to its response."""
        with self._lock:
            faults, kind = self.faults, None
            applies = faults.service in (None, seen.service) and (faults.match is None or faults.match(seen))
            # Draw for every matching request, so a seed gives the same choices for the same traffic.
            if applies and self._random.random() < faults.rate and faults.kinds:
                kind = self._random.choice(faults.kinds)
                if faults.limit is not None and self._injected >= faults.limit:
                    kind = None
                self._injected += kind is not None
            self._seen.append(dataclasses.replace(seen, fault=kind))
            return kind, (faults if applies else None)

    def forwarded(self, seen: Seen) -> None:
        """Note a request as passed on to the upstream (after any latency or hold)."""
        with self._lock:
            self._forwarded.append(seen)

    def requests_forwarded(self, operation: str) -> list[Seen]:
        with self._lock:
            return [seen for seen in self._forwarded if seen.operation == operation]

    def mark(self) -> int:
        """A position in the record, for `requests_matching(since=...)`; `reset()` starts it over."""
        with self._lock:
            return len(self._seen)

    def reset(self) -> None:
        with self._lock:
            self._seen.clear()

    def requests_matching(
        self,
        *,
        service: Service | None = None,
        method: str | None = None,
        operation: str | None = None,
        path_contains: str | None = None,
        since: int = 0,
        where: Callable[[Seen], bool] | None = None,
    ) -> list[Seen]:
        with self._lock:
            seen = self._seen[since:]
        return [
            r
            for r in seen
            if service in (None, r.service)
            and method in (None, r.method)
            and operation in (None, r.operation)
            and (path_contains is None or path_contains in r.path)
            and (where is None or where(r))
        ]


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # keep-alive connections boto3 never closes must not block shutdown
    request_queue_size = 128  # a worker opens a dozen connections at once; the default backlog is 5
    proxy: FaultProxy


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 for keep-alive like S3, and so that parse_request answers `Expect: 100-continue` itself.
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: pytest shows what tests assert, not every request

    def _proxy(self) -> None:
        body = self._read_body()
        url = urlsplit(self.path)
        headers = {name.lower(): value for name, value in self.headers.items()}
        # boto3's SQS sends X-Amz-Target; any SQS request is signed for the `sqs` credential scope.
        target, auth = headers.get("x-amz-target", ""), headers.get("authorization", "")
        sqs = target.startswith("AmazonSQS") or "/sqs/aws4_request" in auth
        recorded = {name: headers[name] for name in RECORDED_HEADERS if name in headers}
        query = parse_qs(url.query, keep_blank_values=True)
        seen = Seen(self.command, unquote(url.path), query, recorded, "sqs" if sqs else "s3")
        kind, faults = self.server.proxy.decide(seen)
        if faults and faults.latency:
            time.sleep(faults.latency)
        if faults and faults.hold is not None:
            faults.hold.wait()
        if kind is not None and kind != "cut":
            self._send_error(seen, int(kind))
            return
        self.server.proxy.forwarded(seen)
        upstream = http.client.HTTPConnection(*self.server.proxy.upstream, timeout=90)
        try:
            # Headers are copied one by one, Host included: a dict would fold repeated ones.
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    upstream.putheader(name, value)
            if body is not None:
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body)
            self._relay(upstream.getresponse(), cut=kind == "cut", faults=faults or Faults())
        finally:
            upstream.close()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _proxy

    def _read_body(self) -> bytes | None:
        """The whole request body (an upload part is 5 MiB at most: fine to hold), de-chunked."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            # Chunk extensions after ';' are dropped; an aws-chunked payload (signatures, checksum
            # trailer) is inside the chunks' data and reaches moto untouched, with its Content-Encoding.
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # HTTP trailers
            return b"".join(parts)
        length = self.headers.get("Content-Length")
        return self.rfile.read(int(length)) if length is not None else None

    def _relay(self, response: http.client.HTTPResponse, *, cut: bool, faults: Faults) -> None:
        """Stream the upstream response back in chunks, so throttling and a cut happen mid-body."""
        no_body = self.command == "HEAD" or response.status in (204, 304)
        length = response.getheader("Content-Length")
        source: BinaryIO | http.client.HTTPResponse = response
        if length is None and not no_body:  # chunked upstream: buffer it to send a Content-Length
            data = response.read()
            source, length = io.BytesIO(data), str(len(data))
        size = 0 if no_body or length is None else int(length)
        if cut and size == 0:
            self._drop()  # nothing to cut into: the whole response is lost (after upstream acted on it)
            return
        self.send_response_only(response.status, response.reason)
        replaced = {name.lower(): value for name, value in faults.response_headers}
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP and name.lower() not in replaced:
                self.send_header(name, value)
        for name, value in faults.response_headers:
            if value is not None:
                self.send_header(name, value)
        if length is not None:
            self.send_header("Content-Length", length)
        self.end_headers()
        stop, throttle = min(faults.cut_after, size // 2) if cut else size, faults.throttle
        sent, started = 0, time.monotonic()
        step = min(CHUNK, max(1, throttle // 20)) if throttle else CHUNK
        while sent < stop:
            chunk = source.read(min(step, stop - sent))
            if not chunk:
                break
            self.wfile.write(chunk)
            sent += len(chunk)
            if throttle:
                time.sleep(max(0.0, started + sent / throttle - time.monotonic()))
        if sent < size:
            self._drop()  # a cut, or upstream ended early: either way the client sees a short body

    def _drop(self) -> None:
        # shutdown() now, not close(): the client sees EOF at once; socketserver closes the socket later.
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _send_error(self, seen: Seen, status: int) -> None:
        request_id = f"faultproxy-{time.monotonic_ns()}"
        if seen.service == "sqs":  # boto3's SQS speaks the JSON protocol: the code is in `__type`
            text = json.dumps({"__type": f"com.amazonaws.sqs#{SQS_ERRORS[status]}", "message": "injected"})
            content_type = "application/x-amz-json-1.0"
        else:
            text, content_type = S3_ERROR.format(*S3_ERRORS[status], request_id), "application/xml"
        # S3 answers HEAD errors without a body; botocore reads the code from the status then.
        body = b"" if self.command == "HEAD" else text.encode()
        self.send_response_only(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amz-request-id", request_id)
        self.end_headers()
        self.wfile.write(body)
