"""A model of the fleet (issue #23): a discrete-event simulation of one fanned-out request, from costs per
request and per byte measured in the same bench run, checked against the 1/2/4/8-worker runs and used
to predict a 100 GiB archive of photos and videos on 16 tasks.

What it simulates (plain Python, one heap of events):
- the **coordinator** receives the request and plans: `plan_fixed_s` plus its HEADs, `PLAN_HEAD_CONCURRENCY`
  at a time at `head_latency_s` each or `plan_cpu_s_per_source` each, whichever is slower; then every
  segment (archiver's own `segment_runs` and part-size rule) is a task on the queue;
- each **worker** takes the next task (the coordinator takes them from the last), pays
  `segment_overhead_s` (receive, plan and entries GETs, claim, record), and builds the segment: GETs of
  its sources, at most `SOURCE_GETS` in flight and only while their bodies fit the read-ahead window
  (as archiver.prefetch sends them), each `get_latency_s` to its first byte then its body on the worker's
  down link, shared by every body in flight; the writer zips them in order (`cpu_s_per_mib`, on one core
  of the worker, or of the `cores` the whole fleet shares), cuts parts of the part size and uploads up to
  `UPLOAD_CONCURRENCY` at once on the up link, each answered `put_latency_s` after its last byte; a
  source copied server-side streams its first 5 MiB and `UploadPartCopy`s the rest at `copy_bytes_per_s`;
- once every segment is built the coordinator **joins**: `join_fixed_s`, each head copied in (8 at once)
  or, under 5 MiB, read and uploaded again through its links, then the last part and the completion;
- `finish_s`: from the send to the receive and from the completion to the notification's arrival.
With fan-out off one worker builds the whole archive as one segment, after `start_s`, with the sizes
unknown until the GETs answer (so its first `SOURCE_GETS` GETs go at once).

`python -m bench.fleet RESULTS.json` re-runs the model on a saved bench run (bench/fleet_costs.py reads
the costs from it and from its workers' logs).
"""

from __future__ import annotations

import json
import math
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from archiver.fanout.layout import segment_runs
from archiver.multipart import choose_part_size
from bench.fleet_costs import Measured, measure
from bench.fleet_print import print_model
from bench.fleet_sim import (
    ENTRY_OVERHEAD,
    PLAN_HEAD_CONCURRENCY,
    Build,
    Clock,
    Costs,
    Knobs,
    Shared,
    Task,
    join_work_s,
    new_task,
)

MiB = 1024 * 1024
PLAN_WRITERS = 8  # entries written, tasks sent, at once (archiver.fanout.planning, tasks)


@dataclass
class Prediction:
    seconds: float
    workers: int
    segments: int
    part_size: int
    phases: dict[str, float] = field(default_factory=dict)


def layout(sizes: Sequence[int], knobs: Knobs) -> tuple[list[tuple[int, int]], int]:
    """Segments ((first, count) runs) and the part size, as archiver.fanout.layout cuts them: segments
    double until the part size is at most twice a single worker's."""
    bound = sum(sizes) + ENTRY_OVERHEAD * len(sizes)
    single = choose_part_size(bound, knobs.part_size)
    if not knobs.segment_bytes:
        return [(0, len(sizes))], single
    segment = knobs.segment_bytes
    copies = sum(1 for size in sizes if knobs.copy_min_bytes is not None and size >= knobs.copy_min_bytes)
    while True:
        runs = segment_runs(list(sizes), segment)
        spare = min(9_000, 5 * copies + 4 * len(runs) + 1)
        part = choose_part_size(bound, knobs.part_size, extra_parts=spare)
        if part <= 2 * single or len(runs) <= 2:
            return runs, part
        segment *= 2


def planning_s(sources: int, segments: int, costs: Costs) -> float:
    """The coordinator's plan: its fixed requests, its HEADs (PLAN_HEAD_CONCURRENCY at once, each bound
    by its latency or by the CPU it takes, whichever is slower), the entries written and the tasks sent
    (8 at once each)."""
    heads = max(
        math.ceil(sources / PLAN_HEAD_CONCURRENCY) * costs.head_latency_s,
        sources * costs.plan_cpu_s_per_source,
    )
    return costs.plan_fixed_s + heads + 2 * math.ceil(segments / PLAN_WRITERS) * costs.put_latency_s


