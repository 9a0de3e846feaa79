"""The fan-out scenario's report (bench/report.py calls it): the curve 1/2/4/8 workers with where each
run's time went, the archive bytes against the one worker's, the kill, each worker's peak RSS and CPU,
and the targets of issues #15 and #23."""

from __future__ import annotations

from typing import TextIO

from bench.fleet_costs import Timeline, timeline
from bench.report import (
    FANOUT_BASELINE,
    FANOUT_CURVE,
    FANOUT_FOUR,
    FANOUT_KILLED,
    FANOUT_SPEEDUP_TARGET,
    METHOD_LABELS,
    MethodResult,
    MiB,
    ScenarioResult,
    _fmt,
)
from bench.scenarios import FANOUT_METHODS


def fanout_median(result: ScenarioResult, method: str) -> MethodResult | None:
    """The median successful run of a fan-out method by its time, send → notification (wall seconds)."""
    ok = sorted((r for r in result.runs(method) if r.ok), key=lambda r: r.wall_seconds)
    return ok[(len(ok) - 1) // 2] if ok else None


def fanout_speedup(result: ScenarioResult, method: str) -> float | None:
    """One worker's time over `method`'s (>1: `method` is faster), medians, send → notification."""
    mine, baseline = fanout_median(result, method), fanout_median(result, FANOUT_BASELINE)
    if mine is None or baseline is None or not mine.wall_seconds:
        return None
    return baseline.wall_seconds / mine.wall_seconds


def fanout_same_bytes(result: ScenarioResult, method: str) -> bool | None:
    """Whether every run of `method` made the archive one worker made, byte for byte (SHA-256 of the
    objects); None when either did not run, False when a run of `method` failed."""
    baseline = next((r for r in result.runs(FANOUT_BASELINE) if r.ok), None)
    runs = result.runs(method)
    if baseline is None or not runs:
        return None
    digest = baseline.details.get("archive_sha256")
    return bool(digest) and all(r.ok and r.details.get("archive_sha256") == digest for r in runs)


def _worker_rss(run: MethodResult) -> str:
    """Each worker's peak RSS (MiB) and CPU seconds, marked c for the coordinator, † if SIGKILLed by the
    kill run, ! if it ignored the SIGTERM at the end."""
    cells = []
    for worker in run.details.get("workers", []):
        mark = "c" if worker.get("coordinator") else ""
        mark += "†" if worker.get("killed") else ""
        mark += "!" if worker.get("ignored_sigterm") else ""
        cpu = worker.get("cpu_seconds")
        cells.append(
            f"#{worker.get('worker')}{mark} {worker.get('peak_rss_mib', 0):.0f} MiB/{_fmt(cpu, '.1f')} s"
        )
    return ", ".join(cells)


def where_the_time_goes(line: Timeline | None) -> str:
    """A run's phases from its workers' logs: planning (received → planned), segments (→ the last
    built, in rounds: the most one worker built), join (→ completed), the rest (send → receive and
    completed → notification)."""
    if line is None:
        return "-"
    if line.planning_s is None:
        build = line.wall_s - (line.finish_s or 0.0)
        return f"build {build:.1f} s (fan-out off), rest {_fmt(line.finish_s, '.1f')} s"
    builds = sorted(line.build_s)
    median = builds[len(builds) // 2] if builds else None
    overhead = sorted(line.overhead_s)
    task = overhead[len(overhead) // 2] if overhead else None
    return (
        f"planning {line.planning_s:.1f} s, {line.segments} segments in {line.rounds or 0} round(s) "
        f"{_fmt(line.segments_s, '.1f')} s (a build {_fmt(median, '.1f')} s + {_fmt(task, '.2f')} s "
        f"per task), join {_fmt(line.join_s, '.1f')} s, rest {_fmt(line.finish_s, '.1f')} s"
    )


def print_curve(result: ScenarioResult, out: TextIO) -> None:
    """Workers, seconds (median), speed-up over one worker, same bytes, where the time went."""
    medians = {method: fanout_median(result, method) for method in FANOUT_CURVE}
    rows = [(method, run) for method, run in medians.items() if run is not None]
    if not rows:
        return
    print(
        "fan-out curve, send → notification (speed-up: 1 worker's time over it; bytes: against the one "
        "worker's archive; phases from the workers' logs):",
        file=out,
    )
    print(f"  {'workers':>7} {'seconds':>8} {'speed-up':>9} {'bytes':>9}  where the time goes", file=out)
    for method, run in rows:
        same = fanout_same_bytes(result, method) if method != FANOUT_BASELINE else None
        speedup = "–" if method == FANOUT_BASELINE else f"{_fmt(fanout_speedup(result, method), '.2f')}×"
        verdict = "–" if same is None else ("same" if same else "DIFFERENT")
        print(
            f"  {FANOUT_CURVE[method]:>7} {run.wall_seconds:>8.1f} {speedup:>9} {verdict:>9}  "
            f"{where_the_time_goes(timeline(run.as_dict()))}",
            file=out,
        )


def print_fanout(result: ScenarioResult, out: TextIO) -> None:
    if not any(result.runs(method) for method in FANOUT_METHODS):
        return
    print_curve(result, out)
    baseline = next((r for r in result.runs(FANOUT_BASELINE) if r.ok), None)
    digest: str | None = None if baseline is None else baseline.details.get("archive_sha256")
    if result.runs(FANOUT_KILLED) and digest:
        same = "same" if fanout_same_bytes(result, FANOUT_KILLED) else "DIFFERENT"
        killed = fanout_median(result, FANOUT_KILLED)
        took = "" if killed is None else f" in {killed.wall_seconds:.1f} s"
        print(f"{METHOD_LABELS[FANOUT_KILLED]}{took}: archive {same} (sha256 {digest[:16]}…)", file=out)
    for run in result.runs(FANOUT_KILLED):
        kill = run.details.get("kill") or {}
        mid = "segment.built" not in kill.get("victim_events_before_kill", [])
        again = ", ".join(
            f"#{item.get('segment')} by worker #{item.get('worker')}"
            for item in kill.get("segments_built_again", [])
        )
        print(
            f"SIGKILLed: worker #{kill.get('victim')} {_fmt(kill.get('killed_after_s'), '.1f')} s after the "
            f"send ({kill.get('reason')}{', before it finished a segment' if mid else ''}); "
            f"built again: {again or 'none'}; archive {'arrived' if run.ok else 'FAILED'}",
            file=out,
        )
    print(
        "peak RSS and CPU seconds per worker (c: coordinator, †: SIGKILLed, !: still running 30 s after "
        "the SIGTERM that ends the run, so SIGKILLed, its stacks dumped by py-spy beside its log):",
        file=out,
    )
    for run in (r for method in FANOUT_METHODS for r in result.runs(method)):
        segment = run.details.get("fanout_segment_bytes") or 0
        note = f"FANOUT_SEGMENT_BYTES {segment / MiB:g} MiB" if segment else "fan-out off"
        if not run.details.get("fanout_in_archiver"):
            note = "no fan-out in this archiver"
        print(f"  {METHOD_LABELS[run.method]} ({note}): {_worker_rss(run)}", file=out)


def fanout_targets(result: ScenarioResult) -> list[tuple[str, bool | None, str]]:
    """Issue #23: four workers at least 3.5x faster than one (issue #15 asked 3x); every fan-out run's
    archive the one worker's, byte for byte; a SIGKILLed worker costs none."""
    checks: list[tuple[str, bool | None, str]] = []
    one, four = fanout_median(result, FANOUT_BASELINE), fanout_median(result, FANOUT_FOUR)
    if result.runs(FANOUT_FOUR):
        speedup = fanout_speedup(result, FANOUT_FOUR)
        checks.append(
            (
                f"{result.label}: 4 workers ≥ {FANOUT_SPEEDUP_TARGET:g}× faster than 1 (send → notification)",
                None if speedup is None else speedup >= FANOUT_SPEEDUP_TARGET,
                "-"
                if one is None or four is None
                else f"{speedup or 0:.2f}× ({four.wall_seconds:.1f} s vs {one.wall_seconds:.1f} s)",
            )
        )
    for method in (m for m in FANOUT_CURVE if m != FANOUT_BASELINE):
        if result.runs(method):
            same = fanout_same_bytes(result, method)
            checks.append(
                (
                    f"{result.label}: {FANOUT_CURVE[method]} workers' archive = 1 worker's, byte for byte",
                    same,
                    str(same),
                )
            )
    if result.runs(FANOUT_KILLED):
        same = fanout_same_bytes(result, FANOUT_KILLED)
        killed = fanout_median(result, FANOUT_KILLED)
        checks.append(
            (
                f"{result.label}: one of 4 workers SIGKILLed mid-run, the same archive arrives",
                same,
                "-" if killed is None else f"in {killed.wall_seconds:.1f} s, same bytes: {same}",
            )
        )
    return checks
