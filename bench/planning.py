"""`python -m bench.planning [--shapes NAMES] [--repeat N]`: what reading and planning one request costs,
for each shape of request issue 11 names, at the largest size the limits accept (or, for a hostile
body, the largest that reaches the worker), in time and in peak memory.

Each body is put in S3 (moto's server, in this process) and sent as an extended-client pointer, as big
requests arrive; a fresh `python -m bench.planning --child` process then does what the worker does with
it (`request.load_document`, `parse_request`, `plan_archive`) and reports its seconds, its RSS before
(interpreter, boto3 and a client: the idle worker) and its peak RSS (the kernel's VmHWM), and the
outcome. `tests/test_limits.py` runs the same shapes and asserts the peak against `bound_mib`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

KiB = 1024
MiB = 1024 * KiB
POINTER = "software.amazon.payloadoffloading.PayloadS3Pointer"
# docs/settings.md, Memory: planning takes at most this much above the idle worker: 1 KiB a file
# MAX_FILES allows (decoded, validated, planned: 0.9 KiB measured at worst), and 5 times the body (its
# strings: decoded, joined into paths, keyed, renamed), times the bytes CPython stores each character of
# a name in: 2 when it mixes ASCII with a character beyond U+00FF (’, CJK), 4 with one beyond U+FFFF (an
# emoji).
PER_FILE = 1024
BODY_FACTOR = 5


def bound_mib(body_bytes: int, max_files: int, *, width: int = 1) -> float:
    """The memory formula's planning term (docs/settings.md), in MiB."""
    return (PER_FILE * max_files + BODY_FACTOR * width * body_bytes) / MiB


def _fill(make: Callable[[int], Any], limit_bytes: int, count: int, *, head: str, tail: str) -> bytes:
    """`head` + as many `make(i)` as fit in `limit_bytes` (at most `count`), comma-separated, + `tail`."""
    pieces: list[bytes] = []
    size = len(head) + len(tail)
    for index in range(count):
        piece = json.dumps(make(index), separators=(",", ":"), ensure_ascii=False).encode()
        if size + len(piece) + 1 > limit_bytes:
            break
        pieces.append(piece)
        size += len(piece) + 1
    return head.encode() + b",".join(pieces) + tail.encode()


def _files(make: Callable[[int], dict[str, str]]) -> Callable[[int, int], bytes]:
    return lambda limit, max_files: _fill(make, limit, max_files, head='{"files":[', tail="]}")


