"""The protocol every workload of `cargo xtask bench peers` follows, whatever
tool it runs under (none, pymem, tracemalloc, memray, ddtrace, mprof).

Lines for the harness start with "PEERS-" on stdout, so that what a tool
prints there too is skipped:
  1. PEERS-READY {"pid": ...}: the workload's own pid (mprof runs it as a
     child); then wait for a line on stdin (the harness first makes sure
     pymem observes the process, in pymem's runs);
  2. run the work, timing only it: wall time (perf_counter) and the
     process's CPU time (process_time: in-process tools' threads count);
  3. PEERS-RESULT {"seconds", "cpu_seconds", "peak_rss_kib", ...}; then wait
     for stdin to close (the harness asks pymem about the process
     meanwhile), and exit.
PEERS_SCALE (default 1) scales the amount of work.
"""
import json
import os
import resource
import sys
import time

# Called with the result before it is printed (the tracemalloc wrapper's
# snapshot); not timed.
AFTER = []
SCALE = float(os.environ.get("PEERS_SCALE", "1"))


def emit(kind, value):
    print("PEERS-%s %s" % (kind, json.dumps(value)), flush=True)


def scaled(n):
    return max(1, int(n * SCALE))


def run(work):
    emit("READY", {"pid": os.getpid()})
    sys.stdin.readline()
    start = time.perf_counter()
    cpu_start = time.process_time()
    extra = work() or {}
    cpu_seconds = time.process_time() - cpu_start
    seconds = time.perf_counter() - start
    result = {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "pid": os.getpid(),
        "python": sys.version.split()[0],
    }
    result.update(extra)
    for hook in AFTER:
        hook(result)
    emit("RESULT", result)
    sys.stdin.read()
