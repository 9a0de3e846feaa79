"""`python -m bench.getters CLIENT IN_FLIGHT SPEC RESULT`: GET every key of SPEC (JSON: bucket, keys) with one
client, IN_FLIGHT requests at a time, each body read whole and dropped; writes the wall seconds and the
process's CPU seconds of that loop to RESULT. Run by bench/candidates.py, one subprocess per measurement.

Clients: `boto3` (threads, one shared client), `obstore-async` (asyncio tasks), `obstore-threads` (the
synchronous call from threads; it releases the GIL while it waits), `obstore-stream` (the same, each body
read as archiver reads one, a stream of pieces of at least 256 KiB), `aiobotocore` (when installed).
Endpoint, region and credentials come from the environment, as for archiver's worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ["AWS_ENDPOINT_URL"]


def _obstore(bucket: str, in_flight: int) -> Any:
    from obstore.store import S3Store

    return S3Store(
        bucket,
        endpoint=_endpoint(),
        region=os.environ["AWS_REGION"],
        access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
        secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        client_options={"allow_http": True},
    )


def boto3_threads(bucket: str, keys: list[str], in_flight: int) -> Callable[[], int]:
    import boto3
    from botocore.config import Config

    s3 = boto3.session.Session().client(
        "s3", config=Config(max_pool_connections=in_flight, signature_version="s3v4")
    )

    def get(key: str) -> int:
        return len(s3.get_object(Bucket=bucket, Key=key)["Body"].read())

    def run() -> int:
        with ThreadPoolExecutor(in_flight) as pool:
            return sum(pool.map(get, keys))

    return run


def obstore_threads(bucket: str, keys: list[str], in_flight: int) -> Callable[[], int]:
    import obstore

    store = _obstore(bucket, in_flight)

    def get(key: str) -> int:
        return len(obstore.get(store, key).bytes())

    def run() -> int:
        with ThreadPoolExecutor(in_flight) as pool:
            return sum(pool.map(get, keys))

    return run


def obstore_stream(bucket: str, keys: list[str], in_flight: int) -> Callable[[], int]:
    """As archiver reads a small body: obstore's stream, in pieces of at least 256 KiB, kept in a list."""
    import obstore

    store = _obstore(bucket, in_flight)

    def get(key: str) -> int:
        chunks = list(obstore.get(store, key).stream(min_chunk_size=256 * 1024))
        return sum(len(chunk) for chunk in chunks)

    def run() -> int:
        with ThreadPoolExecutor(in_flight) as pool:
            return sum(pool.map(get, keys))

    return run


def obstore_async(bucket: str, keys: list[str], in_flight: int) -> Callable[[], int]:
    import obstore

    store = _obstore(bucket, in_flight)

    async def main() -> int:
        gate = asyncio.Semaphore(in_flight)

        async def get(key: str) -> int:
            async with gate:
                result = await obstore.get_async(store, key)
                return len(await result.bytes_async())

        return sum(await asyncio.gather(*(get(key) for key in keys)))

    return lambda: asyncio.run(main())


def aiobotocore_tasks(bucket: str, keys: list[str], in_flight: int) -> Callable[[], int]:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    async def main() -> int:
        session = get_session()
        config = AioConfig(max_pool_connections=in_flight, signature_version="s3v4")
        async with session.create_client("s3", config=config) as s3:
            gate = asyncio.Semaphore(in_flight)

            async def get(key: str) -> int:
                async with gate:
                    response = await s3.get_object(Bucket=bucket, Key=key)
                    async with response["Body"] as body:
                        return len(await body.read())

            return sum(await asyncio.gather(*(get(key) for key in keys)))

    return lambda: asyncio.run(main())


CLIENTS = {
    "boto3": boto3_threads,
    "obstore-threads": obstore_threads,
    "obstore-stream": obstore_stream,
    "obstore-async": obstore_async,
    "aiobotocore": aiobotocore_tasks,
}


def main(argv: list[str]) -> int:
    client, in_flight, spec_path, result_path = argv
    with open(spec_path, encoding="utf-8") as spec_file:
        spec = json.load(spec_file)
    run = CLIENTS[client](spec["bucket"], spec["keys"], int(in_flight))
    cpu, started = time.process_time(), time.monotonic()
    got = run()
    seconds, cpu = time.monotonic() - started, time.process_time() - cpu
    with open(result_path, "w", encoding="utf-8") as result:
        json.dump({"seconds": seconds, "cpu_seconds": cpu, "bytes": got, "gets": len(spec["keys"])}, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
