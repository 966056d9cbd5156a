"""Wall time and peak memory of a command, measured from outside it.

A child's ru_maxrss starts from the resident size of the process that forked it (Linux keeps
the high-water mark across fork and exec), so a tool started from a process that holds models
would seem to use at least that much. The command is therefore started from a small
stdlib-only launcher, whose own footprint is a few MB. The launcher also samples
/proc/PID/status every 10 ms: RSS counts the pages of mapped checkpoint files a tool has
touched (RssFile: page cache, shared with the system) as well as its own memory (RssAnon),
and the two say different things about how much RAM a merge needs.
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
peak = {"RssAnon": 0, "RssFile": 0}
def sample(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in peak:
                    peak[key] = max(peak[key], int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
with open(log, "wb") as out:
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        sample(proc.pid)
        time.sleep(0.01)
    seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024,
                  "sampled_peak_anon_bytes": peak["RssAnon"],
                  "sampled_peak_file_bytes": peak["RssFile"],
                  "returncode": os.waitstatus_to_exitcode(status)}))
"""


def run_measured(argv: Sequence[str], log: Union[str, Path]) -> Dict[str, float]:
    """Runs argv to completion with its output in log; returns seconds, peak_rss_bytes (the
    command's own ru_maxrss), sampled_peak_anon_bytes, sampled_peak_file_bytes, returncode."""
    done = subprocess.run([sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(list(argv)),
                           str(log)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)
