"""`python -m bench.fanout_plan [--sources N]`: the coordinator's CPU per source when it plans a fanned-out
request (`archiver.fanout.planning.write_plan`: every source HEADed, the layout, the entries and the plan
written), with small sources HEADed through obstore as archiver does, and through boto3 as it did.

This is the fleet model's planning cost at scale (bench/fleet.py): the fan-out bench's own figure spreads
the coordinator's fixed CPU over its 256 sources, an upper bound. moto's server runs in its own process
(the bench's SQS server, which serves S3 too), so the CPU counted is the planner's alone
(`time.process_time`, every thread); the wall time is moto's and says nothing about S3's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.servers import moto_sqs

BODY = b"\xff" * 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir, moto_sqs(Path(workdir)) as endpoint:
        for line in measure(endpoint, args.sources):
            print(line)


def measure(endpoint: str, sources: int) -> list[str]:
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
        SQS_SOURCE_QUEUE=f"{endpoint}/123456789012/source",
        SQS_DESTINATION_QUEUE=f"{endpoint}/123456789012/destination",
        S3_SOURCE_BUCKET="plan-sources",
        S3_DESTINATION_BUCKET="plan-archives",
        FANOUT_SEGMENT_BYTES=str(5 * 1024 * 1024),
        MAX_FILES=str(max(sources, 50_000)),
    )
    from archiver.aws import make_clients
    from archiver.fanout import planning
    from archiver.fanout.store import Store
    from archiver.models import parse_request, plan_archive
    from archiver.settings import load_settings

    settings = load_settings()
    clients = make_clients(max_connections=64)
    for bucket in ("plan-sources", "plan-archives"):
        clients.s3.create_bucket(Bucket=bucket)
    keys = [f"album/p{index:06d}.jpg" for index in range(sources)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: clients.s3.put_object(Bucket="plan-sources", Key=key, Body=BODY), keys))
    lines = []
    for label, used in (("obstore HEADs (archiver)", clients), ("boto3 HEADs", None)):
        planner = used or dataclasses.replace(clients, stores=None)
        request = parse_request({"request_id": f"plan-{len(lines)}", "files": [{"source": k} for k in keys]})
        plan = plan_archive(request, settings=settings, message_id=request.request_id)
        store = Store(planner.s3, plan.bucket, plan.key.rsplit("/", 1)[0])
        started, cpu = time.perf_counter(), time.process_time()
        stored = planning.write_plan(planner, settings, plan, store)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - started
        assert stored is not None and stored.document["entries"] == sources
        lines.append(
            f"{label:<26} {sources:,} sources: {cpu:6.2f} CPU s, {cpu / sources * 1000:.2f} ms per source"
            f" (wall {wall:.1f} s, moto's)"
        )
    return lines


if __name__ == "__main__":
    main()
