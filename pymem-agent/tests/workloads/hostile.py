"""A Python process that damages its own interpreter state through ctypes,
for pymem's robustness tests (CPython 3.11-3.13).

Everything it damages is off its own executing path, so it keeps running:
  - code objects of functions a thread then keeps calling: co_name into
    unmapped memory, co_linetable a bytes object with a huge ob_size or
    1 MiB of noise, co_filename a str with a huge length;
  - the frames of a thread that never returns: the caller's `previous`
    pointing back at its callee (a cycle), and its code pointer into
    unmapped memory;
  - type objects with live instances: tp_name into unmapped memory, a huge
    tp_basicsize, a class that is its own metatype;
  - self-referencing containers with bogus sizes: a list whose ob_size and
    allocated are huge, a tuple with a huge ob_size, a dict whose keys
    table claims 2^30 slots, a str with a huge length;
  - on the command `damage_thread_list`, the interpreter's thread list: it
    loops back to its head.
The collector is off: it would traverse the damaged containers.
Prints one JSON line (its pid, version, what it damaged) and one more after
each command, then runs until killed; the threads allocate (and free) a
hundred blocks a second, so the agent keeps capturing their stacks within
its probe budget.
"""
import ctypes
import gc
import json
import os
import sys
import threading
import time

gc.disable()

WORD = ctypes.sizeof(ctypes.c_void_p)
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def unmapped_address():
    """An address that was mapped a moment ago and is not any more."""
    addr = libc.mmap(None, 1 << 16, 3, 0x22, -1, 0)
    libc.munmap(addr, 1 << 16)
    return addr + 128


def word(addr):
    return ctypes.c_uint64.from_address(addr).value


def set_word(addr, value):
    ctypes.c_uint64.from_address(addr).value = value & (2 ** 64 - 1)


def offset_of(obj, target, start=WORD * 2, end=512):
    """The offset in obj's memory of the first word that points at target."""
    base = id(obj)
    for off in range(start, end, WORD):
        if word(base + off) == id(target):
            return off
    raise RuntimeError("no pointer to %r in %r" % (target, obj))


damaged = []
keep = []          # fakes referenced from damaged objects stay alive
UNMAPPED = unmapped_address()


def make_victim(name):
    """A fresh function that allocates above and below pymalloc's limit."""
    source = "def {0}():\n    a = bytes(8192)\n    b = [{0}] * 8\n    return len(a) + len(b)\n".format(name)
    scope = {}
    exec(compile(source, "<victim %s>" % name, "exec"), scope)
    return scope[name]


def huge_bytes():
    fake = bytes(range(64))
    set_word(id(fake) + WORD * 2, 1 << 40)  # ob_size
    keep.append(fake)
    return fake


def huge_str():
    fake = "".join(["f"] * 80)  # a fresh compact ASCII str
    set_word(id(fake) + WORD * 2, 1 << 62)  # length
    keep.append(fake)
    return fake


def noise_table():
    noise = os.urandom(1 << 20)
    keep.append(noise)
    return noise


victims = []
for name, field, value in [
    ("victim_unmapped_name", "co_name", lambda: UNMAPPED),
    ("victim_huge_linetable", "line table", lambda: id(huge_bytes())),
    ("victim_noise_linetable", "line table", lambda: id(noise_table())),
    ("victim_huge_filename", "co_filename", lambda: id(huge_str())),
]:
    fn = make_victim(name)
    code = fn.__code__
    if field == "line table":
        table = code.co_linetable if sys.version_info >= (3, 10) else code.co_lnotab
        off = offset_of(code, table)
    elif field == "co_name":
        off = offset_of(code, code.co_name)
    else:
        off = offset_of(code, code.co_filename)
    set_word(id(code) + off, value())
    victims.append(fn)
    damaged.append("code %s: %s" % (name, field))


def call_victims():
    while True:
        for fn in victims:
            fn()
        time.sleep(0.05)


# The outermost frame of the damaged stack has 60,000 locals, so that
# whoever follows the frame cycle pays for them on every lap.
MANY_LOCALS = 60000
exec(compile(
    "def spin_outer():\n    " + " = ".join("v%d" % i for i in range(MANY_LOCALS)) + " = None\n    spin_middle()\n",
    "<spin_outer>", "exec"))


def spin_middle():
    spin_inner()


