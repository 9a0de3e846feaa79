"""Results: one row per method, a table per scenario, ratios, the targets, and the JSON file."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

MiB = 1024 * 1024
MB = 1_000_000

# The issue's targets for archiver.
RAW_RATIO_TARGET = 0.9  # throughput vs the raw copy, on incompressible data
INMEMORY_RATIO_TARGET = 3.0  # throughput vs the in-memory design, on the 2,000 small files
RSS_LIMIT_MIB = 150.0
FLAT_RSS_TOLERANCE = 0.10

METHOD_LABELS = {
    "raw": "raw copy",  # GETs concatenated into one upload_fileobj
    "inmemory": "in-memory zipfile",  # zipfile into BytesIO, then upload_fileobj
    "archiver": "archiver worker",  # `archiver worker --burst`, request sent through SQS
}
LABEL_WIDTH = 22


@dataclass
class MethodResult:
    method: str
    ok: bool
    # From the subprocess's start to the archive being complete (for archiver: the notification's
    # arrival); includes interpreter start-up and imports.
    wall_seconds: float
    # The work alone: the method's own clock (raw, in-memory) or archiver's canonical log line
    # `request.done duration_s` (from receiving the message to deleting it). MB/s are computed on this,
    # since a long-running worker pays its start-up once, not per request.
    work_seconds: float | None
    source_bytes: int
    peak_rss_bytes: int
    archive_bytes: int | None = None
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float | None:
        if not self.ok or not self.work_seconds:
            return None
        return self.source_bytes / self.work_seconds / MB

    @property
    def peak_rss_mib(self) -> float:
        return self.peak_rss_bytes / MiB

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mb_per_s"] = _round(self.mb_per_s)
        data["peak_rss_mib"] = round(self.peak_rss_mib, 1)
        return data


@dataclass
class ScenarioResult:
    name: str
    description: str
    files: int
    source_bytes: int
    results: list[MethodResult] = field(default_factory=list)
    setup_seconds: float = 0.0
    profile: dict[str, Any] | None = None

    def runs(self, method: str) -> list[MethodResult]:
        return [r for r in self.results if r.method == method]

    def get(self, method: str) -> MethodResult | None:
        """The median successful run of `method` by throughput (with --repeat; the only one otherwise):
        on a shared machine one unlucky run should not decide a ratio."""
        ok = sorted((r for r in self.runs(method) if r.ok and r.mb_per_s), key=lambda r: r.mb_per_s or 0.0)
        return ok[(len(ok) - 1) // 2] if ok else None

    def peak_rss_mib(self, method: str) -> float | None:
        """The highest peak RSS over every run of `method`: a memory bound must hold in all of them."""
        runs = self.runs(method)
        return max(r.peak_rss_mib for r in runs) if runs else None

    def ratio(self, method: str, baseline: str) -> float | None:
        """Throughput of `method` over that of `baseline` (>1: `method` is faster)."""
        mine, theirs = self.get(method), self.get(baseline)
        if mine is None or theirs is None or not mine.mb_per_s or not theirs.mb_per_s:
            return None
        return mine.mb_per_s / theirs.mb_per_s

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "files": self.files,
            "source_bytes": self.source_bytes,
            "setup_seconds": round(self.setup_seconds, 2),
            "results": [result.as_dict() for result in self.results],
            "ratios": {
                "archiver_vs_raw": _round(self.ratio("archiver", "raw"), 3),
                "archiver_vs_inmemory": _round(self.ratio("archiver", "inmemory"), 3),
            },
            "profile": self.profile,
        }


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_scenario(result: ScenarioResult, out: TextIO) -> None:
    print(
        f"\n== {result.name}: {result.description} "
        f"({result.files} files, {result.source_bytes / MiB:,.0f} MiB of sources)",
        file=out,
    )
    header = f"{'method':<{LABEL_WIDTH}} {'wall s':>8} {'work s':>8} {'MB/s':>8} "
    header += f"{'peak RSS MiB':>13} {'archive MiB':>12}"
    print(header, file=out)
    print("-" * len(header), file=out)
    repeated = any(row.details.get("round", 1) > 1 for row in result.results)
    for row in result.results:
        archive = None if row.archive_bytes is None else row.archive_bytes / MiB
        label = METHOD_LABELS.get(row.method, row.method)
        if repeated:
            label = f"{label} #{row.details.get('round', 1)}"
        print(
            f"{label:<{LABEL_WIDTH}} {row.wall_seconds:>8.1f} "
            f"{_fmt(row.work_seconds, '.1f'):>8} {_fmt(row.mb_per_s, '.1f'):>8} "
            f"{row.peak_rss_mib:>13.1f} {_fmt(archive, ',.1f'):>12}",
            file=out,
        )
        if not row.ok:
            print(f"    FAILED: {row.error}", file=out)
        elif row.details.get("note"):
            print(f"    {row.details['note']}", file=out)
    raw, inmemory = result.ratio("archiver", "raw"), result.ratio("archiver", "inmemory")
    print(
        ("medians: " if repeated else "") + f"archiver/raw throughput {_fmt(raw, '.2f')}×, "
        f"archiver/in-memory throughput {_fmt(inmemory, '.2f')}×",
        file=out,
    )


@dataclass
class FlatMemory:
    small_name: str
    large_name: str
    small_rss_mib: float
    large_rss_mib: float

    @property
    def difference(self) -> float:
        """Relative growth of the archiver's peak RSS from the smaller to the larger archive."""
        return (self.large_rss_mib - self.small_rss_mib) / self.small_rss_mib

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "difference_pct": round(100 * self.difference, 1)}


