"""Churn and a leak interleaved in one loop, as a request handler does it
(Python 3.6+): every iteration builds and drops 40 small dicts (the
request's scratch) and keeps one dict (the visitor). Both share pymalloc's
size classes, so whoever needs the next arena is almost always the churn.

    interleaved.py SECONDS [--tracemalloc]

Prints {"ready": true} when it starts looping and, after SECONDS, its
counts (with --tracemalloc, tracemalloc's heaviest lines: the ground
truth); then waits for a line on stdin before exiting.
"""
import json
import sys
import time

VISITORS = []


def serve_one(i):
    scratch = [{"request": "r", "item": j} for j in range(40)]  # SITE: churn
    return len(scratch)


def remember_visitor(i):
    VISITORS.append({"name": "visitor-%d" % i, "kind": "web"})  # SITE: leak


def main():
    seconds = float(sys.argv[1])
    traced = "--tracemalloc" in sys.argv
    if traced:
        import tracemalloc

        tracemalloc.start()
    print(json.dumps({"ready": True}), flush=True)
    start = time.time()
    i = 0
    while time.time() - start < seconds:
        serve_one(i)
        remember_visitor(i)
        i += 1
    out = {"iterations": i}
    if traced:
        stats = tracemalloc.take_snapshot().statistics("lineno")
        out["total"] = sum(s.size for s in stats)
        out["top"] = [[s.traceback[0].filename, s.traceback[0].lineno, s.size] for s in stats[:5]]
    print(json.dumps(out), flush=True)
    sys.stdin.readline()


main()
