"""Allocation-heavy workload for `cargo xtask bench overhead`.

Churns about a million small dicts and strings (pymalloc) and several
thousand 4 KiB bytes blobs (above pymalloc's 512-byte limit, so libc malloc),
keeping only a bounded window of them alive so memory stays flat.

With the argument `probe-cost` it runs a calibration loop instead: 20000
4 KiB blobs allocated and freed one after the other, nothing else, so that
three probe hits (malloc, its return, free) dominate each iteration and the
cost of one hit can be measured.

Protocol with the harness:
  1. wait for a line on stdin (the harness first makes sure the agent
     observes this process);
  2. run the loop, timing only the loop, and print one JSON line:
     {"seconds": ..., "cpu_seconds": ..., "python": ..., ...}; the CPU time
     (user + system, where uprobe handlers run) is steadier than the wall
     time when other work shares the machine;
  3. wait for stdin to close (the harness reads the agent's view of this
     process meanwhile), then exit.
Runs on Python 3.6 and later.
"""
import json
import platform
import sys
import time

ITERATIONS = 1000000
BLOB_EVERY = 250  # -> 4000 blobs of 4 KiB
BLOB_SIZE = 4096
KEEP_OBJECTS = 10000  # live window of dicts and strings
KEEP_BLOBS = 64  # live window of blobs
CALIBRATION_BLOBS = 20000


def churn():
    objects = [None] * KEEP_OBJECTS
    blobs = [None] * KEEP_BLOBS
    for i in range(ITERATIONS):
        name = "item-%d" % i
        objects[i % KEEP_OBJECTS] = ({"i": i, "name": name}, name * 2)
        if i % BLOB_EVERY == 0:
            blobs[(i // BLOB_EVERY) % KEEP_BLOBS] = (b"%08d" % i) * (BLOB_SIZE // 8)


def probe_cost():
    blob = None
    for i in range(CALIBRATION_BLOBS):
        blob = (b"%08d" % i) * (BLOB_SIZE // 8)
    return blob


def main():
    loop = probe_cost if sys.argv[1:] == ["probe-cost"] else churn
    sys.stdin.readline()
    start = time.perf_counter()
    cpu_start = time.process_time()
    loop()
    cpu_seconds = time.process_time() - cpu_start
    seconds = time.perf_counter() - start
    result = {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "python": platform.python_version(),
        "executable": sys.executable,
        "loop": loop.__name__,
    }
    print(json.dumps(result), flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
