"""bench/fleet.py's section of the bench output: the model's inputs, predicted against measured seconds
for each worker count, and the 100 GiB prediction against its goal."""

from __future__ import annotations

from typing import Any, TextIO

MiB = 1024 * 1024
GiB = 1024 * MiB
PHASES = ("planning", "segments", "rounds", "join", "build")


def _phases(phases: dict[str, float]) -> str:
    cells = []
    for key in PHASES:
        if key in phases:
            value = phases[key]
            cells.append(f"{key} {value:g}" if key == "rounds" else f"{key} {value:.1f} s")
    return ", ".join(cells)


def print_inputs(inputs: dict[str, Any], settings: dict[str, Any], notes: list[str], out: TextIO) -> None:
    cores = inputs.get("cores")
    print(
        f"inputs ({inputs.get('origin')}): GET/PUT/HEAD {1000 * inputs['get_latency_s']:.0f} ms to the "
        f"answer (the proxy's), link {inputs['link_bytes_per_s'] / 1e6:.1f} MB/s each way per worker, "
        f"CPU {1000 * inputs['cpu_s_per_mib']:.2f} ms per MiB zipped"
        + (f" on {cores:g} cores shared by every worker" if cores else "")
        + f"; planning {inputs['plan_fixed_s']:.2f} s + {1000 * inputs['plan_cpu_s_per_source']:.2f} ms "
        f"CPU per source (HEADs 32 at once); {inputs['segment_overhead_s']:.2f} s per segment task beyond "
        f"its build; join {inputs['join_fixed_s']:.2f} s + head copies; {inputs['finish_s']:.2f} s "
        f"send → receive and complete → notification",
        file=out,
    )
    print(
        f"settings: PART_SIZE {settings['part_size'] / MiB:g} MiB, UPLOAD_CONCURRENCY "
        f"{settings['upload_concurrency']}, PREFETCH_BYTES {settings['prefetch_bytes'] / MiB:g} MiB, "
        f"FANOUT_SEGMENT_BYTES {settings['segment_bytes'] / MiB:g} MiB" + "".join(f"; {n}" for n in notes),
        file=out,
    )


def print_curve(rows: list[dict[str, Any]], out: TextIO) -> None:
    header = f"  {'workers':>7} {'measured s':>11} {'predicted s':>12} {'error':>8}  predicted phases"
    print(header, file=out)
    for row in rows:
        print(
            f"  {row['workers']:>7} {row['measured_s']:>11.1f} {row['predicted_s']:>12.1f} "
            f"{row['error_pct']:>+7.1f}%  {_phases(row['phases'])}",
            file=out,
        )
    worst = max((abs(row["error_pct"]) for row in rows), default=0.0)
    print(f"  largest error {worst:.1f}% (issue #23 asks within 20%)", file=out)


def print_big(big: dict[str, Any], out: TextIO) -> None:
    assumed = big["assumptions"]
    print(
        f"\n{big['total_bytes'] / GiB:.1f} GiB: {big['photos']:,} photos of {big['photo_bytes'] / MiB:.1f} "
        f"MiB and {big['videos']} videos of {big['video_bytes'] / MiB:g} MiB on {big['tasks']} tasks, "
        f"goal under {big['goal_s'] / 60:g} minutes. Assumed: S3 {1000 * assumed['s3_latency_s']:.0f} ms "
        f"to the answer, {assumed['link_bytes_per_s_each_way'] * 8 / 1e9:g} Gbit/s per task each way "
        f"unless stated, UploadPartCopy {assumed['copy_bytes_per_s'] / 1e6:g} MB/s, {assumed['cpu']}; "
        "videos (200 MiB) copied server-side unless stated; the run's overheads (planning per source, per "
        "segment task, join, finish) as measured. MAX_FILES and MAX_ARCHIVE_BYTES must be raised for it "
        "(defaults 50,000 files and 100 GiB).",
        file=out,
    )
    width = max(len(row["label"]) for row in big["variants"])
    header = f"  {'assumption':<{width}} {'segments (MiB each)':>19} {'part':>7} {'predicted':>10}  phases"
    print(header, file=out)
    for row in big["variants"]:
        mark = "" if row["under_goal"] else "  (over the goal)"
        segments = f"{row['segments']:,} ({row.get('segment_mib', 0):g})"
        print(
            f"  {row['label']:<{width}} {segments:>19} {row['part_size'] / MiB:>5g} Mi "
            f"{row['predicted_s']:>8.0f} s  {_phases(row['phases'])}{mark}",
            file=out,
        )
    if big["reachable"]:
        verdict = "reachable with: " + "; ".join(big["reachable_with"])
    else:
        what_if = [row["label"] for row in big["variants"] if row["what_if"] and row["under_goal"]]
        verdict = "not reachable under these assumptions" + (
            f" (it would be {what_if[0].removeprefix('what if: ')})" if what_if else ""
        )
    print(f"  the model says the goal (under {big['goal_s']:.0f} s) is {verdict}", file=out)


def print_model(result: dict[str, Any], out: TextIO) -> None:
    print("\n== fleet model (bench/fleet.py): a discrete-event simulation from this run's costs", file=out)
    print_inputs(result["inputs"], result["settings"], result["notes"], out)
    print_curve(result["curve"], out)
    print_big(result["big_archive"], out)