def spin_inner():
    """Damages the frames under it, then never returns to them."""
    frame = sys._getframe()
    # 3.11+: PyFrameObject.f_frame, right after ob_base and f_back.
    iframe = word(id(frame) + WORD * 3)
    code_at = next(off for off in range(0, 96, WORD) if word(iframe + off) == id(spin_inner.__code__))
    previous_at = next(
        off for off in range(0, 96, WORD)
        if word(iframe + off) and word(word(iframe + off) + code_at) == id(spin_middle.__code__)
    )
    middle = word(iframe + previous_at)
    outer = word(middle + previous_at)
    assert word(outer + code_at) == id(spin_outer.__code__)
    set_word(outer + previous_at, iframe)      # inner -> middle -> outer -> inner -> ...
    damaged.append("frames: a previous-pointer cycle through a frame of %d locals" % MANY_LOCALS)
    set_word(middle + code_at, UNMAPPED)       # its code, never resumed
    damaged.append("frames: a code pointer into unmapped memory")
    started.set()
    blobs = 0
    while True:
        blob = bytes(8192)
        blobs += len(blob) > 0
        time.sleep(0.05)


started = threading.Event()
threading.Thread(target=call_victims, daemon=True).start()
threading.Thread(target=spin_outer, daemon=True).start()
started.wait()


class EvilName:
    pass


class EvilSize:
    pass


class OwnMetatype:
    pass


instances = [EvilName() for _ in range(200)] + [EvilSize() for _ in range(200)] + [OwnMetatype() for _ in range(200)]
TP_NAME, TP_BASICSIZE = 3 * WORD, 4 * WORD
set_word(id(EvilName) + TP_NAME, UNMAPPED)
damaged.append("type EvilName: tp_name into unmapped memory")
set_word(id(EvilSize) + TP_BASICSIZE, 1 << 40)
damaged.append("type EvilSize: tp_basicsize 2^40")
set_word(id(OwnMetatype) + WORD, id(OwnMetatype))  # ob_type
damaged.append("type OwnMetatype: its own metatype")

EVIL_LIST = [1, 2, 3]
EVIL_LIST.append(EVIL_LIST)
set_word(id(EVIL_LIST) + 2 * WORD, 1 << 40)   # ob_size
set_word(id(EVIL_LIST) + 4 * WORD, 1 << 40)   # allocated
damaged.append("list: itself as an item, ob_size and allocated 2^40")

EVIL_TUPLE = tuple([EVIL_LIST, [], "x"])
set_word(id(EVIL_TUPLE) + 2 * WORD, 1 << 40)
damaged.append("tuple: ob_size 2^40")

EVIL_DICT = {"a": 1, "self": None}
EVIL_DICT["self"] = EVIL_DICT
keys = word(id(EVIL_DICT) + 4 * WORD)         # ma_keys
set_word(id(EVIL_DICT) + 2 * WORD, 1 << 40)   # ma_used
ctypes.c_uint8.from_address(keys + 8).value = 30  # dk_log2_size
set_word(keys + 24, 1 << 29)                  # dk_nentries
damaged.append("dict: itself as a value, ma_used 2^40, a keys table of 2^30 slots")

EVIL_STR = huge_str()
damaged.append("str: length 2^62")



def damage_thread_list():
    """The main thread's state (the oldest, last in the interpreter's
    list) made to point back at the newest: the list never ends. Nothing
    walks it while no thread starts or ends."""
    api = ctypes.pythonapi
    for name, argtypes in [("PyThreadState_Get", []), ("PyInterpreterState_Get", []),
                           ("PyInterpreterState_ThreadHead", [ctypes.c_void_p])]:
        getattr(api, name).restype = ctypes.c_void_p
        getattr(api, name).argtypes = argtypes
    main = api.PyThreadState_Get()
    head = api.PyInterpreterState_ThreadHead(api.PyInterpreterState_Get())
    assert word(main + WORD) == 0 and head != main  # PyThreadState.next
    set_word(main + WORD, head)
    return "threads: the thread list loops back to its head"


def say(what):
    print(json.dumps(what), flush=True)


say({
    "ready": True,
    "pid": os.getpid(),
    "version": "%d.%d.%d" % sys.version_info[:3],
    "damaged": damaged,
})
# More on request, once the agent has checked this process's stack layout
# (a thread list that does not end would make it turn stacks off).
for line in sys.stdin:
    if line.strip() == "damage_thread_list":
        damaged.append(damage_thread_list())
        say({"damaged": damaged})
while True:
    time.sleep(1)
