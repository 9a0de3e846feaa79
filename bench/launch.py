"""`python bench/launch.py RESULT COMMAND...`: run COMMAND as the child of this small process and write
its exit code, peak RSS and CPU seconds (user + system) to RESULT (JSON).

Why a launcher: the kernel's `ru_maxrss` for a child is the larger of the child's own peak and the RSS of
the memory image it was forked from, recorded when it execs. Spawned straight from the bench (which
holds generated sources and, through vfork, shares its address space until exec), every child would
report the bench's own peak: 230 MiB for a process that used 90. Forked from this ~10 MiB process
instead, a child's `ru_maxrss` is its own. The same reason makes `/usr/bin/time -v` work; this needs no
extra package.

Run as a script, not `-m bench.launch`, so that nothing but the standard library is imported here.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    result_path, *command = argv
    pid = os.fork()
    if pid == 0:  # the measured process
        try:
            os.execvp(command[0], command)
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    exit_code = os.waitstatus_to_exitcode(status)
    with open(result_path, "w", encoding="utf-8") as result:
        json.dump(
            {
                "exit_code": exit_code,
                "max_rss_kib": usage.ru_maxrss,
                "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3),
            },
            result,
        )
    return exit_code if exit_code >= 0 else 128 - exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
