"""Wall time and peak memory of a command, measured from outside it.

A child's ru_maxrss starts from the resident size of the process that forked it (Linux keeps
the high-water mark across fork and exec), so a tool started from a process that holds models
would seem to use at least that much. The command is therefore started from a small
stdlib-only launcher, whose own footprint is a few MB.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, Sequence, Union

_LAUNCHER = """
import json, os, subprocess, sys, time
argv, log = json.loads(sys.argv[1]), sys.argv[2]
with open(log, "wb") as out:
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024,
                  "returncode": os.waitstatus_to_exitcode(status)}))
"""


def run_measured(argv: Sequence[str], log: Union[str, Path]) -> Dict[str, float]:
    """Runs argv to completion with its output in log; returns seconds, peak_rss_bytes (the
    command's own peak resident memory) and returncode."""
    done = subprocess.run([sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(list(argv)),
                           str(log)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)
