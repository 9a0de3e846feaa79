"""The fan-out runs' timelines and the model's inputs, read from a bench run: its results (the proxy's
latency and rate, each worker's CPU seconds, the times send → notification) and its workers' logs (when
the coordinator received the request and planned, each segment built, the archive completed).

Every cost bench/fleet.py uses comes from the same run: nothing is carried over from another machine."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.fleet_sim import PLAN_HEAD_CONCURRENCY, Costs, Knobs, join_work_s

MiB = 1024 * 1024
# Fan-out off, before the first GET: the status write and CreateMultipartUpload.
START_REQUESTS = 2
CURVE = {"fanout-1": 1, "fanout-2": 2, "fanout-4": 4, "fanout-8": 8}


@dataclass
class Timeline:
    """One run, from its logs: seconds from the coordinator's receive (None where not logged)."""

    method: str
    workers: int
    wall_s: float
    duration_s: float | None  # request.done: received → deleted
    planning_s: float | None = None  # received → fanout.planned
    segments_s: float | None = None  # planned → the last segment.built
    rounds: int | None = None  # most segments one worker built
    segments: int = 0
    join_s: float | None = None  # last segment.built → fanout.completed
    finish_s: float | None = None  # completed → request.done, plus send → receive and done → arrival
    build_s: list[float] = field(default_factory=list)  # each segment.built duration_s
    overhead_s: list[float] = field(default_factory=list)  # segment_task.done minus its build
    worker_mib: dict[int, float] = field(default_factory=dict)  # MiB of segments each worker built
    worker_cpu_s: dict[int, float] = field(default_factory=dict)
    coordinator: int | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("build_s", "overhead_s"):
            data[key] = [round(value, 3) for value in data[key]]
        return data


def _time(event: dict[str, Any]) -> float | None:
    stamp = event.get("timestamp")
    if not isinstance(stamp, str):
        return None
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _events(path: str) -> list[dict[str, Any]]:
    events = []
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and "event" in event:
            events.append(event)
    return events


def timeline(run: dict[str, Any]) -> Timeline | None:
    """The phases of one fan-out run (a MethodResult's dict), from its workers' logs."""
    details = run.get("details") or {}
    workers = details.get("workers") or []
    if not run.get("ok") or not workers:
        return None
    done = details.get("request_done") or {}
    line = Timeline(run["method"], len(workers), float(run["wall_seconds"]), done.get("duration_s"))
    marks: dict[str, float] = {}
    built_at: list[float] = []
    for worker in workers:
        index = int(worker["worker"])
        line.worker_cpu_s[index] = float(worker.get("cpu_seconds") or 0.0)
        if worker.get("coordinator"):
            line.coordinator = index
        _read_worker(line, index, _events(worker["log"]), marks, built_at)
    received = marks.get("request.done", 0.0) - float(line.duration_s or 0.0) if line.duration_s else None
    if received is not None and "fanout.planned" in marks:
        line.planning_s = marks["fanout.planned"] - received
        if built_at:
            line.segments_s = max(built_at) - marks["fanout.planned"]
    end = marks.get("fanout.completed", marks.get("archive.assembled"))
    if built_at and "fanout.completed" in marks:
        line.join_s = marks["fanout.completed"] - max(built_at)
    if end is not None and "request.done" in marks and line.duration_s is not None:
        line.finish_s = marks["request.done"] - end + line.wall_s - line.duration_s
    return line


def _read_worker(
    line: Timeline, index: int, events: list[dict[str, Any]], marks: dict[str, float], built_at: list[float]
) -> None:
    builds: dict[Any, float] = {}
    count = 0
    for event in events:
        name, at = event.get("event"), _time(event)
        if name in ("fanout.planned", "fanout.completed", "archive.assembled", "request.done") and at:
            if name != "request.done" or "size" in event:
                marks[str(name)] = at
        elif name == "segment.built" and at:
            count += 1
            built_at.append(at)
            line.build_s.append(float(event.get("duration_s") or 0.0))
            builds[event.get("segment")] = float(event.get("duration_s") or 0.0)
            line.worker_mib[index] = line.worker_mib.get(index, 0.0) + int(event.get("bytes") or 0) / MiB
        elif name == "segment_task.done" and event.get("outcome") == "built":
            build = builds.get(event.get("segment"))
            if build is not None:
                line.overhead_s.append(float(event.get("duration_s") or 0.0) - build)
    line.segments += count
    line.rounds = max(line.rounds or 0, count) or None


@dataclass
class Measured:
    """What the model is given and checked against: the costs, archiver's settings, each run."""

    costs: Costs
    knobs: Knobs
    sizes: list[int]
    curve: dict[int, float]  # workers -> median seconds, send → notification
    timelines: list[Timeline]
    notes: list[str]


