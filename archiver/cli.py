"""The `archiver` command: thin wrappers over the modules that do the work (contract §7)."""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from botocore.exceptions import NoRegionError

from archiver.errors import PermanentError, SettingsError, Unreachable
from archiver.heartbeat import HEALTH_MAX_AGE
from archiver.settings import Settings, load_settings

OFFLOAD_PREFIX = "archiver-requests"
UNREACHABLE_EXIT = 69  # sysexits.h EX_UNAVAILABLE: S3 or SQS did not answer at start-up


def _settings() -> Settings:
    settings = load_settings()
    from archiver.logs import configure_logging

    configure_logging(debug=settings.app_debug, dev_mode=settings.dev_mode)
    return settings


def cmd_worker(args: argparse.Namespace) -> int:
    from archiver import startup, worker

    settings = _settings()
    startup.check(settings)
    worker.return_big_buffers_to_the_os()
    return worker.run(worker.connect(settings), burst=args.burst)


def cmd_schema(_: argparse.Namespace) -> int:
    from archiver.models import json_schemas

    print(json.dumps(json_schemas(), indent=2))
    return 0


def cmd_check(_: argparse.Namespace) -> int:
    try:
        settings = load_settings()
    except SettingsError as exc:
        # Docker reserves health-check status 2; a worker with bad settings is simply unhealthy.
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    try:
        age = time.time() - Path(settings.health_file).stat().st_mtime
    except OSError:
        print(f"unhealthy: no heartbeat file at {settings.health_file}", file=sys.stderr)
        return 1
    if age > HEALTH_MAX_AGE:
        print(f"unhealthy: last heartbeat {age:.0f}s ago", file=sys.stderr)
        return 1
    print(f"healthy: last heartbeat {age:.0f}s ago")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from archiver import queue
    from archiver.aws import make_clients
    from archiver.models import parse_request, plan_archive
    from archiver.request import EXTENDED_CLIENT_POINTER, MAX_POINTER_BYTES, decode_body

    settings = _settings()
    body = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    try:
        request = parse_request(decode_body(body, max_files=settings.max_files))
        # The worker's own checks (names, allowed buckets, MAX_FILES), so a mistake fails here, not later.
        plan_archive(request, settings=settings, message_id="submit")
        if request.request_id is None:
            # The request's identity must live in its body: SQS gives a message moved back from the DLQ a
            # new MessageId, which would otherwise become a new request_id (contract §5, delivery semantics).
            request = request.model_copy(update={"request_id": f"submit-{uuid.uuid4().hex}"})
        outgoing = request.model_dump_json(exclude_none=True)
        size = len(outgoing.encode())
        if size > MAX_POINTER_BYTES:
            limit = f"a request is at most {MAX_POINTER_BYTES}"
            raise PermanentError("too_large", f"{size} bytes of JSON; {limit}")
    except PermanentError as exc:
        print(f"invalid request ({exc.code}): {exc.message}", file=sys.stderr)
        return 1
    clients = make_clients(expected_bucket_owner=settings.expected_bucket_owner)
    url = queue.resolve_queue_url(clients.sqs, settings.sqs_source_queue)
    offloaded = None
    if size > queue.max_message_size(clients.sqs, url):
        # Too big for SQS: store it and send the pointer the AWS extended client libraries write.
        bucket = args.offload_bucket or settings.s3_source_bucket
        key = f"{OFFLOAD_PREFIX}/{uuid.uuid4()}.json"
        clients.s3.put_object(Bucket=bucket, Key=key, Body=outgoing.encode(), ContentType="application/json")
        offloaded = f"s3://{bucket}/{key}"
        pointer = json.dumps([EXTENDED_CLIENT_POINTER, {"s3BucketName": bucket, "s3Key": key}])
        message_id = queue.send(clients.sqs, url, pointer, payload_size=size)
    else:
        message_id = queue.send(clients.sqs, url, outgoing)
    print(json.dumps({"message_id": message_id, "request_id": request.request_id, "offloaded": offloaded}))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from archiver import decision, status
    from archiver.aws import make_clients
    from archiver.models import is_valid_request_id
    from archiver.notify import archive_url
    from archiver.status_view import describe

    settings = _settings()
    if not is_valid_request_id(args.request_id):
        print(f"no request {args.request_id!r}: not a valid request id", file=sys.stderr)
        return 1
    clients = make_clients(
        expected_bucket_owner=settings.expected_bucket_owner, link_endpoint=settings.archive_link_endpoint
    )
    key = status.request_status_key(settings.s3_file_prefix, args.request_id)
    document, _ = status.read_document(clients.s3, settings.s3_destination_bucket, key)
    if document is None:
        where = f"s3://{settings.s3_destination_bucket}/{key}"
        print(f"no status for request {args.request_id}: not received yet, or unknown ({where})")
        cancel = decision.cancelled(decision.place_of(clients.s3, settings, args.request_id))
        if cancel is not None:
            print(f"  cancelled at {cancel.decided_at}: cancels it if it arrives by {cancel.expires_at}")
        return 1
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    link = None
    if document.get("status") == "completed" and document.get("archive_key"):
        link = archive_url(
            clients.presign, settings, bucket=settings.s3_destination_bucket, key=document["archive_key"]
        )
    print("\n".join(describe(document, link=link)))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from archiver import queue
    from archiver.aws import make_clients
    from archiver.models import is_valid_request_id

    settings = _settings()
    if not is_valid_request_id(args.request_id):
        print(f"cannot cancel {args.request_id!r}: not a valid request id", file=sys.stderr)
        return 1
    clients = make_clients(expected_bucket_owner=settings.expected_bucket_owner)
    url = queue.resolve_queue_url(clients.sqs, settings.sqs_source_queue)
    message_id = queue.send(clients.sqs, url, json.dumps({"cancel": {"request_id": args.request_id}}))
    print(json.dumps({"message_id": message_id, "cancel": args.request_id}))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from archiver.demo import run_demo

    return run_demo(verbose=args.verbose)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="archiver", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser("worker", help="poll the source queue and archive requests until stopped")
    worker.add_argument("--burst", action="store_true", help="exit 0 once the source queue is empty")
    worker.set_defaults(func=cmd_worker)

    demo = commands.add_parser("demo", help="run the whole flow against an embedded AWS stack (no Docker)")
    demo.add_argument("--verbose", action="store_true", help="show the worker's logs")
    demo.set_defaults(func=cmd_demo)

    submit = commands.add_parser("submit", help="validate a request and send it to the source queue")
    submit.add_argument("file", help="request JSON file, or - for standard input")
    submit.add_argument(
        "--offload-bucket",
        help="where a request too big for SQS is stored (default S3_SOURCE_BUCKET; an allowed bucket)",
    )
    submit.set_defaults(func=cmd_submit)

    status = commands.add_parser("status", help="where a request stands, from its status document")
    status.add_argument("request_id")
    status.add_argument("--json", action="store_true", help="print the status document itself")
    status.set_defaults(func=cmd_status)

    cancel = commands.add_parser("cancel", help="send a cancel of a request to the source queue")
    cancel.add_argument("request_id")
    cancel.set_defaults(func=cmd_cancel)

    commands.add_parser(
        "schema", help="print the JSON Schemas of request, cancel and notification"
    ).set_defaults(func=cmd_schema)
    commands.add_parser("check", help="health check: exit 0 if the worker polled recently").set_defaults(
        func=cmd_check
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SettingsError as exc:
        print(f"archiver: {exc}", file=sys.stderr)
        return 2
    except NoRegionError:
        print("archiver: invalid setting: AWS_REGION is required", file=sys.stderr)
        return 2
    except Unreachable as exc:
        print(f"archiver: {exc}", file=sys.stderr)
        return UNREACHABLE_EXIT


if __name__ == "__main__":
    sys.exit(main())
