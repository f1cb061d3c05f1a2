"""Run one command and report *its* wall time and resource usage as JSON: run.py's probe.

    python -I -S launcher.py RESULT.json COMMAND [ARG ...]

Why a separate process: on Linux a child's ru_maxrss is the larger of its own peak and the
resident size of the process that forked it (the parent's memory is copied, or borrowed for
vfork/posix_spawn, until exec, and exec records that high-water mark). Spawned straight from
run.py, which holds botocore and matplotlib (~50 MB), every tool would read at least ~50 MB.
Started with ``-I -S`` this launcher is ~8 MB, below any tool measured here, so the reported
peak is the tool's own. Wall time is taken around spawn and wait only, so the launcher's own
start-up is not counted. Standard library only, imports kept minimal on purpose.
"""

import json
import os
import sys
import time


def main() -> int:
    if len(sys.argv) < 3:
        print("usage: launcher.py RESULT.json COMMAND [ARG ...]", file=sys.stderr)
        return 2
    result_path, argv = sys.argv[1], sys.argv[2:]
    start = time.perf_counter()
    pid = os.posix_spawnp(argv[0], argv, os.environ)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    with open(result_path, "w") as out:
        json.dump(
            {
                "wall_s": wall,
                "user_s": usage.ru_utime,
                "sys_s": usage.ru_stime,
                "maxrss_kib": usage.ru_maxrss,
                "exit_code": code,
            },
            out,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
