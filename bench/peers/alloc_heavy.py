"""(a) Allocation-heavy loop: bench/alloc_heavy.py's churn (about a million
small dicts and strings and 4000 4 KiB blobs, a bounded window kept alive),
PEERS_SCALE times."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import alloc_heavy  # noqa: E402  bench/alloc_heavy.py
import harness  # noqa: E402

alloc_heavy.ITERATIONS = harness.scaled(alloc_heavy.ITERATIONS)

if __name__ == "__main__":
    harness.run(alloc_heavy.churn)