def simulate(sizes: Sequence[int], workers: int, costs: Costs, knobs: Knobs) -> Prediction:
    """Seconds from the send to the notification for `workers` workers (each a task of its own)."""
    clock = Clock()
    shared_cpu = None if costs.cores is None else Shared(clock, costs.cores, per_flow=1.0)
    tasks = [new_task(clock, costs, knobs, shared_cpu) for _ in range(max(1, workers))]
    fanned = bool(knobs.segment_bytes) and sum(sizes) > 2 * knobs.segment_bytes
    runs, part_size = layout(sizes, knobs if fanned else replace(knobs, segment_bytes=0))
    phases: dict[str, float] = {}
    ended: list[float] = []

    def finish() -> None:
        ended.append(clock.now + costs.put_latency_s + costs.finish_s)

    if not fanned:
        clock.after(
            costs.start_s,
            lambda: Build(tasks[0], list(sizes), part_size, known=False, done=finish).begin(),
        )
        clock.run()
        phases["build"] = ended[0] - costs.start_s - costs.put_latency_s - costs.finish_s
        return Prediction(ended[0], 1, 1, part_size, phases)
    planning = planning_s(len(sizes), len(runs), costs)
    phases["planning"] = planning
    _fan_out(clock, tasks, sizes, runs, part_size, planning, phases, finish)
    clock.run()
    return Prediction(ended[0], len(tasks), len(runs), part_size, phases)


def _fan_out(
    clock: Clock,
    tasks: list[Task],
    sizes: Sequence[int],
    runs: list[tuple[int, int]],
    part_size: int,
    planning: float,
    phases: dict[str, float],
    finish: Callable[[], None],
) -> None:
    """Segment tasks claimed by idle workers (the coordinator, tasks[0], from the last), then the join."""
    costs, queue, left = tasks[0].costs, deque(range(len(runs))), [len(runs)]
    per_worker = [0] * len(tasks)

    def take(index: int) -> None:
        if not queue:
            return
        segment = queue.pop() if index == 0 else queue.popleft()
        per_worker[index] += 1
        first, count = runs[segment]

        def built() -> None:
            left[0] -= 1
            if left[0] == 0:
                phases["segments"] = clock.now - planning
                phases["rounds"] = max(per_worker)
                _join(clock, tasks[0], [sum(sizes[f : f + c]) for f, c in runs], part_size, phases, finish)
            else:
                take(index)

        build = Build(tasks[index], list(sizes[first : first + count]), part_size, known=True, done=built)
        clock.after(costs.segment_overhead_s, build.begin)

    for index in range(len(tasks)):
        clock.after(planning, lambda index=index: take(index))  # type: ignore[misc]


def _join(
    clock: Clock,
    task: Task,
    segment_sizes: list[int],
    part_size: int,
    phases: dict[str, float],
    finish: Callable[[], None],
) -> None:
    """The coordinator's join (`join_work_s`), then the completion (`finish` adds it)."""
    costs, seconds = task.costs, join_work_s(segment_sizes, part_size, task.costs)

    def done() -> None:
        phases["join"] = costs.join_fixed_s + seconds + costs.put_latency_s
        finish()

    clock.after(costs.join_fixed_s + seconds, done)


# ------------------------------------------------------------------------------------ the big archive

GOAL_SECONDS = 300.0
BIG_TASKS = 16
PHOTOS, PHOTO_BYTES = 100_000, int(0.8 * MiB)  # phone photos of ~0.8 MiB
VIDEOS, VIDEO_BYTES = 112, 200 * MiB  # and a few hundred MiB-sized videos: 100 GiB in all
AWS_LATENCY_S = 0.020  # S3 in-region, to the first byte
AWS_LINK_BYTES_PER_S = 125e6  # 1 Gbit/s per task, each way (an assumption: Fargate tasks vary)
AWS_COPY_BYTES_PER_S = 100e6  # one UploadPartCopy inside S3 (an assumption)


def big_archive() -> list[int]:
    """100,000 photos with a video every ~900 of them, in request order: 100 GiB."""
    sizes: list[int] = []
    every = PHOTOS // VIDEOS
    for index in range(PHOTOS):
        sizes.append(PHOTO_BYTES)
        if index % every == every - 1 and len(sizes) - index - 1 < VIDEOS:
            sizes.append(VIDEO_BYTES)
    return sizes


def aws_costs(measured: Costs, *, link_bytes_per_s: float = AWS_LINK_BYTES_PER_S) -> Costs:
    """The run's CPU and overheads, with S3's latency, a task's link and a core per task."""
    return replace(
        measured,
        get_latency_s=AWS_LATENCY_S,
        put_latency_s=AWS_LATENCY_S,
        head_latency_s=AWS_LATENCY_S,
        link_bytes_per_s=link_bytes_per_s,
        cores=None,
        copy_bytes_per_s=AWS_COPY_BYTES_PER_S,
        origin=f"{measured.origin}, with S3's latency and a stated link",
    )


# The coordinator's CPU per source planning 5,000 sources (`python -m bench.fanout_plan`, 2026-12-07:
# 0.52 ms with obstore's HEADs, 1.34 with boto3's), where the fan-out run's own figure spreads its fixed
# CPU over 256 sources: an estimate of the same input at scale, not a change to archiver.
PLAN_CPU_AT_SCALE_S = 0.00052


