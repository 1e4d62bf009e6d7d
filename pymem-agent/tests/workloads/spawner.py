"""A Python parent that starts Python children of other versions with
subprocess, as supervisors, pytest-xdist and celery do, driven over stdin:

  start N PYTHON...  start N children round-robin over PYTHON...; child i is
                     to hold 8 + i MiB; prints one JSON line: [{pid, version,
                     bytes}] once every child has started
  go                 every child allocates what it is to hold; prints "done"
  end                the children exit; prints "ended"
"""
import json
import subprocess
import sys

CHILD = r"""
import os, sys
print(os.getpid(), "%d.%d.%d" % sys.version_info[:3], flush=True)
sys.stdin.readline()
held = bytearray(int(sys.argv[1]))
print("done", flush=True)
sys.stdin.readline()
"""

children = []
for line in sys.stdin:
    words = line.split()
    if not words:
        continue
    if words[0] == "start":
        count, pythons = int(words[1]), words[2:]
        started = []
        for i in range(count):
            size = (8 + i) << 20
            child = subprocess.Popen(
                [pythons[i % len(pythons)], "-c", CHILD, str(size)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            children.append(child)
            started.append(size)
        report = []
        for child, size in zip(children, started):
            pid, version = child.stdout.readline().split()
            report.append({"pid": int(pid), "version": version, "bytes": size})
        print(json.dumps(report), flush=True)
    elif words[0] == "go":
        for child in children:
            child.stdin.write("\n")
            child.stdin.flush()
        for child in children:
            assert child.stdout.readline().strip() == "done"
        print("done", flush=True)
    elif words[0] == "end":
        for child in children:
            child.stdin.close()
        for child in children:
            child.wait()
        children = []
        print("ended", flush=True)
