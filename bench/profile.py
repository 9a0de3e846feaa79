"""Where archiver's time goes: one extra, unmeasured worker run under py-spy, summarised as the top frames.

py-spy starts the worker itself (`py-spy record -- python -m archiver worker --burst`) rather than
attaching with `--pid`, so no sample is lost to the race between spawning and attaching. It samples from
outside the process (`--nonblocking`: the worker is never paused), but it still takes CPU on a 2-core
machine, which is why this run is separate from the measured one.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from bench.servers import ensure_installed

RATE = 100  # samples per second per thread
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*?)(?::\d+)?\)$")
_THREAD = re.compile(r"^thread \(\d+\)(?:: (?P<name>.*))?$")


def py_spy_command(command: list[str], output: Path) -> list[str]:
    """`command` run under py-spy, its stacks written to `output` in the collapsed ("raw") format."""
    py_spy = ensure_installed("py-spy", "py-spy")
    return [
        py_spy,
        "record",
        "--rate",
        str(RATE),
        "--nonblocking",
        "--threads",
        "--format",
        "raw",
        "--output",
        str(output),
        "--",
        *command,
    ]


def _short(frame: str) -> str:
    """`function (path:line)` → `function (package/module.py)`: lines apart, a function is one row."""
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = path.rsplit("/main/", 1)[-1]
    return f"{match['function']} ({path})"


def _thread_group(root: str) -> str | None:
    match = _THREAD.match(root)
    if not match:
        return None
    name = match["name"] or "unnamed"
    # part_0, part_1, ThreadPoolExecutor-0_3: one row per pool, not per thread.
    return re.sub(r"(_\d+)+$", "", name)


def summarise(raw: Path, *, seconds: float, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares of the top functions, and how busy each thread group was
    (samples / (rate * seconds): 1.0 is one core's worth; py-spy drops idle samples)."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        group = _thread_group(frames[0])
        if group is not None:
            threads[group] += count
            frames = frames[1:]
        if not frames:
            continue
        total += count
        shortened = [_short(frame) for frame in frames]
        self_time[shortened[-1]] += count
        for frame in set(shortened):
            inclusive[frame] += count

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"frame": frame, "samples": count, "pct": round(100 * count / total, 1)}
            for frame, count in counter.most_common(top)
        ]

    possible = max(1.0, RATE * seconds)
    return {
        "samples": total,
        "seconds": round(seconds, 2),
        "raw": str(raw),
        "threads_busy": {name: round(count / possible, 2) for name, count in threads.most_common()},
        "top_self": share(self_time) if total else [],
        "top_inclusive": share(inclusive) if total else [],
    }


def format_summary(summary: dict[str, Any]) -> str:
    if "error" in summary:
        return f"py-spy: {summary['error']}"
    lines = [
        f"py-spy: {summary['samples']} samples over {summary['seconds']} s (raw stacks: {summary['raw']})",
        "  busy (cores) by thread: "
        + ", ".join(f"{name} {busy:.2f}" for name, busy in summary["threads_busy"].items()),
        "  top self time:",
        *(f"    {row['pct']:5.1f}%  {row['frame']}" for row in summary["top_self"]),
        "  top inclusive time:",
        *(f"    {row['pct']:5.1f}%  {row['frame']}" for row in summary["top_inclusive"]),
    ]
    return "\n".join(lines)
