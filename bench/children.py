"""The baselines, as they run inside their measured subprocess: `python -m bench.children
raw|inmemory|download SPEC RESULT`. This module imports only what the methods need (boto3, zipfile), so
the peak RSS measured is the method's own plus an interpreter's, like archiver's worker process.

- raw: the practical limit. GET every source (objects up to 8 MiB read whole, 8 GETs ahead; bigger ones
  streamed) and upload the concatenated bytes as ONE object with boto3's transfer manager at archiver's
  part size and concurrency. No zip, no checksum work beyond botocore's.
- inmemory: the original service's design. `zipfile` into a `BytesIO` (each source read whole, as
  `writestr(name, body.read())` does), then one `upload_fileobj` of the buffer.
- download: one plain download of the same bytes, what the server-side assembly target compares with.
  Every source GET in turn on one connection, its body read to the end in 1 MiB chunks and dropped.
"""

from __future__ import annotations

import io
import json
import sys
import time
import zipfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, TYPE_CHECKING, Any, cast

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

DOWNLOAD_CHUNK = 1024 * 1024

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import GetObjectOutputTypeDef


# Objects up to this size are read whole by GETs_AHEAD threads ahead of the reader, as a program that
# knows small objects are request-bound would; bigger ones are streamed by one GET when reached.
AHEAD_MAX_BYTES = 8 * 1024 * 1024
GETS_AHEAD = 8


class ConcatenatedBodies(io.RawIOBase):
    """A non-seekable reader over the GET bodies of many objects, one after the other: small objects read
    whole, GETS_AHEAD at a time ahead of the reader; a big one's GET sent when the previous body is
    exhausted. `read(n)` returns exactly n bytes until the end: s3transfer makes one part of each read,
    and a short read would make a short part (S3 rejects parts < 5 MiB)."""

    def __init__(self, s3: S3Client, bucket: str, keys: list[str], sizes: list[int] | None = None) -> None:
        super().__init__()
        self._s3, self._bucket = s3, bucket
        sizes = sizes or [AHEAD_MAX_BYTES + 1] * len(keys)
        self._keys: Iterator[tuple[str, int]] = iter(zip(keys, sizes, strict=True))
        self._body: GetObjectOutputTypeDef | None = None
        self._ahead: deque[Future[bytes | GetObjectOutputTypeDef]] = deque()
        self._pool = ThreadPoolExecutor(GETS_AHEAD)
        self._held: bytes | None = None  # a small object's body, read ahead
        self._offset = 0

    def _open(self, key: str) -> GetObjectOutputTypeDef:
        return self._s3.get_object(Bucket=self._bucket, Key=key)

    def _whole(self, key: str) -> bytes:
        return self._s3.get_object(Bucket=self._bucket, Key=key)["Body"].read()

    def _next_small(self) -> bool:
        """Queue small objects' GETs until GETS_AHEAD are ahead or a big one comes; take the first."""
        while len(self._ahead) < GETS_AHEAD:
            key_size = next(self._keys, None)
            if key_size is None:
                break
            key, size = key_size
            if size > AHEAD_MAX_BYTES:
                self._ahead.append(self._pool.submit(self._open, key))
                break
            self._ahead.append(self._pool.submit(self._whole, key))
        if not self._ahead:
            return False
        result = self._ahead.popleft().result()
        if isinstance(result, bytes):
            self._held, self._offset = result, 0
        else:
            self._body = result
        return True

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        wanted = -1 if size is None else size
        pieces: list[bytes] = []
        while wanted != 0:
            if self._held is not None:
                end = len(self._held) if wanted < 0 else min(len(self._held), self._offset + wanted)
                piece = self._held[self._offset : end]
                self._offset = end
                if self._offset >= len(self._held):
                    self._held = None
                if piece:
                    pieces.append(piece)
                    if wanted > 0:
                        wanted -= len(piece)
                continue
            if self._body is None:
                if not self._next_small():
                    break
                continue
            piece = self._body["Body"].read(None if wanted < 0 else wanted)
            if not piece:
                self._body["Body"].close()
                self._body = None
                continue
            pieces.append(piece)
            if wanted > 0:
                wanted -= len(piece)
        return b"".join(pieces)


def _client(spec: dict[str, Any]) -> S3Client:
    # Endpoint, region and credentials come from the environment, as for archiver's worker.
    # Unsigned payloads, as botocore sends uploads to AWS over https:// (and archiver everywhere): over
    # the bench's http:// it would SHA-256 every byte, a cost no AWS user pays.
    config = Config(
        max_pool_connections=spec["upload_concurrency"] + 4 + GETS_AHEAD,
        signature_version="s3v4",
        s3={"payload_signing_enabled": False},
    )
    return boto3.session.Session().client("s3", config=config)


def _transfer_config(spec: dict[str, Any]) -> TransferConfig:
    return TransferConfig(multipart_chunksize=spec["part_size"], max_concurrency=spec["upload_concurrency"])


def raw_copy(spec: dict[str, Any]) -> dict[str, Any]:
    s3 = _client(spec)
    started = time.monotonic()
    # A file-like object: s3transfer only calls read() on a non-seekable one.
    reader = cast("IO[bytes]", ConcatenatedBodies(s3, spec["source_bucket"], spec["keys"], spec.get("sizes")))
    s3.upload_fileobj(
        reader, spec["destination_bucket"], spec["destination_key"], Config=_transfer_config(spec)
    )
    seconds = time.monotonic() - started
    size = s3.head_object(Bucket=spec["destination_bucket"], Key=spec["destination_key"])["ContentLength"]
    return {"work_seconds": seconds, "archive_bytes": size}


def in_memory_zip(spec: dict[str, Any]) -> dict[str, Any]:
    s3 = _client(spec)
    # Deflate (zipfile's default level 6) for compressible sources, as the original service did; media
    # STORED, which is generous to it: deflating incompressible bytes would only make it slower.
    method = zipfile.ZIP_DEFLATED if spec["compressible"] else zipfile.ZIP_STORED
    started = time.monotonic()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method, allowZip64=True) as archive:
        for key, name in zip(spec["keys"], spec["entry_names"], strict=True):
            data = s3.get_object(Bucket=spec["source_bucket"], Key=key)["Body"].read()
            archive.writestr(name, data)
            del data
    size = buffer.tell()
    buffer.seek(0)
    s3.upload_fileobj(
        buffer, spec["destination_bucket"], spec["destination_key"], Config=_transfer_config(spec)
    )
    seconds = time.monotonic() - started
    return {"work_seconds": seconds, "archive_bytes": size, "entries": len(spec["keys"])}


def download(spec: dict[str, Any]) -> dict[str, Any]:
    s3 = _client(spec)
    started = time.monotonic()
    downloaded = 0
    for key in spec["keys"]:
        body = s3.get_object(Bucket=spec["source_bucket"], Key=key)["Body"]
        for chunk in body.iter_chunks(DOWNLOAD_CHUNK):
            downloaded += len(chunk)
    seconds = time.monotonic() - started
    return {"work_seconds": seconds, "downloaded_bytes": downloaded}


METHODS = {"raw": raw_copy, "inmemory": in_memory_zip, "download": download}


def main(argv: list[str]) -> int:
    method, spec_path, result_path = argv
    with open(spec_path, encoding="utf-8") as spec_file:
        spec = json.load(spec_file)
    result = METHODS[method](spec)
    with open(result_path, "w", encoding="utf-8") as result_file:
        json.dump(result, result_file)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