def flat_memory(results: list[ScenarioResult], pair: tuple[str, str]) -> FlatMemory | None:
    by_name = {result.name: result for result in results}
    small, large = (by_name.get(name) for name in pair)
    small_rss = small.peak_rss_mib("archiver") if small and small.get("archiver") else None
    large_rss = large.peak_rss_mib("archiver") if large and large.get("archiver") else None
    if not small_rss or not large_rss:
        return None
    return FlatMemory(pair[0], pair[1], small_rss, large_rss)


def targets(results: list[ScenarioResult], flat: FlatMemory | None) -> list[tuple[str, bool | None, str]]:
    """(target, met or None when not measured in this run, what was measured)."""
    checks: list[tuple[str, bool | None, str]] = []
    for result in results:
        if result.name in ("large", "huge"):
            ratio = result.ratio("archiver", "raw")
            checks.append(
                (
                    f"{result.name}: archiver ≥ {RAW_RATIO_TARGET}× raw copy",
                    None if ratio is None else ratio >= RAW_RATIO_TARGET,
                    f"{_fmt(ratio, '.2f')}×",
                )
            )
        if result.name == "small":
            ratio = result.ratio("archiver", "inmemory")
            checks.append(
                (
                    f"small: archiver ≥ {INMEMORY_RATIO_TARGET:g}× in-memory",
                    None if ratio is None else ratio >= INMEMORY_RATIO_TARGET,
                    f"{_fmt(ratio, '.2f')}×",
                )
            )
        archiver_runs = result.runs("archiver")
        peak = result.peak_rss_mib("archiver")
        if archiver_runs and peak is not None:
            all_ok = all(r.ok for r in archiver_runs)
            checks.append(
                (
                    f"{result.name}: archiver peak RSS ≤ {RSS_LIMIT_MIB:g} MiB",
                    all_ok and peak <= RSS_LIMIT_MIB,
                    f"{peak:.1f} MiB" + ("" if all_ok else " (a run failed)"),
                )
            )
    if flat is not None:
        checks.append(
            (
                f"archiver peak RSS {flat.small_name} vs {flat.large_name} within {FLAT_RSS_TOLERANCE:.0%}",
                abs(flat.difference) <= FLAT_RSS_TOLERANCE,
                f"{flat.small_rss_mib:.1f} → {flat.large_rss_mib:.1f} MiB ({100 * flat.difference:+.1f}%)",
            )
        )
    return checks


def print_summary(
    results: list[ScenarioResult], flat: FlatMemory | None, out: TextIO
) -> list[tuple[str, bool | None, str]]:
    checks = targets(results, flat)
    print("\n== targets", file=out)
    for name, met, measured in checks:
        verdict = "n/a " if met is None else ("PASS" if met else "MISS")
        print(f"  {verdict}  {name}: {measured}", file=out)
    return checks


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
