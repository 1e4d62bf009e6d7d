"""Temporaries that peak and are released (Python 3.6+): every round
builds a big list in a function, holds it for a while and drops it.
Prints "ready" and waits for a line on stdin before the first round (so
that an observer can attach before anything is built), then "built" while
the list is held and "released" after, one line each, waiting for a line
on stdin at each step.
"""
import sys


def build_report():
    rows = [("row-%d" % i, i) for i in range(600000)]  # SITE: peak
    print("built", flush=True)
    sys.stdin.readline()
    return len(rows)


def main():
    print("ready", flush=True)
    sys.stdin.readline()
    while True:
        build_report()
        print("released", flush=True)
        sys.stdin.readline()


main()
