"""A controllable memory workload for pymem's tests (Python 3.6+).

Reads one command per line on stdin, answers one JSON line on stdout:
  stats                     -> pymalloc arena counts from sys._debugmallocstats()
  leak_small SECONDS MBPS   -> leak small objects (all below 512 bytes, pymalloc)
  leak_bytes SECONDS PERSEC -> leak 8 KiB bytes objects; answers their exact sizes
  leak_numpy SECONDS PERSEC -> leak 256 KiB numpy arrays; answers their nbytes
  churn SECONDS             -> allocate and free heavily with no net growth
  gc_stats                  -> the collector's own gc.get_stats(): collections
                               per generation, and objects it found
                               unreachable (collected + uncollectable)
  gc_churn SECONDS PERSEC   -> PERSEC reference cycles a second made and
                               dropped (work for the collector); answers
                               gc_stats after
  hold_dicts N              -> N more small dicts held in a list; answers the
                               bytes held outside pymalloc (the list's buffer)
  hold_blobs N SIZE         -> N more SIZE-byte bytes objects held in a list;
                               answers their exact bytes outside pymalloc
  has_module NAME           -> whether NAME imports here (numpy is optional)
  mmap_via ADDR SIZE COUNT  -> COUNT anonymous private RW mappings of SIZE
                               bytes through the function at ADDR (a PLT stub
                               of the interpreter's mmap), kept mapped
  exit
Ground truth is measured here, inside the process, never by pymem.
"""
import json
import os
import re
import sys
import tempfile
import time

kept = []          # everything leaked stays reachable from here
chain = None       # small-object leak: a linked chain, so no container grows


def arena_stats():
    """Arena count and size as pymalloc itself reports them."""
    fd, path = tempfile.mkstemp()
    saved = os.dup(2)
    try:
        sys.stderr.flush()
        os.dup2(fd, 2)
        sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
    with open(path) as f:
        text = f.read()
    os.unlink(path)
    current = int(re.search(r"# arenas allocated current\s*=\s*([\d,]+)", text).group(1).replace(",", ""))
    size = re.search(r"\d+ arenas \* (\d+) bytes/arena", text)
    arena_size = int(size.group(1)) if size else (1 << 20 if sys.version_info >= (3, 10) else 256 << 10)
    return {"arenas": current, "arena_size": arena_size}


def paced(seconds, per_second, step):
    """Calls step() per_second times a second, in 20 ms slices, for seconds."""
    start = time.time()
    done = 0
    while True:
        elapsed = time.time() - start
        if elapsed >= seconds:
            return done
        due = int(elapsed * per_second)
        while done < due:
            step(done)
            done += 1
        time.sleep(0.02)


def leak_small(seconds, mbps):
    global chain
    # Each link: a 2-item list (~88 bytes with GC header and items) plus a
    # ~90 byte str: all pymalloc.
    per_second = int(mbps * 1e6 / 180)

    def step(i):
        global chain
        chain = [chain, "x" * 40 + str(i)]

    return {"objects": paced(seconds, per_second, step)}


def leak_bytes(seconds, per_second, burst=0):
    """8 KiB blocks kept, per_second for seconds, then `burst` at once."""
    before = sys.getsizeof(kept)
    sizes = []

    def step(i):
        blob = bytes(8192)
        kept.append(blob)
        sizes.append(sys.getsizeof(blob))

    paced(seconds, per_second, step)
    for i in range(int(burst)):
        step(i)
    return {"bytes": sum(sizes) + sys.getsizeof(kept) - before, "objects": len(sizes)}


def leak_numpy(seconds, per_second):
    import numpy as np
    before = sys.getsizeof(kept)
    nbytes = []

    def step(i):
        arr = np.ones(32768)  # 256 KiB
        kept.append(arr)
        nbytes.append(arr.nbytes)

    paced(seconds, per_second, step)
    return {"bytes": sum(nbytes) + sys.getsizeof(kept) - before, "arrays": len(nbytes)}


def churn(seconds):
    start = time.time()
    rounds = 0
    while time.time() - start < seconds:
        tmp = [{"k": i, "v": "s" * (i % 64)} for i in range(20000)]
        blobs = [bytes(8192) for _ in range(200)]
        del tmp, blobs
        rounds += 1
        time.sleep(0.01)
    return {"rounds": rounds}


def gc_stats():
    import gc
    stats = gc.get_stats()
    return {
        "collections": [s["collections"] for s in stats][:3],
        "unreachable": sum(s["collected"] + s["uncollectable"] for s in stats),
    }


def gc_churn(seconds, per_second):
    start = time.time()
    made = 0
    while time.time() - start < seconds:
        for _ in range(int(per_second / 100)):
            a, b = [], []
            a.append(b)
            b.append(a)
        made += int(per_second / 100)
        time.sleep(0.01)
    out = gc_stats()
    out["cycles"] = made
    return out


held = []         # hold_dicts / hold_blobs


def outside_pymalloc(objects):
    """Bytes of objects too big for pymalloc (over 512 bytes), by getsizeof."""
    return sum(n for n in map(sys.getsizeof, objects) if n > 512)


def hold_dicts(n):
    held.extend({"k": i} for i in range(int(n)))
    return {"held": len(held), "outside_bytes": outside_pymalloc([held])}


def hold_blobs(n, size):
    held.extend(os.urandom(int(size)) for _ in range(int(n)))
    return {"held": len(held), "outside_bytes": outside_pymalloc([held] + held)}


def has_module(name):
    try:
        __import__(name)
        return {"available": True}
    except ImportError:
        return {"available": False}


def mmap_via(addr, size, count):
    import ctypes
    mmap = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                            ctypes.c_int, ctypes.c_int, ctypes.c_long)(int(addr))
    addresses = [mmap(None, int(size), 0x3, 0x22, -1, 0) for _ in range(int(count))]
    kept.extend(addresses)
    return {"mapped": sum(1 for a in addresses if a and a != 2 ** 64 - 1)}


def main():
    print(json.dumps({"ready": True, "pid": os.getpid(), "version": "%d.%d.%d" % sys.version_info[:3]}), flush=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        cmd = parts[0]
        if cmd == "has_module":
            print(json.dumps(has_module(parts[1])), flush=True)
            continue
        args = [float(a) for a in parts[1:]]
        if cmd == "stats":
            out = arena_stats()
        elif cmd == "gc_stats":
            out = gc_stats()
        elif cmd == "gc_churn":
            out = gc_churn(*args)
        elif cmd == "leak_small":
            out = leak_small(*args)
        elif cmd == "leak_bytes":
            out = leak_bytes(*args)
        elif cmd == "leak_numpy":
            out = leak_numpy(*args)
        elif cmd == "churn":
            out = churn(*args)
        elif cmd == "hold_dicts":
            out = hold_dicts(*args)
        elif cmd == "hold_blobs":
            out = hold_blobs(*args)
        elif cmd == "mmap_via":
            out = mmap_via(*args)
        elif cmd == "exit":
            return
        else:
            out = {"error": "unknown command " + cmd}
        print(json.dumps(out), flush=True)


main()
