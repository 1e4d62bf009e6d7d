"""Runs a workload under tracemalloc, as a developer would add it to the
code: `tracemalloc_run.py FRAMES SCRIPT ARGS...` starts tracemalloc with
FRAMES frames, runs SCRIPT as __main__, and when the work is done writes
the snapshot's statistics (grouped by traceback, heaviest first) as JSON to
$PEERS_TRACEMALLOC_REPORT."""
import json
import os
import runpy
import sys
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

TOP = 10


def report(result):
    # What the snapshot itself and this wrapper allocate is not the
    # workload's.
    snapshot = tracemalloc.take_snapshot().filter_traces([
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, __file__),
    ])
    stats = snapshot.statistics("traceback")
    out = {
        "traced_bytes": tracemalloc.get_traced_memory()[0],
        "top": [{
            "size": s.size,
            "count": s.count,
            # Innermost first, as memray's and pprof's stacks are
            # (tracemalloc lists the oldest frame first).
            "frames": [{"file": f.filename, "line": f.lineno} for f in reversed(s.traceback)],
        } for s in stats[:TOP]],
    }
    path = os.environ.get("PEERS_TRACEMALLOC_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(out, f)


def main():
    frames = int(sys.argv[1])
    script = sys.argv[2]
    sys.argv = sys.argv[2:]
    harness.AFTER.append(report)
    tracemalloc.start(frames)
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