@dataclass(frozen=True)
class Variant:
    label: str
    segment_bytes: int
    link_bytes_per_s: float | None = None  # None: AWS_LINK_BYTES_PER_S
    copies: bool = True  # videos copied server-side (SERVER_SIDE_COPY_MIN_BYTES, 64 MiB)
    plan_cpu_s_per_source: float | None = None  # None: as measured
    what_if: bool = False  # a change to archiver, not an assumption about AWS


def variants(measured: Measured) -> list[Variant]:
    link = measured.costs.link_bytes_per_s
    return [
        Variant("1 Gbit/s per task, 64 MiB segments", 64 * MiB),
        Variant("1 Gbit/s per task, 128 MiB segments", 128 * MiB),
        Variant("1 Gbit/s per task, 256 MiB segments", 256 * MiB),
        Variant("1 Gbit/s, 128 MiB, videos streamed (no copies)", 128 * MiB, copies=False),
        Variant(f"the bench's {link / 1e6:g} MB/s per task, 128 MiB", 128 * MiB, link_bytes_per_s=link),
        Variant(
            "1 Gbit/s, 128 MiB, planning CPU as at 5,000 sources",
            128 * MiB,
            plan_cpu_s_per_source=PLAN_CPU_AT_SCALE_S,
        ),
    ]


def curve_rows(measured: Measured) -> list[dict[str, Any]]:
    """Predicted against measured for each worker count the run measured."""
    rows = []
    for workers, seconds in sorted(measured.curve.items()):
        knobs = measured.knobs if workers > 1 else replace(measured.knobs, segment_bytes=0)
        predicted = simulate(measured.sizes, workers, measured.costs, knobs)
        rows.append(
            {
                "workers": workers,
                "measured_s": round(seconds, 2),
                "predicted_s": round(predicted.seconds, 2),
                "error_pct": round(100 * (predicted.seconds - seconds) / seconds, 1),
                "phases": {key: round(value, 2) for key, value in predicted.phases.items()},
            }
        )
    return rows


def big_rows(measured: Measured) -> list[dict[str, Any]]:
    sizes, rows = big_archive(), []
    for variant in variants(measured):
        costs = aws_costs(measured.costs, link_bytes_per_s=variant.link_bytes_per_s or AWS_LINK_BYTES_PER_S)
        if variant.plan_cpu_s_per_source is not None:
            costs = replace(costs, plan_cpu_s_per_source=variant.plan_cpu_s_per_source)
        knobs = replace(
            measured.knobs,
            segment_bytes=variant.segment_bytes,
            copy_min_bytes=(measured.knobs.copy_min_bytes or 64 * MiB) if variant.copies else None,
        )
        predicted = simulate(sizes, BIG_TASKS, costs, knobs)
        rows.append(
            {
                **asdict(variant),
                "predicted_s": round(predicted.seconds, 1),
                "segments": predicted.segments,
                "segment_mib": round(sum(sizes) / predicted.segments / MiB),
                "part_size": predicted.part_size,
                "phases": {key: round(value, 1) for key, value in predicted.phases.items()},
                "under_goal": predicted.seconds < GOAL_SECONDS,
            }
        )
    return rows


def model(document: dict[str, Any]) -> dict[str, Any] | None:
    """The model's section of a results document: its inputs, the curve checked, the big prediction."""
    measured = measure(document)
    if measured is None:
        return None
    big = big_rows(measured)
    reachable = [row for row in big if row["under_goal"] and not row["what_if"]]
    return {
        "inputs": asdict(measured.costs),
        "settings": asdict(measured.knobs),
        "notes": measured.notes,
        "timelines": [line.as_dict() for line in measured.timelines],
        "curve": curve_rows(measured),
        "big_archive": {
            "photos": PHOTOS,
            "photo_bytes": PHOTO_BYTES,
            "videos": VIDEOS,
            "video_bytes": VIDEO_BYTES,
            "total_bytes": sum(big_archive()),
            "tasks": BIG_TASKS,
            "goal_s": GOAL_SECONDS,
            "assumptions": {
                "s3_latency_s": AWS_LATENCY_S,
                "link_bytes_per_s_each_way": AWS_LINK_BYTES_PER_S,
                "copy_bytes_per_s": AWS_COPY_BYTES_PER_S,
                "cpu": "one core per task, at this run's CPU seconds per MiB",
            },
            "variants": big,
            "reachable": bool(reachable),
            "reachable_with": [row["label"] for row in reachable],
        },
    }


def section(document: dict[str, Any], out: TextIO) -> dict[str, Any] | None:
    """For bench/__main__.py: the model of the run's fan-out results, printed; None without any."""
    try:
        result = model(document)
    except Exception as exc:  # the model must not cost the run its results
        print(f"\n== fleet model: failed, {type(exc).__name__}: {exc}", file=out)
        return {"error": f"{type(exc).__name__}: {exc}"}
    if result is not None:
        print_model(result, out)
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m bench.fleet RESULTS.json", file=sys.stderr)
        return 2
    document = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    if section(document, sys.stdout) is None:
        print(f"{args[0]}: no successful fan-out run to model", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
