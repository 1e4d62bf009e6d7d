"""A heap with known contents for pymem's object census tests (Python 3.6+).

Reads one command per line on stdin, answers one JSON line on stdout:
  make CLASS N     -> N more live instances of CLASS (CensusItem or
                      GrowthItem); answers the class's exact live count and
                      the sum of sys.getsizeof over its instances
  dicts N          -> N more live small dicts; answers how many dicts
                      gc.get_objects() sees and the dicts held here
  mutate SECONDS   -> a thread allocates, frees and resizes dicts, lists and
                      objects at full speed for SECONDS (answers at once)
  ping             -> answers whether the mutator still runs
  bloat MIB        -> about MIB MiB more live small objects (benchmarks)
  scribble N       -> N lists, dicts and sets whose insides are
                      overwritten with random words through ctypes (the
                      collector is disabled first, so that the process
                      itself never walks them); answers how many
  exit
Ground truth is measured here, inside the process, never by pymem.
"""
import gc
import json
import os
import sys
import threading
import time


class CensusItem:
    def __init__(self, i):
        self.i = i


class GrowthItem:
    def __init__(self, i):
        self.i = i


CLASSES = {"CensusItem": CensusItem, "GrowthItem": GrowthItem}
kept = {name: [] for name in CLASSES}
held_dicts = []
bloat_kept = []
mutator = None


def make(name, n):
    cls = CLASSES[name]
    objects = kept[name]
    objects.extend(cls(i) for i in range(int(n)))
    # Every live instance, counted by the collector: the census must see
    # exactly these, not only the ones this list holds.
    live = [o for o in gc.get_objects() if type(o) is cls]
    return {
        "class": cls.__qualname__,
        "module": cls.__module__,
        "count": len(live),
        "bytes": sum(sys.getsizeof(o) for o in live),
    }


def dicts(n):
    held_dicts.extend({"k": i, "v": str(i)} for i in range(int(n)))
    tracked = sum(1 for o in gc.get_objects() if type(o) is dict)
    return {"held": len(held_dicts), "gc_dicts": tracked}


def mutate_for(seconds):
    deadline = time.time() + seconds
    pool = []
    i = 0
    while time.time() < deadline:
        i += 1
        d = {}
        for k in range(i % 64):  # grows and resizes the dict
            d[k] = [k] * (k % 8)
        pool.append(d)
        pool.append(CensusItem(i))
        if len(pool) > 5000:
            del pool[: len(pool) // 2]  # frees half, shrinking the list
        if i % 7 == 0 and pool:
            pool[-1 if i % 2 else 0] = "x" * (i % 300)


def mutate(seconds):
    global mutator
    mutator = threading.Thread(target=mutate_for, args=(seconds,), daemon=True)
    mutator.start()
    return {"started": True}


def bloat(mib):
    # ~100 bytes per tuple of a str and an int: about MIB MiB of objects.
    count = int(mib * (1 << 20) / 100)
    bloat_kept.extend((str(i), i) for i in range(count))
    return {"objects": count}


scribbled = []


def scribble(n):
    import ctypes
    import random

    gc.disable()
    rng = random.Random(7)
    for i in range(int(n)):
        victims = [[i, str(i)] * 8, {"k%d" % j: j for j in range(8)}, set(range(i, i + 8))]
        for victim in victims:
            # Keep the reference count and type; overwrite the rest of the
            # object's own struct (its sizes, item and table pointers).
            for offset in range(16, type(victim).__basicsize__, 8):
                ctypes.c_uint64.from_address(id(victim) + offset).value = rng.getrandbits(64)
        scribbled.append(victims)
    return {"scribbled": len(scribbled) * 3}


def main():
    print(json.dumps({"ready": True, "pid": os.getpid(), "version": "%d.%d.%d" % sys.version_info[:3]}), flush=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        cmd = parts[0]
        if cmd == "make":
            out = make(parts[1], float(parts[2]))
        elif cmd == "dicts":
            out = dicts(float(parts[1]))
        elif cmd == "mutate":
            out = mutate(float(parts[1]))
        elif cmd == "ping":
            out = {"mutating": bool(mutator and mutator.is_alive())}
        elif cmd == "bloat":
            out = bloat(float(parts[1]))
        elif cmd == "scribble":
            out = scribble(float(parts[1]))
        elif cmd == "exit":
            if scribbled:
                # Finalization would walk the scribbled objects.
                os._exit(0)
            return
        else:
            out = {"error": "unknown command " + cmd}
        print(json.dumps(out), flush=True)


main()
