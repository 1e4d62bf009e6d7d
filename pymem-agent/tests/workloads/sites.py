"""Known allocation sites for pymem's site tests (Python 3.8+).

Each function allocates on one known line, marked with a "SITE:" comment
that the tests look up, so the expected line numbers come from this file.
Runs until killed; prints "ready" once the first round is done.

    sites.py [ROUNDS_PER_SECOND]   (default 10)
"""
import sys
import time

chain = None
blobs = []


def leak_small_objects():
    global chain
    for i in range(12000):
        chain = [chain, "x" * 40 + str(i)]  # SITE: small


def leak_large_blobs():
    for _ in range(5):
        blobs.append(bytes(32768))  # SITE: large


def churn_only():
    tmp = [bytes(4096) for _ in range(10)]  # SITE: churn
    return len(tmp)


def main():
    pause = 1.0 / float(sys.argv[1]) if len(sys.argv) > 1 else 0.1
    first = True
    while True:
        leak_small_objects()
        leak_large_blobs()
        churn_only()
        if first:
            print("ready", flush=True)
            first = False
        # Ten rounds a second: ~500 probe hits/s, within the agent's
        # default budget, so every block outside pymalloc is seen.
        time.sleep(pause)


main()
