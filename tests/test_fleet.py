"""bench/fleet.py, the model of the fleet: its simulation's basic properties, and the costs it reads from a
bench run (fleet_costs), on made-up runs. Fast: no servers."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import fleet
from bench.fleet import MiB, simulate
from bench.fleet_costs import measure, timeline
from bench.fleet_sim import Costs, Knobs

COSTS = Costs(
    get_latency_s=0.02,
    put_latency_s=0.02,
    head_latency_s=0.02,
    link_bytes_per_s=12e6,
    cpu_s_per_mib=0.01,
    plan_fixed_s=0.1,
    plan_cpu_s_per_source=0.001,
    start_s=0.04,
    segment_overhead_s=0.2,
    join_fixed_s=0.3,
    finish_s=0.2,
)
OFF = Knobs(segment_bytes=0)
ON = Knobs(segment_bytes=64 * MiB)
PHOTOS = [2 * MiB] * 256  # the bench's fanout scenario


def one_worker_steps(size: int, costs: Costs) -> float:
    """One small source, one part: every step in turn, nothing to overlap."""
    return (
        costs.start_s
        + costs.get_latency_s
        + size / costs.link_bytes_per_s  # its body down
        + size / MiB * costs.cpu_s_per_mib  # zipped
        + size / costs.link_bytes_per_s  # the one part up
        + costs.put_latency_s  # its answer
        + costs.put_latency_s  # CompleteMultipartUpload
        + costs.finish_s
    )


def test_one_worker_is_the_sum_of_its_steps() -> None:
    size = 3 * MiB
    assert simulate([size], 1, COSTS, OFF).seconds == pytest.approx(one_worker_steps(size, COSTS))


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 6 * MiB),
    latency=st.floats(0.0, 0.2),
    link=st.floats(1e6, 1e9),
    cpu=st.floats(0.0, 0.05),
)
def test_one_worker_is_the_sum_of_its_steps_whatever_the_costs(
    size: int, latency: float, link: float, cpu: float
) -> None:
    costs = replace(
        COSTS, get_latency_s=latency, put_latency_s=latency, link_bytes_per_s=link, cpu_s_per_mib=cpu
    )
    assert simulate([size], 1, costs, OFF).seconds == pytest.approx(one_worker_steps(size, costs))


def test_a_link_bound_worker_takes_the_bytes_over_its_link() -> None:
    """256 x 2 MiB through one 12 MB/s link: about 45 s, plus the start (32 GETs at once) and the end."""
    seconds = simulate(PHOTOS, 1, COSTS, OFF).seconds
    floor = sum(PHOTOS) / COSTS.link_bytes_per_s
    assert floor < seconds < floor * 1.2


def test_time_falls_with_workers_until_the_segments_run_out() -> None:
    """8 segments of 64 MiB: 2, 4, 8 workers each faster; 16 no faster than 8 (half of them idle)."""
    times = {w: simulate(PHOTOS, w, COSTS, ON).seconds for w in (1, 2, 4, 8, 16)}
    assert times[1] > times[2] > times[4] > times[8]
    assert times[16] == pytest.approx(times[8], rel=0.01)
    assert simulate(PHOTOS, 8, COSTS, ON).segments == 8
    # Each round of segments is bound by one link: 64 MiB at 12 MB/s, ~5.6 s.
    assert times[4] - times[8] > 0.9 * 64 * MiB / COSTS.link_bytes_per_s


@settings(max_examples=40, deadline=None)
@given(
    count=st.integers(20, 300),
    workers=st.integers(1, 12),
    segment_mib=st.sampled_from([5, 8, 16, 32]),
    link=st.floats(2e6, 2e8),
)
def test_never_faster_than_the_links_or_the_plan(
    count: int, workers: int, segment_mib: int, link: float
) -> None:
    sizes = [1 * MiB] * count
    costs = replace(COSTS, link_bytes_per_s=link)
    knobs = Knobs(segment_bytes=segment_mib * MiB)
    predicted = simulate(sizes, workers, costs, knobs)
    assert predicted.seconds >= sum(sizes) / (workers * link)
    if predicted.segments > 1:
        assert predicted.seconds >= predicted.phases["planning"] + predicted.phases["join"]


@pytest.mark.parametrize(
    ("change", "at_least"),
    [
        ({"link_bytes_per_s": 6e6}, 1.8),  # half the bandwidth: link-bound, about twice the time
        ({"get_latency_s": 0.5, "put_latency_s": 0.5}, 1.05),
        ({"cpu_s_per_mib": 0.2, "cores": 2.0}, 1.3),  # CPU-bound on two shared cores
        ({"segment_overhead_s": 3.0}, 1.2),
        ({"plan_cpu_s_per_source": 0.05}, 1.5),
    ],
)
def test_a_mistake_in_the_inputs_changes_the_answer(change: dict[str, Any], at_least: float) -> None:
    right = simulate(PHOTOS, 4, COSTS, ON).seconds
    wrong = simulate(PHOTOS, 4, replace(COSTS, **change), ON).seconds
    assert wrong > at_least * right


def test_the_segment_size_changes_the_rounds() -> None:
    assert simulate(PHOTOS, 4, COSTS, ON).phases["rounds"] == 2
    assert simulate(PHOTOS, 4, COSTS, Knobs(segment_bytes=32 * MiB)).phases["rounds"] == 4


def test_the_big_archive_is_100_gib_of_photos_and_videos() -> None:
    sizes = fleet.big_archive()
    assert len(sizes) == fleet.PHOTOS + fleet.VIDEOS
    assert sizes.count(fleet.VIDEO_BYTES) == fleet.VIDEOS
    assert sum(sizes) / 1024**3 == pytest.approx(100, rel=0.01)


# --------------------------------------------------------------------- costs from a (made-up) bench run

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def _line(event: str, at: float, **fields: Any) -> str:
    stamp = (T0 + timedelta(seconds=at)).isoformat().replace("+00:00", "Z")
    return json.dumps({"event": event, "timestamp": stamp, **fields})


def _run(tmp: Path, method: str, workers: int, wall: float, cpu: list[float]) -> dict[str, Any]:
    """A fan-out run's result whose logs say: received at 0.1 s, planned at 1.0 s, segments of 64 MiB
    built 7 s each by each worker in turn, completed 0.5 s after the last, done 0.1 s later."""
    logs = []
    segments, built, duration = 8, 1.0, wall - 0.2
    per_worker: dict[int, list[str]] = {w: [] for w in range(1, workers + 1)}
    if workers > 1:
        per_worker[1].append(_line("fanout.planned", 1.0))
        for segment in range(segments):
            worker = 1 + segment % workers
            at = 1.0 + 7.0 * (1 + segment // workers)
            built = max(built, at)
            per_worker[worker].append(
                _line("segment.built", at, segment=segment, bytes=64 * MiB, duration_s=6.8)
            )
            per_worker[worker].append(
                _line("segment_task.done", at + 0.2, segment=segment, outcome="built", duration_s=7.0)
            )
        per_worker[1].append(_line("fanout.completed", built + 0.5))
    else:
        per_worker[1].append(_line("archive.assembled", duration))
    per_worker[1].append(_line("request.done", 0.1 + duration, size=1, duration_s=duration))
    for worker, lines in per_worker.items():
        path = tmp / f"{method}-worker{worker}.log"
        path.write_text("\n".join(lines) + "\n")
        logs.append(
            {"worker": worker, "log": str(path), "cpu_seconds": cpu[worker - 1], "coordinator": worker == 1}
        )
    return {
        "method": method,
        "ok": True,
        "wall_seconds": wall,
        "details": {
            "workers": logs,
            "request_done": {"duration_s": duration},
            "fanout_segment_bytes": 0 if workers == 1 else 64 * MiB,
            "proxy": {"latency_ms": 20.0, "rate_bytes_per_s_each_way": 12_000_000},
        },
    }


def _document(tmp: Path) -> dict[str, Any]:
    # CPU: 1 s to start and idle, 0.01 s per MiB built; the coordinator 0.5 s more for its plan.
    runs = [
        _run(tmp, "fanout-1", 1, 50.0, [1.0 + 5.12]),
        _run(tmp, "fanout-4", 4, 16.5, [1.5 + 1.28, 1.0 + 1.28, 1.0 + 1.28, 1.0 + 1.28]),
        _run(tmp, "fanout-8", 8, 9.0, [1.5 + 0.64] + [1.0 + 0.64] * 7),
    ]
    return {
        "run_id": "test",
        "environment": {"cpus": 2, "tuning": {"part_size": 8 * MiB}, "server_side_copy_min_bytes": 64 * MiB},
        "scenarios": [{"name": "fanout", "files": 256, "source_bytes": 512 * MiB, "results": runs}],
    }


def test_the_timeline_of_a_run_comes_from_its_logs(tmp_path: Path) -> None:
    line = timeline(_run(tmp_path, "fanout-4", 4, 16.5, [1.0] * 4))
    assert line is not None
    assert line.planning_s == pytest.approx(0.9, abs=0.01)
    assert line.rounds == 2 and line.segments == 8
    assert line.segments_s == pytest.approx(14.0, abs=0.01)
    assert line.join_s == pytest.approx(0.5, abs=0.01)
    assert line.overhead_s == [pytest.approx(0.2)] * 8


def test_the_costs_come_from_the_same_run(tmp_path: Path) -> None:
    measured = measure(_document(tmp_path))
    assert measured is not None
    costs = measured.costs
    assert costs.get_latency_s == costs.put_latency_s == 0.02  # the proxy's
    assert costs.link_bytes_per_s == 12e6
    assert costs.cpu_s_per_mib == pytest.approx(0.01, rel=0.01)  # the slope, not the start-up
    assert costs.plan_cpu_s_per_source == pytest.approx(0.5 / 256, rel=0.05)
    assert costs.segment_overhead_s == pytest.approx(0.2)
    assert measured.curve == {1: 50.0, 4: 16.5, 8: 9.0}
    assert measured.knobs.segment_bytes == 64 * MiB


def test_the_model_is_printed_and_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fleet, "PHOTOS", 2_000)  # 1/50 of the big archive: the test stays fast
    monkeypatch.setattr(fleet, "VIDEOS", 2)
    results = tmp_path / "run.json"
    results.write_text(json.dumps(_document(tmp_path)))
    assert fleet.main([str(results)]) == 0
    printed = capsys.readouterr().out
    assert "predicted" in printed and "2,000 photos" in printed and "under 5 minutes" in printed
    model = fleet.model(_document(tmp_path))
    assert model is not None
    assert [row["workers"] for row in model["curve"]] == [1, 4, 8]
    assert all(abs(row["error_pct"]) < 50 for row in model["curve"])
    assert isinstance(model["big_archive"]["reachable"], bool)