def _deep(index: int) -> dict[str, str]:
    head = f"{index}/"
    return {
        "source": f"k{index}",
        "destination": head + "/".join("a" * ((998 - len(head)) // 2)),
        "name": "x",
    }


_ONE_FILE_AND = '{"files":[{"source":"a"}],'
_RESPELLED = ["CON.txt", "report 10:30.log", "notes. ", "x\u200b.jpg", "aux.c", "what?.txt", "nul"]


@dataclass(frozen=True)
class Shape:
    name: str
    description: str
    body: Callable[[int, int], bytes]  # (byte limit, MAX_FILES) -> body
    outcome: str  # "planned", or the failure code
    width: int = 1  # bytes a character of its names takes in CPython


SHAPES = {
    shape.name: shape
    for shape in [
        Shape(
            "album",
            "MAX_FILES x photos/photo.jpg into one folder: every one renamed (was quadratic)",
            _files(lambda i: {"source": "photos/photo.jpg", "destination": "album"}),
            "planned",
        ),
        Shape(
            "uuid-keys",
            "MAX_FILES x example-directory/<uuid>.png: the largest honest request",
            _files(lambda i: {"source": f"example-directory/{i:08x}-1b2c-4d5e-8f90-0a1b2c3d4e5f.png",
                              "destination": "album_1"}),
            "planned",
        ),
        Shape(
            "full-alike",
            "130-byte keys named alike, as many as fill the body: the most ASCII names, all renamed",
            _files(lambda i: {"source": f"tenant-0042/uploads/{i:08d}/" + "x" * 100 + ".jpg",
                              "destination": "album/2024"}),
            "planned",
        ),
        Shape(
            "deep",
            "1,000-byte paths of one-letter folders, to the body limit (were 0.3 MiB each)",
            _files(_deep),
            "planned",
        ),
        Shape(
            "long-names",
            "1,000-byte keys, all named alike: the most text a body holds, every name renamed",
            _files(lambda i: {"source": f"{i:08d}/" + "k" * 990, "destination": "d"}),
            "planned",
        ),
        Shape(
            "curly-names",
            "the same with a ’ in each name: CPython stores such a string at 2 bytes a character",
            _files(lambda i: {"source": f"tenant-0042/uploads/{i:08d}/" + "x" * 100 + "\u2019.jpg",
                              "destination": "album/2024"}),
            "planned",
            width=2,
        ),
        Shape(
            "emoji-names",
            "250-character keys with an emoji, named alike: CPython's widest strings, renamed",
            _files(lambda i: {"source": f"{i:08d}/" + "a" * 240 + "\U0001f600"}),
            "planned",
            width=4,
        ),
        Shape(
            "respelled",
            "MAX_FILES names Windows cannot create (CON, 10:30, trailing dots, ZWSP, aux.c, ?)",
            _files(lambda i: {"source": f"k{i}", "name": _RESPELLED[i % len(_RESPELLED)]}),
            "planned",
        ),
        Shape(
            "empty-objects",
            "[{},{},...] to the body limit (a 16 MiB one peaked at 487 MiB)",
            lambda limit, max_files: _fill(lambda i: {}, limit, limit, head="[", tail="]"),
            "too_large",
        ),
        Shape(
            "short-strings",
            'as many "ab" values as the count lets through, beside one file: all decoded, then refused',
            lambda limit, max_files: _fill(
                lambda i: "ab", limit, 7 * max_files + 65_000, head=_ONE_FILE_AND + '"x":[', tail="]}"
            ),
            "invalid_request",
        ),
    ]
}  # fmt: skip


def _vm_hwm_mib() -> float:
    """Peak RSS of this process since exec: the kernel's high-water mark, Linux only."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / KiB
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(bucket: str, key: str) -> dict[str, Any]:
    """Inside the measured process: read and plan the request behind the pointer, like the worker."""
    from archiver.aws import make_clients
    from archiver.errors import PermanentError
    from archiver.models import parse_request, plan_archive
    from archiver.request import load_document
    from archiver.settings import load_settings

    settings = load_settings(
        sqs_source_queue="unused", sqs_destination_queue="unused", s3_source_bucket=bucket,
        s3_destination_bucket=bucket,
    )  # fmt: skip
    s3 = make_clients().s3
    s3.head_bucket(Bucket=bucket)  # the client's lazy set-up belongs to the idle worker, not to planning
    idle = _vm_hwm_mib()
    started = time.perf_counter()
    body = json.dumps([POINTER, {"s3BucketName": bucket, "s3Key": key}])
    try:
        document = load_document(s3, settings, body)
        plan = plan_archive(parse_request(document), settings=settings, message_id="bench")
        del document
        outcome = "planned"
        detail = f"{len(plan.entries)} entries, {len(plan.renamed)} renamed"
    except PermanentError as exc:
        outcome, detail = exc.code, exc.message
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "idle_mib": idle,
        "peak_mib": _vm_hwm_mib(),
        "outcome": outcome,
        "detail": detail,
    }


def measure(endpoint: str, bucket: str, key: str) -> dict[str, Any]:
    """Run `child` in a fresh interpreter against `endpoint`: its peak is its own, not this process's."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.planning", "--child", bucket, key],
        env={**os.environ, "AWS_ENDPOINT_URL": endpoint},
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.planning", description=__doc__)
    parser.add_argument(
        "--shapes", default=",".join(SHAPES), help="comma-separated, of: " + ", ".join(SHAPES)
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per shape; the median time is shown")
    parser.add_argument("--child", nargs=2, metavar=("BUCKET", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench-secret")
    os.environ.setdefault("AWS_REGION", "us-east-1")
    from archiver.aws import make_clients
    from archiver.demo import embedded_stack
    from archiver.request import MAX_POINTER_BYTES
    from archiver.settings import Settings

    max_files = Settings.model_fields["max_files"].default
    names = [name.strip() for name in args.shapes.split(",") if name.strip()]
    print(f"pointer limit {MAX_POINTER_BYTES / MiB:.0f} MiB, MAX_FILES {max_files}, median of {args.repeat}")
    print("| shape | body | outcome | planning | idle RSS | peak RSS | above idle | formula bound |")
    print("|---|---|---|---|---|---|---|---|")
    failures = 0
    with embedded_stack(
        access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"]
    ) as endpoint:
        s3 = make_clients().s3
        s3.create_bucket(Bucket="bench-planning")
        for name in names:
            shape = SHAPES[name]
            body = shape.body(MAX_POINTER_BYTES, max_files)
            s3.put_object(Bucket="bench-planning", Key=name, Body=body)
            runs = [measure(endpoint, "bench-planning", name) for _ in range(args.repeat)]
            last = runs[-1]
            above = max(run["peak_mib"] - run["idle_mib"] for run in runs)
            bound = bound_mib(len(body), max_files, width=shape.width)
            failures += last["outcome"] != shape.outcome or above > bound
            print(
                f"| {name} | {len(body) / MiB:.1f} MiB | {last['outcome']}: {last['detail'][:60]} |"
                f" {statistics.median(run['seconds'] for run in runs):.2f} s | {last['idle_mib']:.0f} MiB |"
                f" {last['peak_mib']:.0f} MiB | {above:.0f} MiB | {bound:.0f} MiB |"
            )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
