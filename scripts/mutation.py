"""`make mutation`: mutmut over the decision code, against the fast tests; the last line printed is
`mutation: K of N killed (P%)`, and the exit status is 1 below TARGET.

The decision code is named here function by function (mutmut mutates whole files; its mutant names say
which function a mutant is in). A mutant counts as killed when a test failed, timed out or crashed on
it; one that no test ran, or that every test passed, survived. docs/mutation.md lists the survivors
judged equivalent, and why. Every run starts afresh: mutmut's cache of earlier results could hide a test
that no longer kills.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

ROOT = Path(__file__).resolve().parent.parent
TARGET = 90.0
# The decision code, as mutmut names its mutants: `archiver.<module>.x_<function>__mutmut_<n>`, methods
# `archiver.<module>.xǁ<Class>ǁ<method>__mutmut_<n>`.
DECISIONS = [
    "archiver.names.*",  # entry-name rules, portable spelling, duplicate renaming
    # Reading a request body: its bounds, duplicate keys, extended-client pointers and their allow-list.
    "archiver.request.x_max_json_values__*",
    "archiver.request.x_json_values__*",
    "archiver.request.x__reject_duplicate_keys__*",
    "archiver.request.x_decode_body__*",
    "archiver.request.x_extended_client_pointer__*",
    "archiver.request.x_load_document__*",
    # Validating and planning it.
    "archiver.models.x_json_depth__*",
    "archiver.models.x_is_valid_request_id__*",
    "archiver.models.xǁRequestǁ*",
    "archiver.models.x__holds_surrogate__*",
    "archiver.models.x_not_text__*",
    "archiver.models.x_parse_request__*",
    "archiver.models.x__echoable__*",
    "archiver.models.x_salvage_context__*",
    "archiver.models.x_parse_source__*",
    "archiver.models.x_request_digest__*",
    "archiver.models.x_archive_key__*",
    "archiver.models.x_plan_archive__*",
    "archiver.models.x_parse_cancel__*",
    "archiver.models.xǁCancelTargetǁ*",
    "archiver.decision.xǁDecisionǁ*",
    "archiver.models.xǁArchivePlanǁ*",
    "archiver.settle.x_release_delay__*",
    "archiver.settle.x_decide__*",
    "archiver.zipping.x_is_precompressed__*",
    "archiver.zipping.x_choose_level__*",
    "archiver.zipping.x_is_uncompressed__*",
    "archiver.assembly.x_plan_copies__*",
    "archiver.crc.*",
]
KILLED = {"killed", "timeout", "segfault", "caught by type check"}


def results() -> dict[str, str]:
    """Each decision mutant's status, from the files mutmut leaves beside each mutated module."""
    found: dict[str, str] = {}
    for meta in (ROOT / "mutants").rglob("*.py.meta"):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        for name, code in codes.items():
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in DECISIONS):
                found[name] = status_by_exit_code[code]
    return found


def main() -> int:
    shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    started = time.monotonic()
    mutmut = [str(Path(sys.executable).parent / "mutmut"), "run", *DECISIONS]
    environment = {**os.environ, "ARCHIVER_HYPOTHESIS": "mutation"}  # see tests/conftest.py
    run = subprocess.run(mutmut, cwd=ROOT, env=environment, capture_output=True, text=True, check=False)
    minutes, seconds = divmod(round(time.monotonic() - started), 60)
    statuses = results()
    if run.returncode != 0 or not statuses:
        print(run.stdout[-3000:], run.stderr[-3000:], sep="\n", file=sys.stderr)
        print(f"mutation: mutmut failed (exit status {run.returncode})")
        return 1
    survivors = sorted(name for name, status in statuses.items() if status not in KILLED)
    for name in survivors:
        print(f"  {statuses[name]}: {name}  (mutmut show {name})")
    counts = Counter(statuses.values())
    print("statuses:", ", ".join(f"{count} {status}" for status, count in counts.most_common()))
    print(f"time: {minutes} min {seconds} s")
    killed = len(statuses) - len(survivors)
    share = 100 * killed / len(statuses)
    print(f"mutation: {killed} of {len(statuses)} killed ({share:.1f}%)")
    return 0 if share >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