def fanout_runs(document: dict[str, Any]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The fanout scenario of a results document and its runs on the curve (the kill run is not)."""
    for scenario in document.get("scenarios", []):
        if scenario.get("name") == "fanout":
            return scenario, [r for r in scenario.get("results", []) if r.get("method") in CURVE]
    return None, []


def measure(document: dict[str, Any]) -> Measured | None:
    """The model's inputs from one bench run, or None when it has no fan-out run to learn from."""
    scenario, runs = fanout_runs(document)
    good = [r for r in runs if r.get("ok")]
    if scenario is None or not good:
        return None
    lines = [line for line in (timeline(run) for run in good) if line is not None]
    proxy = good[0]["details"].get("proxy") or {}
    latency = float(proxy.get("latency_ms", 20.0)) / 1000
    knobs = _knobs(document, good)
    count = int(scenario["files"])
    sizes = [int(scenario["source_bytes"]) // count] * count
    notes: list[str] = []
    idle, cpu = _cpu_per_mib(lines, sum(sizes) / MiB, notes)
    fanned = [line for line in lines if line.planning_s is not None]
    planning = _median([line.planning_s for line in fanned]) or 0.0
    # The coordinator's CPU beyond idling and the segments it built: its HEADs, plan and join, per source.
    excess = _median(
        [
            line.worker_cpu_s[line.coordinator] - idle - cpu * line.worker_mib.get(line.coordinator, 0.0)
            for line in fanned
            if line.coordinator is not None
        ]
    )
    plan_cpu = max(0.0, excess or 0.0) / count
    notes.append(
        "planning CPU per source: the coordinator's CPU beyond idling and its segments' over its "
        f"{count} sources, an upper bound (its fixed CPU, for the plan's other requests and the join, is "
        "spread over them)"
    )
    join = _median([line.join_s for line in fanned])
    segments = max((line.segments for line in fanned), default=0)
    heads_s = max(-(-count // PLAN_HEAD_CONCURRENCY) * latency, count * plan_cpu)
    plan_fixed = max(0.0, planning - heads_s - 2 * -(-segments // 8) * latency)
    heads = [sum(sizes) // segments] * segments if segments else []
    latencies = Costs(latency, latency, latency, float(proxy.get("rate_bytes_per_s_each_way", 12e6)), cpu)
    join_work = join_work_s(heads, knobs.part_size, latencies)
    costs = Costs(
        get_latency_s=latency,
        put_latency_s=latency,
        head_latency_s=latency,
        link_bytes_per_s=float(proxy.get("rate_bytes_per_s_each_way", 12e6)),
        cpu_s_per_mib=cpu,
        cores=float((document.get("environment") or {}).get("cpus") or 2),
        plan_fixed_s=plan_fixed,
        plan_cpu_s_per_source=plan_cpu,
        start_s=START_REQUESTS * latency,
        segment_overhead_s=_median([v for line in fanned for v in line.overhead_s]) or 0.0,
        join_fixed_s=max(0.0, (join or 0.0) - join_work - latency),
        finish_s=_median([line.finish_s for line in lines]) or 0.0,
        origin=f"run {document.get('run_id')}",
    )
    curve = {
        CURVE[method]: statistics.median(r["wall_seconds"] for r in good if r["method"] == method)
        for method in CURVE
        if any(r["method"] == method for r in good)
    }
    return Measured(costs, knobs, sizes, curve, lines, notes)


def _knobs(document: dict[str, Any], runs: list[dict[str, Any]]) -> Knobs:
    """The settings the run's workers had: the bench's tuning, the fanned-out runs' segment size."""
    environment = document.get("environment") or {}
    tuning = environment.get("tuning") or {}
    return Knobs(
        part_size=int(tuning.get("part_size") or 8 * MiB),
        upload_concurrency=int(tuning.get("upload_concurrency") or 4),
        prefetch_bytes=int(tuning.get("prefetch_bytes") or 12 * MiB),
        segment_bytes=max((int(r["details"].get("fanout_segment_bytes") or 0) for r in runs), default=0),
        copy_min_bytes=environment.get("server_side_copy_min_bytes"),
    )


def _median(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def _cpu_per_mib(lines: list[Timeline], total_mib: float, notes: list[str]) -> tuple[float, float]:
    """CPU seconds per MiB zipped: the slope of each worker's CPU seconds over the MiB it built (the
    one worker's whole archive, the others' segments; coordinators left out, they also plan and join),
    which leaves out what a worker spends starting and idling. Without two different sizes to fit, the
    one worker's CPU over its MiB. Returns (idle CPU seconds, CPU seconds per MiB)."""
    points: list[tuple[float, float]] = []
    for line in lines:
        if line.workers == 1:
            points.extend((total_mib, cpu) for cpu in line.worker_cpu_s.values())
            continue
        for index, cpu in line.worker_cpu_s.items():
            if index != line.coordinator:
                points.append((line.worker_mib.get(index, 0.0), cpu))
    xs = [x for x, _ in points]
    if len(set(xs)) >= 2:
        fit = statistics.linear_regression(xs, [y for _, y in points])
        if fit.slope > 0:
            notes.append(
                f"CPU per MiB: the slope of CPU seconds over MiB built, {len(points)} workers "
                f"({fit.intercept:.2f} s each for starting and idling)"
            )
            return fit.intercept, fit.slope
    single = [cpu for line in lines if line.workers == 1 for cpu in line.worker_cpu_s.values()]
    notes.append("CPU per MiB: the one worker's CPU seconds over its MiB (start-up included)")
    return 0.0, (single[0] / total_mib) if single and total_mib else 0.0
